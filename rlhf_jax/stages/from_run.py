"""What every stage that starts from an earlier run needs: the mesh, the world, the earlier
run's model loaded onto the mesh, the optimiser, and a step-0 state from given params."""
import functools
import os

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data import corpus, hf_tokenizer
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError
from rlhf_jax.stages import jsonl_data
from rlhf_jax.train import runs
from rlhf_jax.train.state import abstract_sharded, make_schedule
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

  def shardings(self, init_params):
    """The train state's shardings for a model whose params init_params(rng) makes."""
    _, shardings = abstract_sharded(init_params=init_params, tx=self.tx, rng=self.rng,
                                    mesh=self.mesh, mesh_config=self.config.mesh)
    return shardings

  def lm_state(self, params):
    """(state, shardings) of a language model starting at `params` (same model as init)."""
    dummy = np.ones((1, 8), np.int32)
    model = self.init.model
    shardings = self.shardings(
        lambda rng: model.init(rng, dummy, segment_ids=dummy, positions=dummy)['params'])
    with sharding.activate(self.mesh, self.config.mesh):
      state = state_from_params(params, tx=self.tx, rng=self.rng, shardings=shardings)
    return state, shardings

  def lm_train_step(self, shardings):
    """lm_step.train_step for the init run's model, jitted on the mesh with the state
    `shardings` (lm_state's) and the state donated: the step of every stage that fine-tunes
    the LM by next-token cross-entropy (SFT, the judge)."""
    from rlhf_jax.train import lm_step
    step = functools.partial(lm_step.train_step, model=self.init.model, tx=self.tx,
                             schedule=self.schedule, grad_accum=self.config.optim.grad_accum)
    return jax.jit(step, in_shardings=(shardings, self.batch_sharding),
                   out_shardings=(shardings, sharding.replicated(self.mesh)),
                   donate_argnums=(0,))

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
