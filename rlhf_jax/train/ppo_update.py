"""The PPO update for one batch of rollouts, independent of what the policy is: a language
model over response tokens, or a table over one-token "responses" (the bandit test).

Per-token reward (the RLHF reward of Ziegler et al. 2019): r_t = -beta (log pi(y_t) -
log ref(y_t)) on every response token, plus the sequence's score on its last token.
Advantages by GAE(gamma, lambda), whitened over the batch's tokens; then `epochs` passes
over `minibatches` shuffled minibatches of rows, each one optimiser update of the
clipped surrogate + value_coef * clipped value loss - entropy_coef * entropy, every term a
mean over the minibatch's response tokens. Everything is one traced function (lax.scan
over epochs and minibatches), so a caller jits the rollout and the update together.
"""
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.train import advantages


@flax.struct.dataclass
class Rollout:
  """B sampled responses over N token columns.

  inputs:    pytree with leading axis B: what `apply_fn` needs to recompute the tokens'
             log-probs and values (for a language model: tokens, segment ids, positions).
  mask:      [B, N] float32, 1 on response tokens (a prefix of each row).
  logp:      [B, N] float32 log pi_old(y_t) under the params that sampled.
  ref_logp:  [B, N] float32 log ref(y_t).
  values:    [B, N] float32 V_old(s_t), the state before token t.
  score:     [B] float32 sequence reward, paid on the last token.
  """
  inputs: Any
  mask: jax.Array
  logp: jax.Array
  ref_logp: jax.Array
  values: jax.Array
  score: jax.Array


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  epochs: int = 4
  minibatches: int = 4
  clip: float = 0.2
  value_clip: float = 0.2
  value_coef: float = 0.5
  entropy_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  whiten: bool = True

  @classmethod
  def from_config(cls, block) -> 'PPOConfig':
    return cls(**{f.name: block[f.name] for f in dataclasses.fields(cls)})


def last_token(mask):
  """[B, N] 1 on each row's last response token."""
  following = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  return mask * (1.0 - following)


def token_rewards(rollout: Rollout, kl_coef):
  """(rewards [B, N], per-token log-ratio to the reference [B, N])."""
  log_ratio = (rollout.logp - rollout.ref_logp) * rollout.mask
  return -kl_coef * log_ratio + rollout.score[:, None] * last_token(rollout.mask), log_ratio


def masked_mean(x, mask):
  """Mean of x over the entries where mask is 1 (0 for an empty mask)."""
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def explained_variance(values, returns, mask):
  """1 - Var(returns - values) / Var(returns) over the masked tokens."""
  var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)
  return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def minibatch_updates(params, opt_state, key, *, loss_fn: Callable,
                      tx: optax.GradientTransformation, rows: int, epochs: int,
                      minibatches: int, active=None):
  """(params, opt_state, per-update aux with leading axes [epochs, minibatches]) after
  `epochs` passes, each over `minibatches` shuffled minibatches of rows // minibatches
  rows (a remainder sits out each pass, a different one each time), one optimiser update
  per minibatch, all in one lax.scan.

  loss_fn(params, idx [size] int) -> (loss, aux dict). With active [rows] given, a
  minibatch without an active row leaves params and opt_state as they were: its gradient
  is zero, but Adam's momentum would still move the params.
  """
  size = rows // minibatches

  def minibatch(carry, idx):
    params, opt_state = carry
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, idx)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), opt_state)
    if active is not None:
      keep = active[idx].sum() > 0
      new = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, carry)
    return new, {**aux, 'train/grad_norm': optax.tree.norm(grads)}

  def epoch(carry, k):
    order = jax.random.permutation(k, rows)[:minibatches * size]
    return jax.lax.scan(minibatch, carry, order.reshape(minibatches, size))

  (params, opt_state), per_update = jax.lax.scan(
      epoch, (params, opt_state), jax.random.split(key, epochs))
  return params, opt_state, per_update


def update(params, opt_state, rollout: Rollout, key, *, apply_fn: Callable,
           tx: optax.GradientTransformation, config: PPOConfig, kl_coef):
  """(params, opt_state, metrics) after config.epochs x config.minibatches updates.

  apply_fn(params, inputs) -> (logp [b, N], values [b, N], entropy [b, N]) for a
  minibatch's rows of rollout.inputs.
  """
  mask = rollout.mask
  rewards, log_ratio = token_rewards(rollout, kl_coef)
  adv, returns = advantages.gae(rewards, rollout.values, mask, gamma=config.gamma,
                                lam=config.lam)
  if config.whiten:
    adv = advantages.whiten(adv, mask)
  rows = mask.shape[0]

  def loss_fn(params, idx):
    m = mask[idx]
    logp, values, ent = apply_fn(params, jax.tree.map(lambda x: x[idx], rollout.inputs))
    policy = masked_mean(losses.ppo_policy_loss(logp, rollout.logp[idx], adv[idx],
                                                clip=config.clip), m)
    value = masked_mean(losses.ppo_value_loss(values, rollout.values[idx], returns[idx],
                                              clip=config.value_clip), m)
    entropy = masked_mean(ent, m)
    log_r = logp - rollout.logp[idx]
    aux = {'ppo/policy_loss': policy, 'ppo/value_loss': value, 'ppo/entropy': entropy,
           'ppo/clip_fraction': masked_mean(
               (jnp.abs(jnp.expm1(log_r)) > config.clip).astype(jnp.float32), m),
           # k3 estimator of KL(old || new): (r - 1) - log r, r = new / old
           'ppo/approx_kl': masked_mean(jnp.expm1(log_r) - log_r, m)}
    loss = policy + config.value_coef * value - config.entropy_coef * entropy
    return loss, {'train/loss': loss, **aux}

  params, opt_state, per_update = minibatch_updates(
      params, opt_state, key, loss_fn=loss_fn, tx=tx, rows=rows, epochs=config.epochs,
      minibatches=config.minibatches)
  metrics = jax.tree.map(jnp.mean, per_update)
  metrics.update({
      'ppo/explained_variance': explained_variance(rollout.values, returns, mask),
      'ppo/return': masked_mean(returns, mask),
      'ppo/value': masked_mean(rollout.values, mask),
      'rl/kl': log_ratio.sum(axis=1).mean(),
      'rl/score': rollout.score.mean(),
      'rl/kl_coef': jnp.asarray(kl_coef, jnp.float32),
  })
  return params, opt_state, metrics
