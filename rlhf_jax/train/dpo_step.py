"""The DPO / IPO train step on preference pairs, against reference log-probs computed once
(the reference policy is frozen, so its sequence log-probs are data)."""
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.data.batch import PairBatch
from rlhf_jax.sampling import score
from rlhf_jax.train.state import TrainState


def sequence_logprobs(params, batch: PairBatch, *, model):
  """(chosen, rejected) sequence log-probs [B] of the responses under `params`, one
  forward over the chosen and rejected rows together."""
  b = batch.prompts.shape[0]
  prompts = jnp.concatenate([batch.prompts, batch.prompts])
  lengths = jnp.concatenate([batch.prompt_lengths, batch.prompt_lengths])
  responses = jnp.concatenate([batch.chosen, batch.rejected])
  masks = jnp.concatenate([batch.chosen_mask, batch.rejected_mask])
  logp = (score(params, prompts, lengths, responses, model=model) * masks).sum(axis=1)
  return logp[:b], logp[b:]


LOSSES = {
    'dpo': lambda pc, pr, rc, rr, *, beta, tau: losses.dpo(pc, pr, rc, rr, beta=beta),
    'ipo': lambda pc, pr, rc, rr, *, beta, tau: losses.ipo(pc, pr, rc, rr, tau=tau),
}


def train_step(state: TrainState, batch: PairBatch, *, model, tx, schedule, loss: str,
               beta: float, tau: float):
  """One update; metrics report the implicit rewards beta * (log pi - log ref)."""
  def loss_fn(params):
    chosen, rejected = sequence_logprobs(params, batch, model=model)
    per = LOSSES[loss](chosen, rejected, batch.ref_chosen, batch.ref_rejected,
                       beta=beta, tau=tau)
    w = batch.weight
    return (per * w).sum() / jnp.maximum(w.sum(), 1.0), (chosen, rejected)

  (value, (chosen, rejected)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  w = batch.weight / jnp.maximum(batch.weight.sum(), 1.0)
  reward_c = beta * (chosen - batch.ref_chosen)
  reward_r = beta * (rejected - batch.ref_rejected)
  metrics = {
      'train/loss': value,
      'train/grad_norm': optax.tree.norm(grads),
      'train/lr': schedule(state.step),
      'dpo/chosen_reward': (reward_c * w).sum(),
      'dpo/rejected_reward': (reward_r * w).sum(),
      'dpo/margin': ((reward_c - reward_r) * w).sum(),
      'dpo/accuracy': ((reward_c > reward_r) * w).sum(),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
