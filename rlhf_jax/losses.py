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


def bradley_terry(chosen: jax.Array, rejected: jax.Array, label=None) -> jax.Array:
  """Per-pair -(y log sigmoid(d) + (1-y) log sigmoid(-d)), d = r_chosen - r_rejected:
  the cross-entropy against a soft label y = P(chosen preferred) [B]; rewards [B] -> [B].
  None (y = 1) is -log sigmoid(d) exactly."""
  margin = chosen - rejected
  if label is None:
    return -jax.nn.log_sigmoid(margin)
  return -(label * jax.nn.log_sigmoid(margin) + (1 - label) * jax.nn.log_sigmoid(-margin))


def outcome_bce(scores: jax.Array, label: jax.Array) -> jax.Array:
  """Per-response -(y log sigmoid(s) + (1-y) log sigmoid(-s)): an outcome reward model's
  score s as the logit of P(correct), against the verifier's label y in {0, 1} (or a soft
  one); any shape, elementwise. Its gradient in s is sigmoid(s) - y."""
  return -(label * jax.nn.log_sigmoid(scores) + (1 - label) * jax.nn.log_sigmoid(-scores))


def ppo_policy_loss(logp, old_logp, advantages, *, clip: float,
                    clip_high: float | None = None) -> jax.Array:
  """Per-token clipped surrogate max(-A r, -A clip(r, 1-clip, 1+clip_high)), r = exp(logp -
  old_logp) (Schulman et al. 2017); all inputs the same shape. clip_high (None: = clip)
  above clip is DAPO's clip-higher (Yu et al. 2025): room for unlikely tokens to grow."""
  high = clip if clip_high is None else clip_high
  ratio = jnp.exp(logp - old_logp)
  return jnp.maximum(-advantages * ratio,
                     -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + high))


def ppo_value_loss(values, old_values, returns, *, clip: float) -> jax.Array:
  """Per-token clipped value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2)."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  return 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def entropy(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) over the last axis; [..., V] -> [...]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -(jnp.exp(logp) * logp).sum(axis=-1)
