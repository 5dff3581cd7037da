"""The AlphaZero loss (Silver et al. 2017): (z - v)^2 - pi . log p + c * ||theta||^2."""
import jax
import jax.numpy as jnp


def masked_log_softmax(*, logits: jax.Array, legal_action_mask: jax.Array) -> jax.Array:
  """log p over the legal actions only; [B, A] -> [B, A], 0 (not -inf) on illegal ones so
  that pi * log p stays finite where pi is 0."""
  masked = jnp.where(legal_action_mask, logits, -jnp.inf)
  logz = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
  return jnp.where(legal_action_mask, logits - logz, 0.0)


def alphazero_loss(*, logits: jax.Array, value: jax.Array, target_policy: jax.Array,
                   target_value: jax.Array, legal_action_mask: jax.Array, params,
                   weight_decay: float) -> dict:
  """Mean over the batch of (z - v)^2 - pi . log p, plus c * (sum of every squared param).

  logits [B, A], value [B] (the net's outputs); target_policy [B, A] (pi: the search's
  action weights, zero on illegal actions); target_value [B] (z: the game's outcome for the
  player to move); legal_action_mask [B, A] bool; params: any pytree (biases and norm
  scales included: the paper decays all weights). Returns {'total', 'value', 'policy',
  'weight_decay'}, scalars.
  """
  value_loss = jnp.mean((target_value - value) ** 2)
  logp = masked_log_softmax(logits=logits, legal_action_mask=legal_action_mask)
  policy_loss = -jnp.mean(jnp.sum(target_policy * logp, axis=-1))
  l2 = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
  decay = weight_decay * l2
  return {'total': value_loss + policy_loss + decay, 'value': value_loss,
          'policy': policy_loss, 'weight_decay': decay}
