"""Earlier runs as inputs: read a run directory's resolved config and load the parameters
of one of its checkpoints onto the caller's mesh.

Later stages name the run they start from (`init.run`); the model and world blocks are
taken from that run's config.json so the loaded weights fit and the world is the one they
learned.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax.errors import UserError
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.models import lora, policy_value, reward_model
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.train import lora_state
from rlhf_jax.train.checkpoint import Checkpointer, CorruptCheckpoint
from rlhf_jax.train.state import abstract_sharded, make_optimizer


# The field that picks the checkpoint of the run a role names (-1 or unset: the newest).
_STEP_FIELDS = {'init.run': 'init.step', 'ppo.rm_run': 'ppo.rm_step',
                'grpo.rm_run': 'grpo.rm_step', '--workdir': '--step'}


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A run's resolved config, its model, and one checkpoint's params laid out on the
  caller's mesh as `param_shardings` say."""
  workdir: str
  config: ml_collections.ConfigDict
  model: object           # a Transformer, or a reward-model ensemble
  params: object
  step: int
  param_shardings: object


def read_config(workdir: str, *, role: str = 'run') -> ml_collections.ConfigDict:
  """DIR/config.json; `role` names the field that pointed here, for the error line."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{role} {workdir} holds no run (no config.json)')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e})') from None


def optimizer(config, *, updates: int | None = None):
  """The optimiser a run of `config` trains with, which also fixes the shape of the state
  its checkpoints hold; `updates`: its schedule length, if not train.steps. A reward
  model's ensemble members are clipped each by its own norm (make_optimizer's members)."""
  if config.get('stage') == 'import':
    return optax.identity()  # an imported checkpoint holds weights only (convert/hf_import.py)
  members = config.rm.ensemble if config.get('stage') == 'reward_model' else 0
  return make_optimizer(config.optim, updates or config.train.steps, members=members)


def lm_init(model: Transformer):
  """rng -> the boxed params of a language model `model`."""
  dummy = np.ones((1, 8), np.int32)
  return lambda rng: model.init(rng, dummy, segment_ids=dummy, positions=dummy)['params']


def load(workdir: str, *, mesh, mesh_config, step: int | None = None,
         role: str = 'run') -> LoadedRun:
  """The language model of the run in `workdir` at checkpoint `step` (None or -1: the
  newest), restored directly onto `mesh` with the layouts `mesh_config.rules` give. For a
  PPO run: its policy. A LoRA run (lora.rank > 0) is its base (`init.run` at `init.step`,
  loaded the same way) with its adapters merged in: the model is the base's."""
  workdir = os.path.abspath(workdir)
  config = read_config(workdir, role=role)
  model = Transformer(ModelConfig.from_config(config.model))
  if lora.enabled(config):
    return _load_lora(workdir, config, model=model, mesh=mesh, mesh_config=mesh_config,
                      step=step, role=role)
  if config.get('stage') == 'ppo':
    learner = policy_value.PolicyValue(model.cfg, config.ppo.value)
    updates = config.train.steps * config.ppo.epochs * config.ppo.minibatches
    run = _restore(workdir, config, model=model, init_params=policy_value.init_params(learner),
                   mesh=mesh, mesh_config=mesh_config, step=step, role=role,
                   updates=updates, extra={'kl_coef': jax.ShapeDtypeStruct((), jnp.float32)})
    return dataclasses.replace(run, params=run.params['policy'],
                               param_shardings=run.param_shardings['policy'])
  return _restore(workdir, config, model=model, init_params=lm_init(model), mesh=mesh,
                  mesh_config=mesh_config, step=step, role=role)


def load_reward_model(workdir: str, *, mesh, mesh_config, step: int | None = None,
                      role: str = 'run') -> LoadedRun:
  """The reward model (ensemble) of a reward_model run, as `load` does for an LM."""
  workdir = os.path.abspath(workdir)
  config = read_config(workdir, role=role)
  if config.get('stage') != 'reward_model':
    raise UserError(f'{role} {workdir} is a {config.get("stage")!r} run, not a reward_model run')
  model = reward_model.ensemble(ModelConfig.from_config(config.model), config.rm.ensemble,
                                config.rm.pooling)
  if lora.enabled(config):
    return _load_lora(workdir, config, model=model, mesh=mesh, mesh_config=mesh_config,
                      step=step, role=role)
  return _restore(workdir, config, model=model, init_params=reward_model.init_params(model),
                  mesh=mesh, mesh_config=mesh_config, step=step, role=role)


def _base_role(workdir: str, role: str) -> str:
  return f'the base of the LoRA run {workdir} ({role}), its init.run'


def _load_lora(workdir, config, *, model, mesh, mesh_config, step, role) -> LoadedRun:
  """A LoRA run of an LM (SFT, DPO; PPO's policy) or of a reward model (`model`, the plain
  ensemble): its checkpoint's adapters (and heads) restored, the base loaded from its
  pointer, and the two merged (lora.merge) into `model`'s params, laid out as the base's."""
  base = load(config.init.run, mesh=mesh, mesh_config=mesh_config, step=config.init.step,
              role=_base_role(workdir, role))
  adapted_cfg = lora.adapt(base.model.cfg, config.lora)
  scale = float(config.lora.alpha) / int(config.lora.rank)
  stage = config.get('stage')
  if stage == 'reward_model':
    adapted = reward_model.ensemble(adapted_cfg, config.rm.ensemble, config.rm.pooling)
    run = _restore(workdir, config, model=model, init_params=lora_state.trainable_init(
        reward_model.init_params(adapted), lm_keys=('trunk',)), mesh=mesh,
                   mesh_config=mesh_config, step=step, role=role)
    _, shardings = abstract_sharded(init_params=reward_model.init_params(model),
                                    tx=optax.identity(), rng=jax.random.key_data(
                                        jax.random.key(0)), mesh=mesh, mesh_config=mesh_config)
    k = config.rm.ensemble
    frozen = lambda lm: {'trunk': jax.tree.map(
        lambda t: jnp.broadcast_to(t, (k,) + t.shape), lm)}
    trainable, out_shardings = run.params, shardings.params
  elif stage == 'ppo':
    learner = policy_value.PolicyValue(adapted_cfg, config.ppo.value)
    updates = config.train.steps * config.ppo.epochs * config.ppo.minibatches
    run = _restore(workdir, config, model=model, init_params=lora_state.trainable_init(
        policy_value.init_params(learner), lm_keys=('policy', 'critic')), mesh=mesh,
                   mesh_config=mesh_config, step=step, role=role, updates=updates,
                   extra={'kl_coef': jax.ShapeDtypeStruct((), jnp.float32)})
    frozen = lambda lm: lm
    trainable, out_shardings = run.params['policy'], base.param_shardings
  else:
    run = _restore(workdir, config, model=model,
                   init_params=lora_state.trainable_init(lm_init(Transformer(adapted_cfg))),
                   mesh=mesh, mesh_config=mesh_config, step=step, role=role)
    frozen = lambda lm: lm
    trainable, out_shardings = run.params, base.param_shardings
  merged = jax.jit(lambda t, lm: lora.merge(lora.combine(t, frozen(lm)), scale=scale),
                   out_shardings=out_shardings)(trainable, base.params)
  return LoadedRun(workdir=workdir, config=config, model=model, params=merged, step=run.step,
                   param_shardings=out_shardings)


def _restore(workdir, config, *, model, init_params, mesh, mesh_config, step, role,
             updates: int | None = None, extra: dict | None = None):
  """`extra`: fields a stage's state adds to TrainState (replicated), e.g. PPO's kl_coef;
  `updates`: the optimiser's schedule length, if not train.steps."""
  step = checkpoint_step(workdir, step=step, role=role)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.train.keep_ckpts)
  try:
    # The run's own optimiser fixes the shape of the state that was saved.
    abstract, shardings = abstract_sharded(
        init_params=init_params, tx=optimizer(config, updates=updates),
        rng=jax.random.key_data(jax.random.key(0)), mesh=mesh, mesh_config=mesh_config)
    if extra:
      state_type = _extended_state(tuple(extra))
      fields = lambda s: {f: getattr(s, f) for f in ('step', 'params', 'opt_state', 'rng')}
      abstract = state_type(**fields(abstract), **extra)
      shardings = state_type(**fields(shardings),
                             **{k: sharding_lib.replicated(mesh) for k in extra})
    try:
      state, _ = ckpt.restore(step, state_shardings=shardings, like_state=abstract)
    except CorruptCheckpoint as e:
      # Another run's checkpoint: never moved aside or replaced by an earlier one unasked.
      others = [s for s in ckpt.all_steps() if s != step]
      field = _STEP_FIELDS.get(role, 'its step field')
      raise UserError(f'{role} {workdir}: checkpoint {step} cannot be restored ({e.reason}); '
                      f'choose another of its checkpoints ({others or "it has none"}) with '
                      f'{field}') from None
  finally:
    ckpt.close()
  return LoadedRun(workdir=workdir, config=config, model=model, params=state.params,
                   step=step, param_shardings=shardings.params)


def checkpoint_step(workdir: str, *, step: int | None, role: str = 'run') -> int:
  """The step `load` restores from the run in `workdir` (None or -1: its newest), checked
  to exist without reading it: stages call it before they write their own DIR."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise UserError(f'{role} {workdir} has no checkpoints yet')
  ckpt = Checkpointer(directory, keep=None)  # None: a reader never collects old steps
  try:
    steps = ckpt.all_steps()
  finally:
    ckpt.close()
  if step is None or step < 0:
    if not steps:
      raise UserError(f'{role} {workdir} has no checkpoints yet')
    return steps[-1]
  if step not in steps:
    raise UserError(f'{role} {workdir} has no checkpoint at step {step} '
                    f'(it has {steps or "none"})')
  return step


def _extended_state(names: tuple):
  if names == ('kl_coef',):
    from rlhf_jax.train.ppo_step import PPOState
    return PPOState
  raise ValueError(f'no train state with the extra fields {names}')


def adopt(config: ml_collections.ConfigDict, *, role: str = 'init.run',
          text_ok: bool = False) -> bool:
  """Copies the model and world blocks of the run named by config.init.run into `config`
  (whose model and world the run's weights fix). Checks the run exists first. Returns
  whether it is a run on text: trained on a text source, or holding a tokenizer (a stage
  run on a user's JSONL, stages/jsonl_data.py), which only a stage on JSONL (`text_ok`)
  may start from."""
  if not config.init.run:
    raise UserError(f'{role} is empty: name the run directory this stage starts from')
  earlier = read_config(os.path.abspath(config.init.run), role=role)
  for block in ('model', 'world'):
    if block not in earlier:
      raise UserError(f'{role} {config.init.run}: its config.json has no {block} block')
  source = earlier.get('data', {}).get('source', 'world')
  tokenizer = os.path.join(os.path.abspath(config.init.run), 'tokenizer.model')
  from rlhf_jax.data import hf_tokenizer
  text = (source != 'world' or os.path.exists(tokenizer)
          or hf_tokenizer.origin(os.path.abspath(config.init.run)) is not None)
  if text and not text_ok:
    trained_on = repr(source) if source != 'world' else 'a JSONL file (it holds a tokenizer)'
    raise UserError(f'{role} {config.init.run} was trained on {trained_on}; '
                    'this stage needs a run on the world, or a JSONL source of its rows '
                    "(sft.data / prefs.data / ppo.data = 'jsonl:PATH', for sft, "
                    'reward_model, dpo and ppo)')
  with config.unlocked():
    config.model = ml_collections.ConfigDict(earlier.model.to_dict())
    config.world = ml_collections.ConfigDict(earlier.world.to_dict())
  return text
