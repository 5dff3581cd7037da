"""The GRPO-family update for one batch of grouped rollouts, whatever the policy is: a
language model over response tokens, or a table over one-token responses (the bandit
test). The advantages come in per sequence (train/group_advantages.py); there is no critic.

Per response token t of row i, with rho = exp(logp - logp_old):
  pg_t = max(-A_i rho, -A_i clip(rho, 1 - clip_low, 1 + clip_high))
         PPO's clipped surrogate; clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025)
  w_t  = min(exp(logp_old - sample_logp), tis_cap), no gradient; 1 when tis_cap = 0
         truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
         secretly brings you off-policy RL training"): the sampler (say bf16) and the
         trainer disagree on the old policy, so its samples are reweighted to the trainer's
  k3_t = exp(ref - logp) - (ref - logp) - 1
         the KL estimate GRPO puts in its loss (Shao et al. 2024), kl='loss' only
  l_t  = w_t pg_t + kl_coef k3_t [kl = 'loss']
With kl='reward' the step subtracts kl_coef (logp_old - ref) from the reward before the
advantages, as PPO does; with 'off' there is no KL term. Both add nothing here.

Aggregation over the valid rows V of a minibatch, |y_i| the response tokens of row i:
  'sequence'  (1/|V|) sum_i (1/|y_i|) sum_t l_t             GRPO (Shao et al. 2024)
  'token'     sum_i sum_t l_t / sum_i |y_i|                 DAPO (Yu et al. 2025)
  'constant'  sum_i sum_t l_t / (|V| max_new_tokens)         Dr. GRPO (Liu et al. 2025)
'sequence' gives each response the same weight whatever its length, so a long wrong answer
is penalised less per token; the other two weigh every token alike. Invalid rows (valid = 0,
e.g. a group dynamic sampling dropped) contribute nothing and are not counted.

`epochs` passes over `minibatches` shuffled minibatches, one optimiser update each, in one
lax.scan (ppo_update.minibatch_updates); a minibatch with no valid row changes nothing.
The token metrics (kl, clip fractions, entropy, approx_kl) are means over valid tokens,
averaged over the updates that had any.
"""
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.errors import UserError
from rlhf_jax.train import ppo_update

LOSS_AGG = ('sequence', 'token', 'constant')
KL_MODES = ('loss', 'reward', 'off')


@flax.struct.dataclass
class GroupRollout:
  """B sampled responses (G per prompt) over N token columns.

  inputs:      pytree with leading axis B: what `apply_fn` needs to recompute the tokens'
               log-probs (for a language model: tokens, segment ids, positions).
  mask:        [B, N] float32, 1 on response tokens.
  logp:        [B, N] float32 log pi_old(y_t), recomputed by the trainer.
  sample_logp: [B, N] float32 log-probs the sampler reported for the same tokens.
  ref_logp:    [B, N] float32 log ref(y_t).
  advantages:  [B] float32, one per sequence.
  valid:       [B] float32, 0 for a row the update ignores.
  """
  inputs: Any
  mask: jax.Array
  logp: jax.Array
  sample_logp: jax.Array
  ref_logp: jax.Array
  advantages: jax.Array
  valid: jax.Array


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  epochs: int = 1
  minibatches: int = 1
  clip_low: float = 0.2
  clip_high: float = 0.28
  loss_agg: str = 'token'
  kl: str = 'loss'
  kl_coef: float = 0.04
  tis_cap: float = 0.0  # 0: off
  max_new_tokens: int = 0  # the 'constant' aggregation's divisor

  def __post_init__(self):
    if self.loss_agg not in LOSS_AGG:
      raise UserError(f'grpo.loss_agg={self.loss_agg!r} is not one of {LOSS_AGG}')
    if self.kl not in KL_MODES:
      raise UserError(f'grpo.kl={self.kl!r} is not one of {KL_MODES}')
    for name in ('epochs', 'minibatches'):
      if getattr(self, name) < 1:
        raise UserError(f'grpo.{name}={getattr(self, name)} must be >= 1')
    if not 0.0 <= self.clip_low < 1.0 or self.clip_high < 0.0:
      raise UserError(f'grpo.clip_low={self.clip_low} must be in [0, 1) and '
                      f'grpo.clip_high={self.clip_high} >= 0')
    if self.kl_coef < 0.0 or self.tis_cap < 0.0:
      raise UserError(f'grpo.kl_coef={self.kl_coef} and grpo.tis_cap={self.tis_cap} must '
                      'be >= 0 (tis_cap 0: off)')
    if self.loss_agg == 'constant' and self.max_new_tokens < 1:
      raise UserError(f"grpo.loss_agg='constant' divides by grpo.max_new_tokens="
                      f'{self.max_new_tokens}, which must be >= 1')

  @classmethod
  def from_config(cls, block) -> 'GRPOConfig':
    return cls(**{f.name: block[f.name] for f in dataclasses.fields(cls)})


def tis_weights(rollout: GroupRollout, *, cap: float):
  """[B, N] min(exp(logp_old - sample_logp), cap), or ones when cap = 0."""
  if not cap:
    return jnp.ones_like(rollout.logp)
  return jnp.minimum(jnp.exp(rollout.logp - rollout.sample_logp), cap)


def aggregate(per_token, mask, valid, *, how: str, max_new_tokens: int = 0):
  """Scalar loss from per-token terms [B, N] by the aggregation `how` (module docstring)."""
  weights = mask * valid[:, None]
  rows = jnp.maximum(valid.sum(), 1.0)
  if how == 'sequence':
    per_row = (per_token * weights).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    return per_row.sum() / rows
  if how == 'token':
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  if how == 'constant':
    return (per_token * weights).sum() / (rows * max_new_tokens)
  raise UserError(f'loss aggregation {how!r} is not one of {LOSS_AGG}')


def active_rows(rollout: GroupRollout):
  """[B] 1 on the rows that can move the policy: valid, with at least one token."""
  return rollout.valid * (rollout.mask.sum(1) > 0)


def loss(params, rollout: GroupRollout, *, apply_fn: Callable, config: GRPOConfig):
  """(loss, metrics) of the rows of `rollout` (a minibatch) under params."""
  logp, ent = apply_fn(params, rollout.inputs)
  adv = rollout.advantages[:, None]
  w = jax.lax.stop_gradient(tis_weights(rollout, cap=config.tis_cap))
  pg = w * losses.ppo_policy_loss(logp, rollout.logp, adv, clip=config.clip_low,
                                  clip_high=config.clip_high)
  log_r = logp - rollout.logp
  ref_gap = rollout.ref_logp - logp
  k3 = jnp.expm1(ref_gap) - ref_gap
  agg = lambda x: aggregate(x, rollout.mask, rollout.valid, how=config.loss_agg,
                            max_new_tokens=config.max_new_tokens)
  policy = agg(pg)
  total = policy + config.kl_coef * agg(k3) if config.kl == 'loss' else policy
  tokens = rollout.mask * rollout.valid[:, None]
  mean = lambda x: ppo_update.masked_mean(x, tokens)
  ratio = jnp.exp(log_r)
  # Clipped where the clip cuts the gradient: below the range with A < 0, above with A > 0.
  low = (ratio < 1.0 - config.clip_low) & (adv < 0)
  high = (ratio > 1.0 + config.clip_high) & (adv > 0)
  return total, {
      'train/loss': total, 'grpo/policy_loss': policy, 'grpo/kl': mean(k3),
      'grpo/clip_fraction_low': mean(low.astype(jnp.float32)),
      'grpo/clip_fraction_high': mean(high.astype(jnp.float32)),
      'grpo/entropy': mean(ent),
      # k3 estimator of KL(old || new), as PPO reports it
      'grpo/approx_kl': mean(jnp.expm1(log_r) - log_r),
      'grpo/active_rows': active_rows(rollout).sum()}


def update(params, opt_state, rollout: GroupRollout, key, *, apply_fn: Callable,
           tx: optax.GradientTransformation, config: GRPOConfig):
  """(params, opt_state, metrics) after config.epochs x config.minibatches updates.

  apply_fn(params, inputs) -> (logp [b, N], entropy [b, N]) for a minibatch's rows of
  rollout.inputs. The rows B must split evenly into config.minibatches.
  """
  rows = rollout.mask.shape[0]
  if rows % config.minibatches:
    raise UserError(f'{rows} rollout rows do not split into grpo.minibatches='
                    f'{config.minibatches} equal minibatches')

  def loss_fn(params, idx):
    return loss(params, jax.tree.map(lambda x: x[idx], rollout), apply_fn=apply_fn,
                config=config)

  params, opt_state, per_update = ppo_update.minibatch_updates(
      params, opt_state, key, loss_fn=loss_fn, tx=tx, rows=rows, epochs=config.epochs,
      minibatches=config.minibatches, active=active_rows(rollout))
  # Updates on minibatches without an active row changed nothing and are left out.
  counted = (per_update.pop('grpo/active_rows') > 0).astype(jnp.float32)
  metrics = jax.tree.map(lambda x: (x * counted).sum() / jnp.maximum(counted.sum(), 1.0),
                         per_update)
  tokens = rollout.mask * rollout.valid[:, None]
  clipped = (jnp.exp(rollout.logp - rollout.sample_logp) > config.tis_cap
             if config.tis_cap else jnp.zeros_like(tokens))
  metrics['grpo/tis_clipped_fraction'] = ppo_update.masked_mean(
      clipped.astype(jnp.float32), tokens)
  return params, opt_state, metrics
