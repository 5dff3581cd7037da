"""Entry point: python -m rlhf_jax.main --config=configs/<name>.py[:variant] --workdir=DIR.

Dispatches on config.stage. Rerunning the same command on the same DIR resumes from its
newest checkpoint. Several processes (hosts) run the same command with --distributed=auto
or --coordinator/--num_processes/--process_id (rlhf_jax/distributed.py). Bad input ends with one `error: ...` line on stderr and exit status 2.
"""
import sys

from absl import flags
from ml_collections import config_flags

from rlhf_jax.errors import UserError
from rlhf_jax.stages import dispatch

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if present).')
_DISTRIBUTED = flags.DEFINE_string(
    'distributed', '', "'auto': jax.distributed.initialize() from the cluster's environment "
    '(TPU VM pods, SLURM); empty: the flags below or RLHF_JAX_* variables, if any.')
_COORDINATOR = flags.DEFINE_string('coordinator', '', 'HOST:PORT of process 0, for several '
                                   'processes (env RLHF_JAX_COORDINATOR).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Processes in the run '
                                      '(env RLHF_JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, "This process's index "
                                   '(env RLHF_JAX_PROCESS_ID).')


def fail(message: str, status: int = 2):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return text or type(e).__name__


def _flag_error(e: BaseException) -> str:
  """ml_collections puts the config file's whole traceback into the flag error; the user
  needs its first line (which flag) and its last (what the config file raised)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if any(l.startswith('Traceback (most recent call last)') for l in lines):
    return f'{lines[0]} {lines[-1]}'
  return _one_line(e)


def _config_error(e: BaseException) -> str:
  if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError):
    e = e.args[0]  # ConfigDict.__getattr__ wraps the KeyError of an unknown field
  if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
    # str(KeyError) is the repr of the message, with its quotes and newline escaped.
    return 'unknown field ' + '; '.join(l.strip() for l in e.args[0].splitlines() if l.strip())
  if isinstance(e, OSError) and 'earlier failure to load' in str(e):
    # A config file that cannot be read is reported lazily, on first use of the config,
    # with a multi-line list of the paths tried: its last line is the OS error.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return f'cannot load the config file: {lines[-1]}'
  return _one_line(e)


def parse(argv: list[str]):
  """Parses flags; every problem with them becomes a UserError."""
  try:
    flags.FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      config.get('stage')  # raises here if the config file could not be loaded
  except flags.Error as e:
    raise UserError(_flag_error(e)) from None
  except (KeyError, AttributeError, ValueError, TypeError, FileNotFoundError, OSError,
          SyntaxError) as e:
    raise UserError(f'bad --config: {_config_error(e)}') from None
  if _WORKDIR.value is None:
    raise UserError('--workdir is required')
  if config is None:
    raise UserError('--config is required')
  return config, _WORKDIR.value


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv if argv is None else argv
  try:
    config, workdir = parse(argv)
    from rlhf_jax import distributed
    distributed.initialize(mode=_DISTRIBUTED.value, coordinator=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    dispatch.run(config, workdir)
  except UserError as e:
    fail(str(e))
  except KeyboardInterrupt:
    fail('interrupted; rerun the same command to resume from the newest checkpoint', 130)
  except RuntimeError as e:
    from rlhf_jax.train.loop import NonFiniteLoss
    if isinstance(e, NonFiniteLoss):
      fail(str(e), 1)
    raise


if __name__ == '__main__':
  main()
