"""A learned verifier (an outcome reward model) measured against the true one, host NumPy.

`classification` grades P(correct) against the verifier's labels at the threshold 1/2
(score > 0 for one member): accuracy, false-positive rate P(judged right | wrong),
false-negative rate P(judged wrong | right), AUC (the chance that a right response
outscores a wrong one, ties half) and the base rate of right responses. An ORM trained on
a skewed base rate may never cross 1/2 (FP rate 0, FN rate 1), so the false-positive rate
is also given where it accepts as many responses as are right: the top base-rate share of
scores (`orm/false_positive_rate_at_base_rate`, ties at the cut accepted). `best_of_k` is
test-time best-of-n under the learned verifier.
"""
import numpy as np


def classification(prob, label) -> dict:
  """prob [N] P(correct) in [0, 1], label [N] 1/0 (> 0.5 counts as right) -> metrics
  `orm/*`. A rate whose class is absent is NaN (no such response to judge)."""
  prob = np.asarray(prob, np.float64)
  right = np.asarray(label, np.float64) > 0.5
  said = prob > 0.5
  wrong = ~right
  rate = lambda hits, of: float(hits.sum() / of.sum()) if of.any() else float('nan')
  eps = 1e-12
  loss = -(right * np.log(np.clip(prob, eps, 1)) + wrong * np.log(np.clip(1 - prob, eps, 1)))
  return {
      'orm/accuracy': float((said == right).mean()),
      'orm/false_positive_rate': rate(said & wrong, wrong),
      'orm/false_negative_rate': rate(~said & right, right),
      'orm/auc': auc(prob, right),
      'orm/base_rate': float(right.mean()),
      'orm/false_positive_rate_at_base_rate': rate(top_share(prob, right.mean()) & wrong,
                                                   wrong),
      'orm/judged_right_rate': float(said.mean()),
      'orm/loss': float(loss.mean()),
      'orm/responses': int(prob.shape[0]),
  }


def top_share(scores, share: float) -> np.ndarray:
  """[N] bool: the scores at or above the round(share x N)-th highest (none for 0)."""
  scores = np.asarray(scores, np.float64)
  n = int(round(share * scores.shape[0]))
  if n == 0:
    return np.zeros(scores.shape, bool)
  return scores >= np.sort(scores)[::-1][n - 1]


def auc(scores, positive) -> float:
  """Mann-Whitney AUC: P(score of a positive > score of a negative), ties counted 1/2,
  from average ranks (O(N log N)); NaN without both classes."""
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(positive, bool)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if not (n_pos and n_neg):
    return float('nan')
  order = np.argsort(scores, kind='stable')
  ranks = np.empty(len(scores), np.float64)
  sorted_scores = scores[order]
  # Average rank (1-based) over each run of equal scores.
  starts = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1]
  ends = np.r_[starts[1:], len(scores)]
  for lo, hi in zip(starts, ends):
    ranks[order[lo:hi]] = (lo + 1 + hi) / 2
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_of_k(scores, correct, k: int) -> np.ndarray:
  """scores [M, n] (the learned verifier's, per problem and sample), correct [M, n] 1/0 ->
  [M]: the correctness of the highest-scored of each problem's first k samples, the
  first of them on ties."""
  scores = np.asarray(scores)[:, :k]
  best = np.argmax(scores, axis=1)  # the first maximum
  return np.take_along_axis(np.asarray(correct, np.float64)[:, :k], best[:, None], axis=1)[:, 0]
