"""Running one stage's config in a run directory: the registry of stages and the checks
every run goes through before any compute (used by the CLI and by multi-stage loops)."""
import importlib
import os

from rlhf_jax import config as config_lib
from rlhf_jax.errors import UserError

STAGES = {
    'pretrain': 'rlhf_jax.stages.pretrain',
    'sft': 'rlhf_jax.stages.sft',
    'reward_model': 'rlhf_jax.stages.reward_model',
    'dpo': 'rlhf_jax.stages.dpo',
    'ppo': 'rlhf_jax.stages.ppo',
    'pipeline': 'rlhf_jax.loops.pipeline',
    'rlhf_rounds': 'rlhf_jax.loops.rlhf_rounds',
    'collapse': 'rlhf_jax.loops.collapse',
    'selfplay': 'rlhf_jax.loops.selfplay',
}


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
  if hasattr(stage, 'resolve'):  # fills fields from the earlier run it starts from
    stage.resolve(config)
  workdir = prepare_workdir(workdir)
  config_lib.write_or_check(config, workdir, write=False)
  stage.run(config, workdir=workdir)
