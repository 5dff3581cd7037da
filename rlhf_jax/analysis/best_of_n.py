"""Best-of-n sampling: which sample is picked, the exact best-of-n distribution of a
discrete toy, and its KL to the reference policy, bounded and measured.

Best-of-n draws y_1..y_n iid from the reference pi_ref and keeps the one of highest reward,
the lowest index among tied maxima (`select`). Write F(r) = P_ref(R <= r) and
F_(r) = P_ref(R < r) for the reward's CDF under pi_ref (per prompt). Summing over the
position i of the kept draw (the draws before it strictly lower, those after it no higher):

  pi_bon(y) = pi_ref(y) * sum_{i=1..n} F_^(i-1) F^(n-i)
            = pi_ref(y) * (F^n - F_^n) / (F - F_)         at r = r(y)      (1)

so the log-ratio log(pi_bon / pi_ref)(y) depends on y through its reward only. Two cases:
  * continuous rewards (F = F_): log n + (n-1) log F(r(y)), and with U = F(R) ~ Beta(n, 1)
    under pi_bon, KL(pi_bon || pi_ref) = log n + (n-1) E[log U] = log n - (n-1)/n exactly
    (`kl_bound`, the formula of Stiennon et al. 2020 and Gao et al. 2022).
  * ties: a tie group {y : r(y) = r} gets mass F^n - F_^n, split in proportion to pi_ref
    (the lowest index among exchangeable tied draws is a uniform pick). The KL is then the
    KL between the reward's own distributions, which by Jensen (x log x is convex) is below
    log n - (n-1)/n, strictly for n >= 2 as soon as some tie has positive mass: the bound
    is an upper bound (Beirami et al. 2024 make the same point).

Everything here is plain NumPy in float64: these are host-side analyses of sampled rewards.
"""
import dataclasses
import math
from typing import NamedTuple

import numpy as np

from rlhf_jax.errors import UserError


def _check_n(n) -> int:
  if isinstance(n, bool) or int(n) != n or n < 1:
    raise UserError(f'best-of-n needs an integer n >= 1, got {n!r}')
  return int(n)


def select(rewards) -> np.ndarray:
  """[P] int index of the best of n per row of rewards [P, n]; ties go to the lowest index
  (np.argmax's rule, which `exact_discrete` and `kl_estimate` assume)."""
  rewards = np.asarray(rewards)
  if rewards.ndim != 2 or rewards.shape[1] < 1:
    raise UserError(f'select needs rewards of shape [P, n] with n >= 1, got {rewards.shape}')
  if np.isnan(rewards).any():
    raise UserError('select: a reward is NaN')  # argmax would pick the NaN
  return np.argmax(rewards, axis=1)


def kl_bound(n) -> float:
  """log n - (n-1)/n: KL(pi_bon || pi_ref) for continuous rewards, an upper bound with ties."""
  n = _check_n(n)
  return math.log(n) - (n - 1) / n


def log_ratio(*, lower, upper, n) -> np.ndarray:
  """log(pi_bon / pi_ref) = log((upper^n - lower^n) / (upper - lower)) elementwise, from
  F_ = lower <= upper = F (arrays, upper > 0); log n + (n-1) log upper where they are equal.

  Written as (n-1) log upper + log((1 - rho^n) / (1 - rho)) with 1 - rho = (upper - lower)
  / upper, so a tiny tie group loses no precision to the difference of two n-th powers."""
  n = _check_n(n)
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  if n == 1:  # exactly 0, where the tie term would leave rounding residue
    return np.zeros(np.broadcast_shapes(lower.shape, upper.shape))
  gap = (upper - lower) / upper
  with np.errstate(divide='ignore', invalid='ignore'):
    tied = np.log(-np.expm1(n * np.log1p(-gap))) - np.log(gap)
  return (n - 1) * np.log(upper) + np.where(gap > 0, tied, math.log(n))


class ExactBestOfN(NamedTuple):
  """pi_bon: [K] float64 best-of-n distribution over the K outcomes; kl: KL(pi_bon || probs)
  in nats. A NamedTuple so that `pi_bon, kl = exact_discrete(...)` unpacks."""
  pi_bon: np.ndarray
  kl: float


def exact_discrete(*, probs, rewards, n) -> ExactBestOfN:
  """The exact best-of-n distribution of a discrete reference: outcome k has probability
  probs[k] [K] and reward rewards[k] [K]; n draws are kept by `select`.

  From (1) with F and F_ the CDFs of the reward under probs. Outcomes are ordered by reward
  only: the tie rule acts on the draws' positions, not on the outcomes' labels, so outcomes
  of equal reward share their group's F^n - F_^n in proportion to probs. Ranking outcomes
  by (reward, label) as a total order, P(best = k) = P(all draws <= k) - P(all draws < k),
  gives the same group masses but tilts each group toward its last label, and a KL at
  least as large (0.1675 against 0.1640 at n = 2 on the tests' four-outcome toy).
  tests/test_best_of_n.py checks this function against all K^n draws.
  """
  n = _check_n(n)
  probs, rewards = np.asarray(probs, np.float64), np.asarray(rewards, np.float64)
  if probs.ndim != 1 or probs.shape != rewards.shape:
    raise UserError(f'probs {probs.shape} and rewards {rewards.shape} must both be [K]')
  if (probs < 0).any() or not probs.sum() > 0 or np.isnan(rewards).any():
    raise UserError('probs must be >= 0 with a positive sum, rewards not NaN')
  probs = probs / probs.sum()
  levels, group = np.unique(rewards, return_inverse=True)
  mass = np.bincount(group, weights=probs, minlength=len(levels))
  cdf = np.minimum(np.cumsum(mass), 1.0)
  upper, lower = cdf[group], (cdf - mass)[group]
  live = probs > 0
  ratio = np.zeros_like(probs)
  ratio[live] = log_ratio(lower=lower[live], upper=upper[live], n=n)
  pi_bon = np.where(live, probs * np.exp(ratio), 0.0)
  return ExactBestOfN(pi_bon=pi_bon, kl=float(np.sum(pi_bon[live] * ratio[live])))


@dataclasses.dataclass(frozen=True)
class KLEstimate:
  """kl: the mean over prompts of the estimated KL(pi_bon || pi_ref) in nats; se: its
  standard error over prompts; log_ratio: [P, S] the per-sample estimates of
  log(pi_bon / pi_ref)."""
  kl: float
  se: float
  log_ratio: np.ndarray


def kl_estimate(*, rewards, ref_rewards, n) -> KLEstimate:
  """Measured KL(pi_bon || pi_ref) from the rewards [P] or [P, S] of best-of-n samples and
  the rewards ref_rewards [P, M] of M reference samples of the same prompt, drawn
  independently of them.

  Each best-of-n sample's log-ratio is (1) at its reward r, with the prompt's CDFs
  estimated by the (count+1)/(M+1) convention on both sides:
      F(r)  ~ (#{ref <= r} + 1) / (M + 1),    F_(r) ~ (#{ref < r} + 1) / (M + 1),
  so F > 0 always (a sample below every reference sample counts as rank 1 of M + 1) and
  F = 1 above them all. Without ties in the references at r this is log n + (n-1) log F;
  ties at r use the tie term of (1), which the continuous formula would get wrong (it
  would credit the whole tie group's mass to its top), so the estimate targets the true,
  tie-lowered KL. The estimate is the mean over the P x S samples; se is over the P
  prompt means (samples of one prompt share its references).

  Bias (the empirical CDF; it vanishes as M grows): for continuous rewards the expectation
  is known exactly (`continuous_bias`): +1/(2M), within 4% for every n >= 2 and M >= 16
  (0 at n = 1, +0.0077 to +0.0079 at M = 64, +0.0019 at M = 256). A mid-rank
  (count + 1/2) convention would be biased by about -(n-1)/(2M) instead, growing with n
  (-0.116 at n = 16, M = 64):
  best-of-n samples sit near the top of the references, where the offset moves log F most.
  With ties the bias is also O(1/M) but depends on the reward law. On the toy of
  tests/test_best_of_n.py (probs .15 .1 .2 .25 .1 .2, rewards 0 1 1 2 3 3), whose true KL
  is 0.176, 0.577, 1.182 at n = 2, 4, 16 (bound 0.193, 0.636, 1.835), it is +0.011,
  +0.013, +0.031 with M = 64 and +0.0007, +0.0008, +0.002 with M = 1000; the continuous
  formula log n + (n-1) log F on the same counts gives 0.41, 1.08, 2.75, above even the
  bound.
  """
  n = _check_n(n)
  rewards = np.asarray(rewards, np.float64)
  rewards = rewards[:, None] if rewards.ndim == 1 else rewards
  ref = np.asarray(ref_rewards, np.float64)
  if rewards.ndim != 2 or ref.ndim != 2 or rewards.shape[0] != ref.shape[0] or ref.shape[1] < 1:
    raise UserError(f'kl_estimate needs rewards [P] or [P, S] and ref_rewards [P, M] of the '
                    f'same P, got {rewards.shape} and {ref.shape}')
  if np.isnan(rewards).any() or np.isnan(ref).any():
    raise UserError('kl_estimate: a reward is NaN')
  m = ref.shape[1]
  ref = np.sort(ref, axis=1)
  at_most = np.stack([np.searchsorted(row, r, side='right') for row, r in zip(ref, rewards)])
  below = np.stack([np.searchsorted(row, r, side='left') for row, r in zip(ref, rewards)])
  ratio = log_ratio(lower=(below + 1) / (m + 1), upper=(at_most + 1) / (m + 1), n=n)
  per_prompt = ratio.mean(axis=1)
  se = per_prompt.std(ddof=1) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else math.nan
  return KLEstimate(kl=float(ratio.mean()), se=float(se), log_ratio=ratio)


def continuous_bias(*, n, ref_samples) -> float:
  """E[kl_estimate] - kl_bound(n) for continuous rewards and M = ref_samples references,
  exactly: U = F(r) ~ Beta(n, 1) under pi_bon and #{ref <= r} | U ~ Binomial(M, U), so
  the count C has P(C = c) = n M! (c+n-1)! / (c! (M+n)!), and E[log U] = -1/n."""
  n, m = _check_n(n), int(ref_samples)
  if m < 1:
    raise UserError(f'ref_samples={ref_samples} must be >= 1')
  c = np.arange(m + 1)
  lg = np.vectorize(math.lgamma)
  log_p = math.log(n) + math.lgamma(m + 1) + lg(c + n) - lg(c + 1) - math.lgamma(m + n + 1)
  mean_log_f = float(np.sum(np.exp(log_p) * np.log((c + 1) / (m + 1))))
  return (n - 1) * (mean_log_f + 1 / n)
