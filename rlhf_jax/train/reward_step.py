"""The reward-model train step: Bradley-Terry on preference pairs, for every member of an
ensemble at once (params stacked on a leading axis, one vmapped forward), against each
pair's soft label (the aggregate of its annotators' labels; 1 for a single hard label).

Members see the same batch; with `bootstrap`, member k weighs pair b by an independent
Poisson(1) draw (the online bootstrap), so the members fit different resamples of the data
and their disagreement means something. The members are independent models: the stage's
optimiser clips each member's gradient by its own norm (train/state.py make_optimizer's
`members`), and `train/grad_norm` is the largest member's norm before clipping.

An outcome reward model (rm.objective='outcome', `outcome_train_step`) is the same head
trained instead with binary cross-entropy on single responses labelled 1/0 by a task's
verifier: its score is the logit of P(correct), and an ensemble's P(correct) is the
mean of its members' sigmoids (`outcome_probability`).
"""
import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.data.batch import PairBatch
from rlhf_jax.models import lora
from rlhf_jax.sampling import sequence_layout
from rlhf_jax.train.state import TrainState, member_norms


def response_sequences(prompts, prompt_lengths, responses, masks):
  """A reward model's inputs for left-padded prompts [B, P] and responses [B, R] with
  their masks: (tokens, segment_ids, positions, token_types, response_mask), each
  [B, P+R]; token_types 1 on response columns, response_mask 1 on response tokens."""
  p = prompts.shape[1]
  tokens = jnp.concatenate([prompts, responses], axis=1)
  segments, positions = sequence_layout(prompt_lengths, p, tokens.shape[1])
  types = jnp.broadcast_to((jnp.arange(tokens.shape[1]) >= p).astype(jnp.int32), tokens.shape)
  response_mask = jnp.concatenate([jnp.zeros((masks.shape[0], p), masks.dtype), masks], axis=1)
  return tokens, segments, positions, types, response_mask


def pair_sequences(batch: PairBatch):
  """Chosen rows then rejected rows, [2B, P+R], as `response_sequences` lays them out."""
  return response_sequences(jnp.concatenate([batch.prompts, batch.prompts]),
                            jnp.concatenate([batch.prompt_lengths, batch.prompt_lengths]),
                            jnp.concatenate([batch.chosen, batch.rejected]),
                            jnp.concatenate([batch.chosen_mask, batch.rejected_mask]))


def pair_rewards(params, batch: PairBatch, *, model):
  """(chosen, rejected) rewards, each [K, B]."""
  rewards = model.apply({'params': params}, *pair_sequences(batch))
  b = batch.prompts.shape[0]
  return rewards[:, :b], rewards[:, b:]


def train_step(state: TrainState, batch: PairBatch, frozen=None, *, model, tx, schedule,
               bootstrap: bool):
  """One update of all members; each member's loss is its own weighted mean, so the summed
  loss gives each member exactly its own gradient. frozen: with LoRA, the base trunks
  (state.params holds adapters and heads, which alone get a gradient)."""
  def loss_fn(params):
    chosen, rejected = pair_rewards(lora.combine(params, frozen), batch, model=model)
    weight = jnp.broadcast_to(batch.weight, chosen.shape)
    if bootstrap:
      key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
      weight = weight * jax.random.poisson(key, 1.0, chosen.shape).astype(jnp.float32)
    per_member = ((losses.bradley_terry(chosen, rejected, batch.label) * weight).sum(axis=1) /
                  jnp.maximum(weight.sum(axis=1), 1.0))
    return per_member.sum(), (chosen, rejected, per_member)

  (_, (chosen, rejected, per_member)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  real = batch.weight / jnp.maximum(batch.weight.sum(), 1.0)
  margin = chosen - rejected
  metrics = {
      'train/loss': per_member.mean(),
      'train/accuracy': ((margin > 0) * real).sum(axis=1).mean(),
      'train/margin': (margin * real).sum(axis=1).mean(),
      # The largest member's: above optim.clip_norm, at least that member was clipped.
      'train/grad_norm': member_norms(grads).max(),
      'train/lr': schedule(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@flax.struct.dataclass
class OutcomeBatch:
  """Responses with the verifier's labels: prompts [B, P] left-padded, prompt_lengths [B],
  response [B, R], mask [B, R] (1 up to EOS), label [B] float32 1/0, weight [B] float32
  (0 on padding rows)."""
  prompts: jax.Array
  prompt_lengths: jax.Array
  response: jax.Array
  mask: jax.Array
  label: jax.Array
  weight: jax.Array


def outcome_scores(params, prompts, prompt_lengths, response, mask, *, model):
  """Member scores (logits of P(correct)) [K, B]."""
  return model.apply({'params': params},
                     *response_sequences(prompts, prompt_lengths, response, mask))


def outcome_probability(params, prompts, prompt_lengths, response, mask, *, model):
  """[B] float32: the ensemble's P(correct), the mean of its members' sigmoids."""
  scores = outcome_scores(params, prompts, prompt_lengths, response, mask, model=model)
  return jax.nn.sigmoid(scores).mean(axis=0)


def outcome_loss(scores, label, weight):
  """Per-member weighted mean BCE [K] of scores [K, B] against label [B] and weight
  [K, B] (or [B])."""
  weight = jnp.broadcast_to(weight, scores.shape)
  return ((losses.outcome_bce(scores, label) * weight).sum(axis=1) /
          jnp.maximum(weight.sum(axis=1), 1.0))


def outcome_train_step(state: TrainState, batch: OutcomeBatch, frozen=None, *, model, tx,
                       schedule, bootstrap: bool):
  """One BCE update of all members, as `train_step` does for pairs (same bootstrap and
  frozen)."""
  def loss_fn(params):
    scores = outcome_scores(lora.combine(params, frozen), batch.prompts, batch.prompt_lengths,
                            batch.response, batch.mask, model=model)
    weight = jnp.broadcast_to(batch.weight, scores.shape)
    if bootstrap:
      key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
      weight = weight * jax.random.poisson(key, 1.0, scores.shape).astype(jnp.float32)
    per_member = outcome_loss(scores, batch.label, weight)
    return per_member.sum(), (scores, per_member)

  (_, (scores, per_member)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  real = batch.weight / jnp.maximum(batch.weight.sum(), 1.0)
  metrics = {
      'train/loss': per_member.mean(),
      'train/accuracy': (((scores > 0) == (batch.label > 0.5)) * real).sum(axis=1).mean(),
      'train/label_rate': (batch.label * real).sum(),
      'train/grad_norm': member_norms(grads).max(),
      'train/lr': schedule(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
