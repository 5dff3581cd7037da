"""What every stage that starts from an earlier run needs: the mesh, the world, the earlier
run's model loaded onto the mesh, the optimiser, and a step-0 state from given params.

With a `lora` block of rank > 0 (docs/lora.md) the model a stage trains is the init run's
with adapters (`model`); the state holds only what trains and the init run's params are
the frozen base (`frozen`), which the step takes as an argument (train/lora_state.py);
`full` and `full_shardings` give the whole adapted model's params for evaluation."""
import functools
import os

import jax

from rlhf_jax import sharding
from rlhf_jax.data import corpus, hf_tokenizer
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError
from rlhf_jax.models import lora
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.stages import jsonl_data
from rlhf_jax.train import lora_state, runs
from rlhf_jax.train.state import abstract_sharded, create_sharded, make_schedule
from rlhf_jax.train.state import state_from_params
from rlhf_jax.world import setup as world_setup


def resolve(config) -> None:
  """Called by main before the config is checked against DIR/config.json: the model and
  world are those of the run named by init.run, whose checkpoint init.step must exist.
  init.step=-1 (the newest) is pinned to the step that is newest now, so that config.json
  says which checkpoint the run started from, and a rerun after init.run was extended is
  refused as a different config (differs at init.step) rather than resumed against
  another reference; --config.init.step=N continues it from N.

  A stage on a user's JSONL (stages/jsonl_data.py) starts from a run on text (one with a
  tokenizer), and only such a stage does."""
  src = jsonl_data.validate(config)
  runs.adopt(config, text_ok=src is not None)
  if src is not None:
    jsonl_data.check_init_run(src, config.init.run)
  config.init.step = runs.checkpoint_step(config.init.run, step=config.init.step,
                                          role='init.run')
  if lora.enabled(config):
    resolve_lora(config)


def resolve_lora(config) -> None:
  """A LoRA run's checks against its model, and its pointer to the base made absolute: its
  checkpoints hold adapters only, and runs.load finds the base by init.run from anywhere."""
  kernels = lora.kernels_of(ModelConfig.from_config(config.model))
  missing = [t for t in lora.targets_of(config.lora) if t not in kernels]
  if missing:
    raise UserError(f'lora.targets names {missing[0]!r}, which a model.mlp='
                    f'{config.model.mlp!r} model has no kernel of (it has {", ".join(kernels)})')
  if 'task' in config or config.get('ppo', {}).get('reward') == 'task':
    raise UserError(f'lora.rank={config.lora.rank}: a run against a task\'s verifier (the '
                    'task block) does not train with adapters')
  config.init.run = os.path.abspath(config.init.run)


class FromRun:
  """mesh, dp (data-parallel size), world, init (the earlier run, loaded), tx, schedule."""

  def __init__(self, config, *, rows_per_step: int, updates_per_step: int = 1):
    """updates_per_step: optimiser updates a train step takes (RL stages take several on
    one batch of rollouts), so that the lr schedule spans all of them."""
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh)
    self.dp = sharding.data_parallel_size(self.mesh, config.mesh)
    if rows_per_step % self.dp:
      raise UserError(f'{rows_per_step} rows per step (train.batch_size) are not divisible '
                      f'by the data-parallel size {self.dp} of the mesh')
    self.world = world_setup.from_config(config)
    self.init = runs.load(config.init.run, mesh=self.mesh, mesh_config=config.mesh,
                          step=config.init.step, role='init.run')
    updates = config.train.steps * updates_per_step
    self.tx = runs.optimizer(config, updates=updates)
    self.schedule = make_schedule(config.optim, updates)
    self.rng = jax.random.key_data(jax.random.key(config.seed))
    self.batch_sharding = sharding.batch_sharding(self.mesh, config.mesh)
    self.lora = lora.enabled(config)
    # The model the stage trains and evaluates; without LoRA, the init run's.
    self.model = (Transformer(lora.adapt(self.init.model.cfg, config.lora)) if self.lora
                  else self.init.model)
    # LoRA: the frozen base params the step takes beside the state, and their shardings.
    self.frozen, self.frozen_shardings = None, None

  def shardings(self, init_params):
    """The train state's shardings for a model whose params init_params(rng) makes."""
    _, shardings = abstract_sharded(init_params=init_params, tx=self.tx, rng=self.rng,
                                    mesh=self.mesh, mesh_config=self.config.mesh)
    return shardings

  def lm_state(self, params):
    """(state, shardings) of a language model starting at `params` (same model as init).
    With LoRA, `params` become the frozen base and the state holds the adapters alone."""
    if self.lora:
      return self.adapter_state(runs.lm_init(self.model), params,
                                self.init.param_shardings)
    shardings = self.shardings(runs.lm_init(self.init.model))
    with sharding.activate(self.mesh, self.config.mesh):
      state = state_from_params(params, tx=self.tx, rng=self.rng, shardings=shardings)
    return state, shardings

  def adapter_state(self, init_params, frozen, frozen_shardings, *, lm_keys=None):
    """(state, shardings) of a LoRA stage: the trainable part of the adapted model's
    init_params (adapters at B = 0, and heads) with a fresh optimiser state over them
    alone; `frozen` (the base, laid out as frozen_shardings) is kept for the step."""
    self.frozen, self.frozen_shardings = frozen, frozen_shardings
    self.memory = lora_state.memory_metrics(self.tx, init_params, self.rng, lm_keys=lm_keys)
    return create_sharded(init_params=lora_state.trainable_init(init_params, lm_keys=lm_keys),
                          tx=self.tx, rng=self.rng, mesh=self.mesh,
                          mesh_config=self.config.mesh)

  def full(self, params):
    """The whole model's params from a state's (with LoRA: adapters and base together)."""
    return lora.combine(params, self.frozen)

  def full_shardings(self, param_shardings):
    return lora.combine(param_shardings, self.frozen_shardings)

  def static_metrics(self) -> dict:
    """lora/* parameter counts and optimiser-state bytes (lora_state.memory_metrics), once
    at step 0; nothing without LoRA."""
    return dict(self.memory) if self.lora else {}

  def ref_model(self):
    """The reference's model for evaluators when it is not the trained one (LoRA)."""
    return self.init.model if self.lora else None

  def bind_frozen(self, jitted):
    """step(state, batch) of a step jitted as (state, batch, frozen) with LoRA; as it is
    without."""
    if not self.lora:
      return jitted
    frozen = self.frozen
    return lambda state, batch: jitted(state, batch, frozen)

  def jit_step(self, step, shardings, batch_shardings):
    """`step` (state, batch[, frozen]) jitted on the mesh with the state donated, as a
    step(state, batch) for loop.run."""
    ins = (shardings, batch_shardings) + ((self.frozen_shardings,) if self.lora else ())
    return self.bind_frozen(jax.jit(step, in_shardings=ins,
                                    out_shardings=(shardings, sharding.replicated(self.mesh)),
                                    donate_argnums=(0,)))

  def lm_train_step(self, shardings):
    """lm_step.train_step for the init run's model, jitted on the mesh with the state
    `shardings` (lm_state's) and the state donated: the step of every stage that fine-tunes
    the LM by next-token cross-entropy (SFT, the judge)."""
    from rlhf_jax.train import lm_step
    step = functools.partial(lm_step.train_step, model=self.model, tx=self.tx,
                             schedule=self.schedule, grad_accum=self.config.optim.grad_accum)
    return self.jit_step(step, shardings, self.batch_sharding)

  def tokenizer(self):
    """The init run's sentencepiece tokenizer (a run on a text corpus keeps it in its
    workdir), the imported checkpoint's own (data/hf_tokenizer.py) when the init run
    descends from one, or None for a run on the world."""
    path = os.path.join(self.init.workdir, corpus.TOKENIZER_FILE)
    if os.path.exists(path):
      return tokenizer_lib.load_tokenizer(model_path=path)
    return hf_tokenizer.load_for_run(self.init.workdir)

  def lineage(self) -> dict:
    return {'init_run': self.init.workdir, 'init_step': self.init.step}

  def round_rows(self, n: int) -> int:
    """n rounded up to a whole number of rows per data-parallel shard."""
    return -(-n // self.dp) * self.dp
