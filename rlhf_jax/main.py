"""Entry point: python -m rlhf_jax.main --config=configs/<name>.py[:variant] --workdir=DIR.

Dispatches on config.stage. Rerunning the same command on the same DIR resumes from its
newest checkpoint. Bad input ends with one `error: ...` line on stderr and exit status 2.
"""
import importlib
import os
import sys

from absl import flags
from ml_collections import config_flags

from rlhf_jax import config as config_lib
from rlhf_jax.errors import UserError

STAGES = {
    'pretrain': 'rlhf_jax.stages.pretrain',
}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if present).')


def fail(message: str, status: int = 2):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return text or type(e).__name__


def parse(argv: list[str]):
  """Parses flags; every problem with them becomes a UserError."""
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(_one_line(e)) from None
  except (KeyError, AttributeError, ValueError, TypeError, FileNotFoundError, OSError) as e:
    raise UserError(f'bad --config: {_one_line(e)}') from None
  if _WORKDIR.value is None:
    raise UserError('--workdir is required')
  if _CONFIG.value is None:
    raise UserError('--config is required')
  return _CONFIG.value, _WORKDIR.value


def prepare_workdir(workdir: str) -> str:
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir} exists and is not a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_probe.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--workdir {workdir} is not writable ({e.strerror or e})') from None
  return workdir


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv if argv is None else argv
  try:
    config, workdir = parse(argv)
    if config.stage not in STAGES:
      raise UserError(f'config.stage={config.stage!r} is not one of {sorted(STAGES)}')
    config_lib.validate(config)
    workdir = prepare_workdir(workdir)
    config_lib.write_or_check(config, workdir, write=False)
    stage = importlib.import_module(STAGES[config.stage])
    stage.run(config, workdir=workdir)
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
