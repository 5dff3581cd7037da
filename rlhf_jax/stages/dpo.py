"""DPO and its family: the policy learns from preference pairs directly, against a frozen
reference (the SFT run named by init.run, which also initialises the policy).

Loss by `dpo.loss`, one of train/preference_losses.LOSSES (dpo, ipo, ipo_mean, cdpo,
robust_dpo, hinge, kto, orpo, simpo, apo_zero; their formulas and papers are there). The
reference's sequence log-probs of every pair are computed once before training, and not
at all for the reference-free losses (orpo, simpo). Labels are hard: y_w is the response
the pair's label aggregate prefers (prefs.aggregate), its soft label is not used (that is
the reward model's). Evaluation reports the loss's implicit rewards on held-out pairs
(`dpo_eval/*`) and, by sampling, the policy's gold reward and sequence KL to the reference
(`policy/*`: a measurement, so it scores the reference policy whatever the loss).
With prefs.data='jsonl:PATH' the pairs are a user's file (stages/jsonl_data.py) and
dpo_eval/* on its held-out prompts is the evaluation: a run on text has no world.
"""
import functools

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, sharding
from rlhf_jax.data.row_source import RowSource, split_by_prompt
from rlhf_jax.stages import jsonl_data, preference_data
from rlhf_jax.stages.from_run import FromRun, resolve  # noqa: F401  (main calls resolve)
from rlhf_jax.stages.policy_eval import PolicyEvaluator
from rlhf_jax.train import dpo_step, loop, preference_losses


def reference_logprobs(logprobs, params, n: int, make_rows, *, batch_size: int, put):
  """The [N] float32 arrays `logprobs(params, batch)` returns (a tuple of [B]), for the
  batches `make_rows(rows, valid)` of rows 0..n-1."""
  out = None
  for lo in range(0, n, batch_size):
    rows = np.arange(lo, lo + batch_size)
    valid = rows < n
    rows = np.where(valid, rows, lo)
    got = distributed.to_host(logprobs(params, put(make_rows(rows, valid))))
    if out is None:
      out = tuple(np.zeros(n, np.float32) for _ in got)
    for o, g in zip(out, got):
      o[rows[valid]] = np.asarray(g)[valid]
  return out


class ImplicitRewardEval:
  """Implicit-reward accuracy and margin on the held-out pairs, by the loss's own
  implicit reward (preference_losses.implicit_rewards)."""

  def __init__(self, *, batches, logprobs, put, loss: str, beta: float):
    self.batches, self.logprobs, self.put = batches, logprobs, put
    self.loss, self.beta = loss, beta

  def __call__(self, params) -> dict:
    margins, chosen_r = [], []
    for b in self.batches:
      c, r = distributed.to_host(self.logprobs(params, self.put(b)))
      valid = np.asarray(b.weight) > 0
      lp = preference_losses.PairLogps(
          policy_chosen=np.asarray(c, np.float64), policy_rejected=np.asarray(r, np.float64),
          ref_chosen=b.ref_chosen, ref_rejected=b.ref_rejected,
          chosen_length=b.chosen_mask.sum(1), rejected_length=b.rejected_mask.sum(1),
          weight=b.weight)
      rc, rr = (np.asarray(x)[valid] for x in
                preference_losses.implicit_rewards(self.loss, lp, self.beta))
      margins.append(rc - rr)
      chosen_r.append(rc)
    margin = np.concatenate(margins)
    return {'dpo_eval/accuracy': float((margin > 0).mean()),
            'dpo_eval/margin': float(margin.mean()),
            'dpo_eval/chosen_reward': float(np.concatenate(chosen_r).mean())}


def run(config, *, workdir: str) -> None:
  # Before DIR is written, and before the init run is loaded: a wrong set leaves DIR as it
  # was and is reported without the wait.
  given = preference_data.read_given(config, workdir=workdir)
  setup = FromRun(config, rows_per_step=config.train.batch_size)
  config_lib.write_or_check(config, workdir)
  pairs, lineages, _ = preference_data.load_or_make(config, setup, workdir=workdir,
                                                    given=given)
  model = setup.model  # the init run's, with adapters under LoRA
  state, shardings = setup.lm_state(setup.init.params)
  param_shardings = setup.full_shardings(shardings.params)
  # The reference is the init run's model as loaded (under LoRA, not the adapted one).
  ref_model, ref_shardings = ((setup.init.model, setup.init.param_shardings) if setup.lora
                              else (model, shardings.params))
  put = lambda b: distributed.put_global(
      b, sharding.batch_tree_sharding(setup.mesh, config.mesh, b))
  b = config.train.batch_size
  d = config.dpo
  entry = preference_losses.LOSSES[d.loss]
  ref = {}
  if entry.mismatched_kl:
    ref['partner'] = preference_losses.kto_partners(np.asarray(pairs.prompt_id),
                                                    seed=config.seed)
  rows_of = functools.partial(preference_data.pair_rows, pairs, **ref)
  batch_shardings = sharding.batch_tree_sharding(setup.mesh, config.mesh,
                                                 rows_of(np.zeros(b, int), np.ones(b, bool)))
  jit = lambda f, model=model, params=param_shardings: jax.jit(
      functools.partial(f, model=model), in_shardings=(params, batch_shardings))
  logprobs = jit(dpo_step.sequence_logprobs)
  ref_logprobs = (jit(dpo_step.sequence_logprobs, ref_model, ref_shardings) if setup.lora
                  else logprobs)
  if not entry.reference_free:  # reference-free losses never score the reference
    with sharding.activate(setup.mesh, config.mesh):
      ref['ref_chosen'], ref['ref_rejected'] = reference_logprobs(
          ref_logprobs, setup.init.params, len(pairs), rows_of, batch_size=b, put=put)
      if entry.mismatched_kl:
        mismatched = jit(lambda p, x, model: (dpo_step.mismatched_logprobs(p, x, model=model),),
                         ref_model, ref_shardings)
        ref['ref_kl'], = reference_logprobs(mismatched, setup.init.params, len(pairs),
                                            rows_of, batch_size=b, put=put)
  train_rows, held_rows = split_by_prompt(np.asarray(pairs.prompt_id),
                                          eval_fraction=config.prefs.eval_fraction,
                                          seed=config.seed)
  make_batch = functools.partial(preference_data.pair_rows, pairs, **ref)
  source = RowSource(train=train_rows, held_out=held_rows, batch_size=b, seed=config.seed,
                     make_batch=make_batch, what=f'preference pairs of {workdir}')
  hparams = {k: float(v) for k, v in d.items() if k != 'loss'}
  step = functools.partial(dpo_step.train_step, model=model, tx=setup.tx,
                           schedule=setup.schedule, loss=d.loss, hparams=hparams)
  step = setup.jit_step(step, shardings, batch_shardings)
  implicit = ImplicitRewardEval(batches=source.eval_batches(), logprobs=logprobs, put=put,
                                loss=d.loss, beta=d.beta)
  static = {'dpo/train_pairs': len(train_rows), 'dpo/held_out_pairs': len(held_rows),
            **setup.static_metrics()}
  if jsonl_data.source(config) is None:
    policy = PolicyEvaluator(config=config, world=setup.world, model=model, mesh=setup.mesh,
                             mesh_config=config.mesh, param_shardings=param_shardings,
                             ref_params=setup.init.params, dp=setup.dp,
                             ref_model=setup.ref_model(), ref_param_shardings=ref_shardings)
  else:  # a user's pairs on a run on text: no world to sample against
    policy = lambda params: {}
    static.update(jsonl_data.static_metrics(lineages[0], 'dpo'))
  evaluate = lambda state: {**implicit(setup.full(state.params)),
                            **policy(setup.full(state.params))}
  spec = loop.LoopSpec.from_config(
      config, workdir=workdir,
      tokens_per_step=2 * b * (pairs.prompts.shape[1] + pairs.chosen.shape[1]))
  with sharding.activate(setup.mesh, config.mesh):
    loop.run(spec=spec, state=state, state_shardings=shardings, step=step, source=source,
             put_batch=put, evaluate=evaluate, static_metrics=static)
