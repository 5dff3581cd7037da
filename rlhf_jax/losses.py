"""Pure loss functions. Each returns sums and counts so that microbatches, devices and
hosts combine exactly: the mean is taken once, by the caller, over the whole batch."""
import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[targets]; logits [B, T, V] float32, targets [B, T] -> [B, T]."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - logz


def xent_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Weighted next-token cross-entropy. Returns (sum of -log p * w, sum of w, correct)."""
  logp = token_logprobs(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
  return -(logp * weights).sum(), weights.sum(), correct.sum()
