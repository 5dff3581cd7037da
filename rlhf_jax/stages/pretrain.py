"""Pretraining: next-token prediction on the world's true language or on a text corpus.

On the world, evaluation reports `eval/true_kl`, the per-token KL from the true language
to the model on fresh true sequences: mean of (log p_true - log q_model) over tokens.
"""
import functools

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, sharding
from rlhf_jax.data.sources import make_source
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.train import lm_step, loop
from rlhf_jax.train.state import create_sharded, make_optimizer, make_schedule
from rlhf_jax.world import language


def build_model(config, vocab_size: int) -> Transformer:
  with config.unlocked():
    config.model.vocab_size = vocab_size
  return Transformer(ModelConfig.from_config(config.model))


def dummy_batch(config):
  from rlhf_jax.data.batch import from_rows
  rows = np.ones((config.train.batch_size, config.train.seq_len + 1), np.int32)
  return from_rows(rows, pad_id=0)


class Setup:
  """Everything a pretraining run (or the benchmark) needs, built once."""

  def __init__(self, config, *, workdir: str, devices=None, source=None):
    """`source`: the data to train on; default the one `config.data.source` names."""
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, devices)
    dp = sharding.data_parallel_size(self.mesh, config.mesh)
    micro = config.train.batch_size // config.optim.grad_accum
    if micro % dp:
      raise UserError(f'train.batch_size={config.train.batch_size} / optim.grad_accum='
                      f'{config.optim.grad_accum} = {micro} sequences per microbatch is not '
                      f'divisible by the data-parallel size {dp} of the mesh')
    self.source = source or make_source(config, workdir=workdir)
    self.model = build_model(config, self.source.vocab_size)
    self.tx = make_optimizer(config.optim, config.train.steps)
    self.schedule = make_schedule(config.optim, config.train.steps)
    batch = dummy_batch(config)
    init_params = lambda rng: self.model.init(
        rng, batch.inputs, segment_ids=batch.segment_ids, positions=batch.positions)['params']
    self.state, self.state_shardings = create_sharded(
        init_params=init_params, tx=self.tx, rng=jax.random.key_data(jax.random.key(config.seed)),
        mesh=self.mesh, mesh_config=config.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh, config.mesh)
    step = functools.partial(lm_step.train_step, model=self.model, tx=self.tx,
                             schedule=self.schedule, grad_accum=config.optim.grad_accum)
    metric_sharding = sharding.replicated(self.mesh)
    self.step = jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                        out_shardings=(self.state_shardings, metric_sharding),
                        donate_argnums=(0,))
    # Summed on device: a replicated scalar, which every process of a multi-host run can read.
    self.eval_logprob_sum = jax.jit(
        lambda params, batch: lm_step.eval_logprobs(params, batch, model=self.model).sum(),
        in_shardings=(self.state_shardings.params, self.batch_sharding),
        out_shardings=metric_sharding)

  def put_batch(self, batch):
    return distributed.put_global(batch, self.batch_sharding)


class Evaluator:
  """Held-out loss; on the world also the true KL, from fixed fresh true sequences.

  source: its eval_batches and world (a Language or None); logprob_sum(params, batch): the
  batch's summed target log-probs, a replicated scalar; put_batch lays a batch out."""

  def __init__(self, *, source, logprob_sum, put_batch, num_batches: int):
    self.logprob_sum, self.put_batch = logprob_sum, put_batch
    self.batches = source.eval_batches(max_batches=num_batches)
    self.weight = sum(float(b.weights.sum()) for b in self.batches)
    if self.weight == 0:
      raise UserError('the held-out set has no tokens to evaluate on')
    self.true_logp_sum = None
    lang = source.world
    if lang is not None:
      total = 0.0
      for b in self.batches:
        rows = np.concatenate([b.inputs[:, :1], b.targets], axis=1)
        lp = np.asarray(language.token_logprobs(lang, tokens=rows), np.float64)
        total += float((lp * b.weights).sum())
      self.true_logp_sum = total

  def __call__(self, state) -> dict:
    return self.of_params(state.params)

  def of_params(self, params) -> dict:
    model_sum = 0.0
    for b in self.batches:
      model_sum += float(self.logprob_sum(params, self.put_batch(b)))
    out = {'eval/loss': -model_sum / self.weight,
           'eval/perplexity': float(np.exp(-model_sum / self.weight))}
    if self.true_logp_sum is not None:
      out['eval/true_kl'] = (self.true_logp_sum - model_sum) / self.weight
    return out


def run(config, *, workdir: str, source=None, init_params=None) -> None:
  """Trains (or resumes) in `workdir`. A loop may hand in its own `source` and, for a run
  with no checkpoint yet, the `init_params` to start from instead of a fresh init."""
  setup = Setup(config, workdir=workdir, source=source)
  config_lib.write_or_check(config, workdir)
  if init_params is not None:
    setup.state = setup.state.replace(
        params=jax.device_put(init_params, setup.state_shardings.params))
  evaluate = Evaluator(source=setup.source, logprob_sum=setup.eval_logprob_sum,
                       put_batch=setup.put_batch, num_batches=config.train.eval_batches)
  static = {}
  if setup.source.world is not None:
    static = {'world/entropy_rate': setup.source.stats['entropy_rate'],
              'world/expected_length': setup.source.stats['expected_length']}
  # What reading a text corpus repaired or left out (a loop's row source has no such count).
  static.update({f'data/{k}': setup.source.stats[k]
                 for k in ('invalid_bytes_replaced', 'skipped_files')
                 if k in setup.source.stats})
  spec = loop.LoopSpec.from_config(
      config, workdir=workdir, tokens_per_step=config.train.batch_size * config.train.seq_len)
  with sharding.activate(setup.mesh, config.mesh):
    loop.run(spec=spec, state=setup.state, state_shardings=setup.state_shardings,
             step=setup.step, source=setup.source, put_batch=setup.put_batch,
             evaluate=evaluate, static_metrics=static)
