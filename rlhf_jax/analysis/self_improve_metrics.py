"""What the self-improvement loop (loops/self_improve.py) reports each round, and the
saturating curve its experiment fits to the rounds. Host-side NumPy (float64).

Each round the policy samples k responses to each of P prompts of a verifiable task, a
filter keeps some and the next policy trains on the kept ones.

`filter_stats`: the filter's verdicts against the exact verifier's. kept_fraction = kept /
N; precision = P(correct | kept); recall = P(kept | correct). A rate whose conditioning
set is empty (nothing kept, nothing correct, no samples) is NaN: undefined, not 0 or 1.

`self_consistency_keep`: the verifier-free filter (self-consistency as a label, Huang et
al. 2022): keep a prompt's samples whose found answer is the majority answer among its
found answers, the vote being verifier_metrics.maj_at_k's (most votes, a tie to the answer
seen first, samples without a found answer abstain and are never kept).

`diversity`: distinct_traces = mean over prompts of (distinct responses among the k) / k,
two responses being one trace when their masked tokens (up to and including EOS) agree,
whatever follows EOS; answer_entropy = mean over prompts of the entropy (nats) of the
empirical distribution of the k stated answers, "no answer found" one more category.
Collapse of the loop onto few traces shows as distinct_traces -> 1/k, onto one answer as
answer_entropy -> 0.

`fit_saturating`: p(r) = p_inf - (p_inf - p_0) exp(-r / r0) by least squares; p_0 is the
value at r = 0, p_inf the asymptote (below p_0 for a decline), r0 the rounds to close
1 - 1/e of the gap. Intervals over seeds: analysis/compare.interval.
"""
import dataclasses
import warnings

import numpy as np
from scipy import optimize

from rlhf_jax.analysis import verifier_metrics
from rlhf_jax.errors import UserError

_R0_BOUNDS = (1e-3, 1e3)
_P_BOUNDS = (0.0, 1.0)  # pass rates; widened to hold the data when it leaves [0, 1]


def filter_stats(kept, correct) -> dict:
  """kept [N] bool (the filter's verdict), correct [N] bool (the exact verifier's) ->
  {'kept_fraction', 'precision', 'recall'} floats, NaN where undefined (nothing kept for
  precision, nothing correct for recall, N = 0 for kept_fraction), and {'kept',
  'correct'} int counts."""
  kept, correct = np.asarray(kept), np.asarray(correct)
  if kept.ndim != 1 or kept.shape != correct.shape:
    raise UserError(f'filter_stats needs kept [N] and correct [N]; got {kept.shape}, '
                    f'{correct.shape}')
  kept, correct = kept.astype(bool), correct.astype(bool)
  rate = lambda hits, of: float(hits.sum() / of.sum()) if of.any() else float('nan')
  return {
      'kept_fraction': float(kept.mean()) if kept.size else float('nan'),
      'precision': rate(kept & correct, kept),
      'recall': rate(kept & correct, correct),
      'kept': int(kept.sum()),
      'correct': int(correct.sum()),
  }


def _answers(answers, found, what):
  answers, found = np.asarray(answers), np.asarray(found)
  if answers.ndim != 3 or found.shape != answers.shape[:2]:
    raise UserError(f'{what} needs answers [P, k, A] and found [P, k]; got '
                    f'{answers.shape}, {found.shape}')
  return answers, found.astype(bool)


def self_consistency_keep(answers, found) -> np.ndarray:
  """answers [P, k, A] int (compared whole), found [P, k] bool -> kept [P, k] bool: the
  samples stating their prompt's majority answer (module docstring); none of a prompt
  with no found answer."""
  answers, found = _answers(answers, found, 'self_consistency_keep')
  return verifier_metrics.majority_agreement(answers, found)


def diversity(responses, mask, answers, found) -> dict:
  """responses [P, k, R] int, mask [P, k, R] (1 up to and including EOS, then 0), answers
  [P, k, A] int, found [P, k] bool -> {'distinct_traces', 'answer_entropy'} floats
  (module docstring); P, k >= 1."""
  answers, found = _answers(answers, found, 'diversity')
  responses, mask = np.asarray(responses), np.asarray(mask)
  if (responses.ndim != 3 or mask.shape != responses.shape
      or responses.shape[:2] != answers.shape[:2]):
    raise UserError(f'diversity needs responses, mask [P, k, R] and answers [P, k, A]; '
                    f'got {responses.shape}, {mask.shape}, {answers.shape}')
  p, k = found.shape
  if not (p and k):
    raise UserError(f'diversity needs at least one prompt and one sample, got [{p}, {k}]')
  on = mask > 0
  # The masked tokens moved to the front in order (a stable sort on ~on), the rest
  # blanked: equal rows are exactly equal masked sequences, whatever follows EOS.
  order = np.argsort(~on, axis=-1, kind='stable')
  packed = np.take_along_axis(responses.astype(np.int64), order, axis=-1)
  packed = np.where(np.take_along_axis(on, order, axis=-1), packed, -1)
  lengths = on.sum(-1)
  same = (packed[:, :, None] == packed[:, None]).all(-1) & (
      lengths[:, :, None] == lengths[:, None])  # [P, k, k]
  # A trace is counted at its first occurrence: no earlier sample equals it.
  earlier = np.tril(np.ones((k, k), bool), -1)  # [j, i]: i < j
  distinct = (~(same & earlier).any(-1)).sum(-1)  # [P]
  # Entropy as -(1/k) sum_j log(n_j / k), n_j the size of sample j's category.
  same_answer, _ = verifier_metrics.majority_vote(answers, found)
  size = np.where(found, same_answer.sum(-1), (~found).sum(-1, keepdims=True))
  entropy = -np.mean(np.log(size / k), axis=-1)
  return {'distinct_traces': float(np.mean(distinct / k)),
          'answer_entropy': float(np.mean(entropy))}


@dataclasses.dataclass(frozen=True)
class SaturatingFit:
  """p(r) = p_inf - (p_inf - p_0) exp(-r / r0) fitted to a curve; rmse of the fit's
  residuals; converged False for the fallback (p_inf = p_0 = mean, r0 = NaN).
  identified: converged with r0 no longer than the rounds fitted, so the curve closes at
  least 1 - 1/e of its gap where it was seen; otherwise p_inf is an extrapolation (a
  curve still rising, or a line through noise) rather than a measured ceiling."""
  p_inf: float
  p_0: float
  r0: float
  rmse: float
  converged: bool
  identified: bool = False

  def __call__(self, rounds) -> np.ndarray:
    """The fitted curve at rounds (the mean everywhere for the fallback)."""
    rounds = np.asarray(rounds, np.float64)
    if not self.converged:
      return np.full(rounds.shape, self.p_inf)
    return _saturating(rounds, self.p_inf, self.p_0, self.r0)


def _saturating(r, p_inf, p_0, r0):
  return p_inf - (p_inf - p_0) * np.exp(-r / r0)


def fit_saturating(rounds, values) -> SaturatingFit:
  """Least-squares fit of the saturating curve (module docstring) to values [n] at rounds
  [n], r0 in [1e-3, 1e3], p_inf and p_0 in [0, 1] (widened by the data's range when the
  data leaves [0, 1]), starting from p_0 = the first value, p_inf = the last, r0 = 1.

  Never raises on a curve it cannot fit: with 3 or fewer points (no more than the three
  parameters), a flat curve (nothing to fit r0 to), or a solver that does not converge,
  it returns the fallback p_inf = p_0 = mean, r0 = NaN, converged False (NaN means for no
  points). A converged r0 at a bound says the curve is a step (1e-3) or a line (1e3)
  over the rounds seen, not a saturation.
  """
  rounds, values = np.asarray(rounds, np.float64), np.asarray(values, np.float64)
  if rounds.ndim != 1 or rounds.shape != values.shape:
    raise UserError(f'fit_saturating needs rounds [n] and values [n]; got {rounds.shape}, '
                    f'{values.shape}')
  if not (np.isfinite(rounds).all() and np.isfinite(values).all()):
    raise UserError('fit_saturating needs finite rounds and values')
  mean = float(values.mean()) if values.size else float('nan')
  fallback = SaturatingFit(
      p_inf=mean, p_0=mean, r0=float('nan'),
      rmse=float(np.sqrt(np.mean((values - mean)**2))) if values.size else float('nan'),
      converged=False)
  if values.size <= 3 or np.ptp(values) == 0:
    return fallback
  span = np.ptp(values)
  p_lo = min(_P_BOUNDS[0], values.min() - span)
  p_hi = max(_P_BOUNDS[1], values.max() + span)
  order = np.argsort(rounds, kind='stable')  # "first" and "last" in round order
  guess = [values[order[-1]], values[order[0]], 1.0]
  try:
    with warnings.catch_warnings():
      # The covariance is not used; a singular one is no reason to warn the loop's log.
      warnings.simplefilter('ignore', optimize.OptimizeWarning)
      (p_inf, p_0, r0), _ = optimize.curve_fit(
          _saturating, rounds, values, p0=guess,
          bounds=([p_lo, p_lo, _R0_BOUNDS[0]], [p_hi, p_hi, _R0_BOUNDS[1]]))
  except (RuntimeError, ValueError):  # no convergence within maxfev, or NaN residuals
    return fallback
  residual = _saturating(rounds, p_inf, p_0, r0) - values
  return SaturatingFit(p_inf=float(p_inf), p_0=float(p_0), r0=float(r0),
                       rmse=float(np.sqrt(np.mean(residual**2))), converged=True,
                       identified=bool(r0 <= np.ptp(rounds)))
