"""Which unlabelled preference pairs to send to the annotators next (active learning).

A strategy is chosen by name from `STRATEGIES`; 'disagreement' ranks candidates by how
much the members of a reward-model ensemble disagree about which response wins.
"""
import numpy as np

from rlhf_jax.errors import UserError

STRATEGIES = ('random', 'disagreement')


def disagreement(first_rewards, second_rewards) -> np.ndarray:
  """first_rewards, second_rewards: [K, N] member rewards of each pair's two responses.
  Returns [N]: the standard deviation over members of P(first wins) = sigmoid(r1 - r2)
  (symmetric in the order of the two responses)."""
  margin = np.asarray(first_rewards, np.float64) - np.asarray(second_rewards, np.float64)
  return (1 / (1 + np.exp(-margin))).std(axis=0)


def select(*, strategy: str, scores: np.ndarray | None, candidates: np.ndarray, n: int,
           rng: np.random.Generator) -> np.ndarray:
  """n of `candidates` ([M] int row indices); scores: [>= max(candidates) + 1] per row
  ('disagreement' only; higher is more informative). Returns [min(n, M)] indices."""
  candidates = np.asarray(candidates)
  n = min(int(n), len(candidates))
  if strategy == 'random':
    return rng.choice(candidates, size=n, replace=False)
  if strategy == 'disagreement':
    if scores is None:
      raise UserError("strategy 'disagreement' needs scores")
    # Stable sort of the negated scores: ties go to the earlier candidate.
    order = np.argsort(-np.asarray(scores)[candidates], kind='stable')
    return candidates[order[:n]]
  raise UserError(f'unknown acquisition strategy {strategy!r}; choose one of '
                  f'{", ".join(STRATEGIES)}')
