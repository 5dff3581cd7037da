"""Elo ratings from match results, anchored at the uniform-random player (Elo 0).

Under the Elo model a player rated r scores E(r - r_j) = 1 / (1 + 10^(-(r - r_j)/400))
in expectation against one rated r_j (a draw scores 1/2). A new player's rating is the
maximum-likelihood r given its results against players whose ratings are fixed:
sum_j n_j (s_j - E(r - r_j)) = 0, where s_j is its mean score against j. Every opponent
also counts `prior_draws` virtual draws, so that a player who wins every game gets a
finite rating (its score is then (n + d/2) / (n + d) rather than 1).
"""
import numpy as np


def expected_score(diff) -> np.ndarray:
  """E(r - r_j) for a rating difference (array or scalar)."""
  return 1.0 / (1.0 + 10.0 ** (-np.asarray(diff, np.float64) / 400.0))


def fit(*, wins, draws, losses, opponent_ratings, prior_draws: float = 1.0) -> float:
  """The maximum-likelihood rating of one player from its results against each opponent
  (equal-length sequences). The score equation is monotone in r, so bisection on
  [min r_j - 4000, max r_j + 4000] finds its one root to 1e-9 Elo."""
  w, d, l, r = (np.asarray(x, np.float64) for x in (wins, draws, losses, opponent_ratings))
  games = w + d + l + prior_draws
  points = w + 0.5 * d + 0.5 * prior_draws
  if not games.size or games.sum() <= 0:
    raise ValueError('no games to rate')

  def excess(rating):  # observed minus expected points; decreasing in rating
    return float(np.sum(points - games * expected_score(rating - r)))

  lo, hi = float(r.min()) - 4000.0, float(r.max()) + 4000.0
  while hi - lo > 1e-9:
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
  return 0.5 * (lo + hi)
