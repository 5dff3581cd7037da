"""Running one stage's config in a run directory: the registry of stages and the checks
every run goes through before any compute (used by the CLI and by multi-stage loops)."""
import copy
import importlib
import json
import os

from rlhf_jax import config as config_lib
from rlhf_jax.errors import UserError

STAGES = {
    'pretrain': 'rlhf_jax.stages.pretrain',
    'sft': 'rlhf_jax.stages.sft',
    'reward_model': 'rlhf_jax.stages.reward_model',
    'dpo': 'rlhf_jax.stages.dpo',
    'ppo': 'rlhf_jax.stages.ppo',
    'grpo': 'rlhf_jax.stages.grpo',
    'distill': 'rlhf_jax.stages.distill',
    'judge': 'rlhf_jax.stages.judge',
    'pipeline': 'rlhf_jax.loops.pipeline',
    'rlhf_rounds': 'rlhf_jax.loops.rlhf_rounds',
    'collapse': 'rlhf_jax.loops.collapse',
    'selfplay': 'rlhf_jax.loops.selfplay',
    'self_improve': 'rlhf_jax.loops.self_improve',
    'constitutional': 'rlhf_jax.loops.constitutional',
}

# The stages that run on several processes (one GSPMD program over every host's devices),
# tested against one process in tests/test_multihost.py: their host reads of sharded
# outputs go through distributed.to_host, their host inputs through distributed.put_global,
# and the files they make are written by process 0 behind barriers. A stage added to
# STAGES without that work stays out of this list, and a multi-process run of it is refused
# before any compute rather than run wrong.
MULTI_PROCESS = ('pretrain', 'sft', 'reward_model', 'dpo', 'ppo', 'grpo', 'distill',
                 'pipeline', 'rlhf_rounds', 'collapse', 'selfplay', 'self_improve')


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


def module(config):
  if config.stage not in STAGES:
    raise UserError(f'config.stage={config.stage!r} is not one of {sorted(STAGES)}')
  return module_of(config.stage)


def last_logged_step(flat: dict) -> int | None:
  """The step a finished run of the flattened config `flat` logs last (None when the config
  does not say). A stage or loop module that does not log one line per train step
  declares `last_logged_step(flat)`; the others end at train.steps."""
  stage = flat.get('stage')
  declared = getattr(module_of(stage), 'last_logged_step', None) if stage in STAGES else None
  if declared is not None:
    return declared(flat)
  steps = flat.get('train.steps')
  return steps if isinstance(steps, int) else None


def module_of(stage: str):
  return importlib.import_module(STAGES[stage])


def run(config, workdir: str) -> None:
  """Validates, resolves fields from earlier runs, checks DIR/config.json, then trains
  (or resumes) in `workdir`."""
  stage = module(config)
  config_lib.validate(config)
  check_processes(config)
  check_attention(config)
  if hasattr(stage, 'resolve'):  # fills fields from the earlier run it starts from
    stage.resolve(config)
  before = _fresh_paths(workdir)
  workdir = prepare_workdir(workdir)
  config_lib.write_or_check(config, workdir, write=False)
  try:
    stage.run(config, workdir=workdir)
  except UserError:
    _remove_if_nothing_computed(workdir, before)
    raise


def finished(config, workdir: str) -> bool:
  """Whether `workdir` holds a finished run of `config`: its config.json passes the check
  `run` makes (a different config is refused here as there), metrics.jsonl ends at the
  step a finished run logs last, and the checkpoint of that step is in place. A loop passes
  over such a run without re-entering it (building its models only to find nothing to do);
  anything less, and the loop runs it, which resumes it."""
  workdir = os.path.abspath(workdir)
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    return False
  config = copy.deepcopy(config)
  stage = module(config)
  config_lib.validate(config)
  if hasattr(stage, 'resolve'):
    stage.resolve(config)
  config_lib.write_or_check(config, workdir, write=False)
  last = last_logged_step(config_lib.flatten(config_lib.to_dict(config)))
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = f.read().splitlines()
    logged = json.loads(lines[-1])['step'] if lines else None
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return last is not None and logged == last and config_lib.newest_checkpoint(workdir) == last


def check_processes(config) -> None:
  """Refuses a multi-process run of a stage whose host-side work has not been made
  multi-process (and tested against one process) yet; a loop's stages are checked as they
  would be on their own."""
  import jax
  if jax.process_count() == 1:
    return
  stage = config.stage
  if stage not in MULTI_PROCESS:
    raise UserError(f'stage {stage} runs in one process only (this run has '
                    f'{jax.process_count()}; only {", ".join(MULTI_PROCESS)} runs on several); '
                    'use one host with all its devices')
  from rlhf_jax.stages import jsonl_data
  src = jsonl_data.source(config)
  if src is not None:
    raise UserError(f'stage {stage} on a JSONL file ({src.field}) runs in one process only '
                    f'(this run has {jax.process_count()}); use one host with all its devices')
  if 'judge' in config:
    raise UserError(f'AI feedback (the judge block of stage {stage}) runs in one process '
                    f'only (this run has {jax.process_count()}); use one host with all its '
                    'devices')
  for sub in config.get('stages', {}).values():
    check_processes(sub)


def check_attention(config) -> None:
  """Refuses an attention kernel (model.attention) that this backend cannot run, here
  rather than at the first forward; a loop's stages are checked as they would be alone."""
  for sub in config.get('stages', {}).values():
    check_attention(sub)
  if 'model' not in config or 'attention' not in config.model:
    return
  import jax
  from rlhf_jax.models import attention_kernels
  m = config.model
  device = jax.devices()[0]
  problem = attention_kernels.backend_error(
      m.attention, backend=jax.default_backend(),
      head_dim=m.get('head_dim', 0) or m.d_model // m.n_heads,
      compute_capability=getattr(device, 'compute_capability', None))
  if problem:
    raise UserError(problem)


def _fresh_paths(workdir: str) -> set | None:
  """The paths under a DIR that holds no run yet (no config.json): what was there before
  this call, which a failure must leave exactly as it was. None for a DIR with a run."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(os.path.join(workdir, 'config.json')):
    return None
  found = set()
  for root, dirs, files in os.walk(workdir):
    found.update(os.path.join(root, n) for n in dirs + files)
  return found | ({workdir} if os.path.isdir(workdir) else set())


def _remove_if_nothing_computed(workdir: str, before: set | None) -> None:
  """A run that stopped on bad input before it computed anything leaves DIR as it found it,
  so that the corrected command is not refused as "a different config": when this call
  created config.json and nothing but empty folders besides, those go again. Anything
  else it made (a tokenizer, a preference set, a checkpoint) stays, and so does the
  config.json that describes it. Stages check their inputs before writing config.json;
  this catches the checks a loop's inner stages make later."""
  import jax
  if before is None or jax.process_index() != 0:
    return
  made_files, made_dirs = [], []
  for root, dirs, files in os.walk(workdir):
    made_files += [os.path.join(root, n) for n in files if os.path.join(root, n) not in before]
    made_dirs += [os.path.join(root, n) for n in dirs if os.path.join(root, n) not in before]
  config_json = os.path.join(workdir, 'config.json')
  if any(f != config_json for f in made_files):
    return
  if config_json in made_files:
    os.remove(config_json)
  for d in sorted(made_dirs + ([workdir] if workdir not in before else []), reverse=True):
    try:
      os.rmdir(d)  # only if empty: deepest first
    except OSError:
      pass
