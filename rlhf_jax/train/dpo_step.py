"""The train step of the preference-loss family (train/preference_losses.py, `dpo.loss`) on
preference pairs, against reference log-probs computed once (the reference policy is
frozen, so its sequence log-probs are data; reference-free losses have none)."""
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.data.batch import PairBatch
from rlhf_jax.models import lora
from rlhf_jax.sampling import score
from rlhf_jax.train import preference_losses
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


def mismatched_logprobs(params, batch: PairBatch, *, model):
  """Sequence log-probs [B] of each row's mismatched partner response after its prompt
  (KTO's KL estimate)."""
  return (score(params, batch.prompts, batch.prompt_lengths, batch.kl_response, model=model)
          * batch.kl_mask).sum(axis=1)


def pair_logps(params, batch: PairBatch, *, model, loss: str) -> preference_losses.PairLogps:
  """Everything `loss` reads, under the policy `params` and the batch's reference data."""
  chosen, rejected = sequence_logprobs(params, batch, model=model)
  kl = {}
  if preference_losses.LOSSES[loss].mismatched_kl:
    kl = dict(kl_policy=jax.lax.stop_gradient(mismatched_logprobs(params, batch, model=model)),
              kl_ref=batch.ref_kl)
  return preference_losses.PairLogps(
      policy_chosen=chosen, policy_rejected=rejected, ref_chosen=batch.ref_chosen,
      ref_rejected=batch.ref_rejected, chosen_length=batch.chosen_mask.sum(axis=1),
      rejected_length=batch.rejected_mask.sum(axis=1), weight=batch.weight, **kl)


def train_step(state: TrainState, batch: PairBatch, frozen=None, *, model, tx, schedule,
               loss: str, hparams: dict):
  """One update; metrics report the loss's implicit rewards (beta * log-ratio, per-token
  averaged for the length-normalised losses). frozen: with LoRA, the base params
  (state.params holds the adapters, which alone get a gradient)."""
  def loss_fn(params):
    lp = pair_logps(lora.combine(params, frozen), batch, model=model, loss=loss)
    per = preference_losses.per_pair_loss(loss, lp, hparams)
    w = batch.weight
    return (per * w).sum() / jnp.maximum(w.sum(), 1.0), lp

  (value, lp), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  w = batch.weight / jnp.maximum(batch.weight.sum(), 1.0)
  reward_c, reward_r = preference_losses.implicit_rewards(loss, lp, hparams['beta'])
  metrics = {
      'train/loss': value,
      'train/grad_norm': optax.tree.norm(grads),
      'train/lr': schedule(state.step),
      'dpo/chosen_reward': (reward_c * w).sum(),
      'dpo/rejected_reward': (reward_r * w).sum(),
      'dpo/margin': ((reward_c - reward_r) * w).sum(),
      'dpo/accuracy': ((reward_c > reward_r) * w).sum(),
  }
  if preference_losses.LOSSES[loss].mismatched_kl:
    metrics['dpo/kto_z0'] = preference_losses.kto_reference_point(lp)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
