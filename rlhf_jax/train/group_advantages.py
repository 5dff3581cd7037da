"""Group-relative advantages: one scalar per sampled response, from the rewards of the
other responses to the same prompt (its group), for GRPO and its relatives. No critic.

Row i has reward r_i and group g = groups[i]. S_g is the set of valid rows of group g,
n_g = |S_g|, mean_g = sum_{S_g} r / n_g and std_g the *population* standard deviation,
sqrt(sum_{S_g} (r - mean_g)^2 / n_g). The registry ESTIMATORS, chosen by name:

  grpo          (r_i - mean_g) / (std_g + EPS)            Shao et al. 2024 (DeepSeekMath)
  dr_grpo       r_i - mean_g                               Liu et al. 2025 ("Understanding
                                                           R1-Zero-like training", Dr. GRPO)
  rloo          r_i - (sum_{S_g} r - r_i) / (n_g - 1)      Ahmadian et al. 2024; 0 if n_g = 1
                = n_g / (n_g - 1) * (r_i - mean_g)
  reinforce_pp  c_i = r_i - mean_g, then (c_i - mean_B c) / (std_B c + EPS) with the mean
                and population std over all valid rows B of the batch: Hu 2025
                (REINFORCE++), its "-baseline" variant, the one for grouped samples of
                outcome rewards. mean_B c is 0 in exact arithmetic (each group's c sums to 0),
                so it is taken as 0: OpenRLHF subtracts its float residue, which would give
                the rows of flat groups advantages of ~1e-8 instead of 0.

Why population std: with it, a group of G gets advantages of unit mean square. verl and TRL
divide by the Bessel-corrected std instead, which scales every advantage of a group of G
by sqrt((G - 1) / G); their EPS is 1e-6 (verl) and 1e-4 (TRL).

A group whose valid rewards are all equal (`zero_variance`, a group of one included) has
no signal: every estimator gives exactly 0 on its rows. That is the formulas' value in
exact arithmetic, set explicitly because the float32 group mean can be an ulp off a
constant reward, and dividing that residue by std + EPS (both tiny) would leave grpo a
spurious advantage.

Groups may be ragged: sums go through jax.ops.segment_sum, so a group's rows need not be
contiguous nor of one size, and rows with valid = 0 (e.g. a group dynamic sampling
dropped) neither count in any statistic nor get an advantage (0).

Shapes: rewards [B] float32, groups [B] int32 ids in [0, num_groups), valid [B] float32.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.errors import UserError

EPS = 1e-6


def zero_variance(rewards, groups, valid, *, num_groups: int) -> jax.Array:
  """[num_groups] bool: True where a group's valid rewards are all equal (one valid row,
  or none, included): dynamic sampling (DAPO) drops these groups. Compared exactly, by the
  group's max and min."""
  ok = valid > 0
  hi = jax.ops.segment_max(jnp.where(ok, rewards, -jnp.inf), groups, num_segments=num_groups)
  lo = jax.ops.segment_min(jnp.where(ok, rewards, jnp.inf), groups, num_segments=num_groups)
  return hi <= lo


def _centred(rewards, groups, valid, num_groups):
  """(r_i - mean_g exactly 0 on zero-variance groups and invalid rows, n_g, std_g), each
  per row [B]."""
  ok = valid > 0
  seg = functools.partial(jax.ops.segment_sum, segment_ids=groups, num_segments=num_groups)
  count = seg(ok.astype(jnp.float32))
  # jnp.where, not a product with valid: an invalid row's reward may be anything, NaN too.
  mean = seg(jnp.where(ok, rewards, 0.0)) / jnp.maximum(count, 1.0)
  centred = jnp.where(ok, rewards - mean[groups], 0.0)
  std = jnp.sqrt(seg(centred ** 2) / jnp.maximum(count, 1.0))
  flat = zero_variance(rewards, groups, valid, num_groups=num_groups)[groups]
  return jnp.where(flat, 0.0, centred), count[groups], std[groups]


def grpo(rewards, groups, valid, *, num_groups: int):
  centred, _, std = _centred(rewards, groups, valid, num_groups)
  return centred / (std + EPS)


def dr_grpo(rewards, groups, valid, *, num_groups: int):
  return _centred(rewards, groups, valid, num_groups)[0]


def rloo(rewards, groups, valid, *, num_groups: int):
  centred, count, _ = _centred(rewards, groups, valid, num_groups)
  return jnp.where(count > 1, centred * count / jnp.maximum(count - 1.0, 1.0), 0.0)


def reinforce_pp(rewards, groups, valid, *, num_groups: int):
  centred = _centred(rewards, groups, valid, num_groups)[0]  # 0 on invalid rows
  n = jnp.maximum((valid > 0).sum(), 1).astype(jnp.float32)
  return centred / (jnp.sqrt((centred ** 2).sum() / n) + EPS)


ESTIMATORS: dict[str, Callable] = {
    'grpo': grpo,
    'dr_grpo': dr_grpo,
    'rloo': rloo,
    'reinforce_pp': reinforce_pp,
}


def advantages(name: str, rewards, groups, valid, *, num_groups: int) -> jax.Array:
  """[B] float32 advantages by the estimator `name` (module docstring); 0 on invalid rows."""
  if name not in ESTIMATORS:
    raise UserError(f'advantage estimator {name!r} is not one of {tuple(ESTIMATORS)}')
  rewards = jnp.asarray(rewards, jnp.float32)
  groups = jnp.asarray(groups, jnp.int32)
  valid = jnp.asarray(valid, jnp.float32)
  out = ESTIMATORS[name](rewards, groups, valid, num_groups=num_groups)
  return jnp.where(valid > 0, out, 0.0).astype(jnp.float32)
