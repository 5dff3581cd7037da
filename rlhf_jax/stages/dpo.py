"""DPO and IPO: the policy learns from preference pairs directly, against a frozen
reference (the SFT run named by init.run, which also initialises the policy).

Loss by `dpo.loss` ('dpo': -log sigmoid(beta h), 'ipo': (h - 1/(2 tau))^2, with
h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))). The reference's sequence
log-probs of every pair are computed once before training. Labels are hard: y_w is the
response the pair's label aggregate prefers (prefs.aggregate), its soft label is not used
(that is the reward model's). Evaluation reports the implicit
rewards on held-out pairs (`dpo_eval/*`) and, by sampling, the policy's gold reward and
sequence KL to the reference (`policy/*`).
"""
import functools

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import sharding
from rlhf_jax.data.row_source import RowSource, split_by_prompt
from rlhf_jax.stages import preference_data
from rlhf_jax.stages.from_run import FromRun, resolve  # noqa: F401  (main calls resolve)
from rlhf_jax.stages.policy_eval import PolicyEvaluator
from rlhf_jax.train import dpo_step, loop


def reference_logprobs(logprobs, params, pairs, *, batch_size: int, put):
  """(chosen, rejected) [N] sequence log-probs of every pair under `params`."""
  n = len(pairs)
  chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
  for lo in range(0, n, batch_size):
    rows = np.arange(lo, lo + batch_size)
    valid = rows < n
    rows = np.where(valid, rows, lo)
    c, r = jax.device_get(logprobs(params, put(preference_data.pair_rows(pairs, rows, valid))))
    chosen[rows[valid]], rejected[rows[valid]] = np.asarray(c)[valid], np.asarray(r)[valid]
  return chosen, rejected


class ImplicitRewardEval:
  """Implicit-reward accuracy and margin on the held-out pairs."""

  def __init__(self, *, batches, logprobs, put, beta: float):
    self.batches, self.logprobs, self.put, self.beta = batches, logprobs, put, beta

  def __call__(self, params) -> dict:
    margins, chosen_r = [], []
    for b in self.batches:
      c, r = jax.device_get(self.logprobs(params, self.put(b)))
      valid = np.asarray(b.weight) > 0
      rc = self.beta * (np.asarray(c, np.float64) - b.ref_chosen)[valid]
      rr = self.beta * (np.asarray(r, np.float64) - b.ref_rejected)[valid]
      margins.append(rc - rr)
      chosen_r.append(rc)
    margin = np.concatenate(margins)
    return {'dpo_eval/accuracy': float((margin > 0).mean()),
            'dpo_eval/margin': float(margin.mean()),
            'dpo_eval/chosen_reward': float(np.concatenate(chosen_r).mean())}


def run(config, *, workdir: str) -> None:
  setup = FromRun(config, rows_per_step=config.train.batch_size)
  given = preference_data.read_given(config)  # before DIR is written: a wrong set leaves it
  config_lib.write_or_check(config, workdir)
  pairs, _, _ = preference_data.load_or_make(config, setup, workdir=workdir, given=given)
  model = setup.init.model
  state, shardings = setup.lm_state(setup.init.params)
  put = lambda b: jax.device_put(b, sharding.batch_tree_sharding(setup.mesh, config.mesh, b))
  b = config.train.batch_size
  example = preference_data.pair_rows(pairs, np.zeros(b, int), np.ones(b, bool))
  batch_shardings = sharding.batch_tree_sharding(setup.mesh, config.mesh, example)
  logprobs = jax.jit(functools.partial(dpo_step.sequence_logprobs, model=model),
                     in_shardings=(shardings.params, batch_shardings))
  with sharding.activate(setup.mesh, config.mesh):
    ref_c, ref_r = reference_logprobs(logprobs, setup.init.params, pairs, batch_size=b, put=put)
  train_rows, held_rows = split_by_prompt(np.asarray(pairs.prompt_id),
                                          eval_fraction=config.prefs.eval_fraction,
                                          seed=config.seed)
  make_batch = functools.partial(preference_data.pair_rows, pairs, ref_chosen=ref_c,
                                 ref_rejected=ref_r)
  source = RowSource(train=train_rows, held_out=held_rows, batch_size=b, seed=config.seed,
                     make_batch=make_batch, what=f'preference pairs of {workdir}')
  d = config.dpo
  step = functools.partial(dpo_step.train_step, model=model, tx=setup.tx,
                           schedule=setup.schedule, loss=d.loss, beta=d.beta, tau=d.tau)
  step = jax.jit(step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=(0,))
  implicit = ImplicitRewardEval(batches=source.eval_batches(), logprobs=logprobs, put=put,
                                beta=d.beta)
  policy = PolicyEvaluator(config=config, world=setup.world, model=model, mesh=setup.mesh,
                           mesh_config=config.mesh, param_shardings=shardings.params,
                           ref_params=setup.init.params, dp=setup.dp)
  evaluate = lambda state: {**implicit(state.params), **policy(state.params)}
  static = {'dpo/train_pairs': len(train_rows), 'dpo/held_out_pairs': len(held_rows)}
  spec = loop.LoopSpec.from_config(
      config, workdir=workdir,
      tokens_per_step=2 * b * (pairs.prompts.shape[1] + pairs.chosen.shape[1]))
  with sharding.activate(setup.mesh, config.mesh):
    loop.run(spec=spec, state=state, state_shardings=shardings, step=step, source=source,
             put_batch=put, evaluate=evaluate, static_metrics=static)
