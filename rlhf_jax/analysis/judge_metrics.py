"""An AI judge's pairwise verdicts against the world's truth, host NumPy (float64).

The judge reads each pair (first, second) twice, once in each order, and `verdict`
averages the two readings so that a pull toward one position cancels. `metrics` grades the
averaged verdict against the pair's principle (its truth gap) and against the gold reward,
and measures the judge's biases: position (flips between the orders, picks of the response
shown first), length (picks of the longer response, net of how often the truth picks it)
and, given the pairs' sources, self-preference (agreement on pairs sampled from the judge's
own policy minus agreement on another policy's).

A choice scores 1, 0 or 1/2 for a tie (a reading or verdict of exactly 1/2, a truth gap of
0), so a judge that sits on the fence scores as a coin would. A rate over an empty set of
pairs is left out of the dict rather than given as NaN, so that no logger averages a NaN.
"""
import numpy as np

from rlhf_jax.errors import UserError


def verdict(p_forward, p_backward) -> np.ndarray:
  """p_forward [N] P(first better) read with first shown first, p_backward [N] P(first
  better) read with first shown second -> [N] the order-averaged P(first better).

  Swapping the two responses maps (p_forward, p_backward) to (1 - p_backward,
  1 - p_forward), so verdict(swapped) == 1 - verdict: exactly in real arithmetic, and bit
  for bit in float64 where the readings are multiples of 2**-52 (every step is then exact);
  otherwise to within a rounding or two.
  """
  return (np.asarray(p_forward, np.float64) + np.asarray(p_backward, np.float64)) / 2


def _score(x) -> np.ndarray:
  """[N] 1 where x > 0, 0 where x < 0, 1/2 at 0."""
  return (1 + np.sign(x)) / 2


def metrics(*, p_forward, p_backward, principle, principle_names, truth_gap, gold_gap,
            first_length, second_length, source=None) -> dict:
  """All arrays [N], N >= 1: p_forward, p_backward the two readings of P(first better) (see
  `verdict`), in [0, 1]; principle int index into the sequence `principle_names`;
  truth_gap the principle's utility of first minus second (0: a tie); gold_gap the gold
  reward of first minus second; first_length, second_length in tokens; source None or 0
  (sampled from the judge's own policy) / 1 (another policy) -> metrics `judge/*`.

  A single reading chooses first iff it is > 1/2 (so 1/2 chooses neither, and a pair
  flips on position iff exactly one of its readings is > 1/2)."""
  names = list(principle_names)
  if not names or len(set(names)) != len(names):
    raise UserError(f'judge metrics: principle_names must be distinct and non-empty, '
                    f'got {names}')
  arrays = dict(p_forward=p_forward, p_backward=p_backward, principle=principle,
                truth_gap=truth_gap, gold_gap=gold_gap, first_length=first_length,
                second_length=second_length)
  if source is not None:
    arrays['source'] = source
  a = {name: _vector(name, x) for name, x in arrays.items()}
  sizes = {name: x.shape[0] for name, x in a.items()}
  if len(set(sizes.values())) != 1:
    raise UserError(f'judge metrics: arrays differ in length: {sizes}')
  for name in ('p_forward', 'p_backward'):
    if ((a[name] < 0) | (a[name] > 1)).any():
      raise UserError(f'judge metrics: {name} holds values outside [0, 1]')
  pr = a['principle']
  if (pr != np.round(pr)).any() or (pr < 0).any() or (pr >= len(names)).any():
    raise UserError(f'judge metrics: principle must be integers in [0, {len(names)})')
  if source is not None and not np.isin(a['source'], (0, 1)).all():
    raise UserError('judge metrics: source must be 0 (own policy) or 1 (other policy)')

  pf, pb = a['p_forward'], a['p_backward']
  lean = np.sign(verdict(pf, pb) - 0.5)  # 0 only where the verdict is exactly 1/2
  out = {}

  def agreements(suffix, where):
    for key, gap in (('agreement', a['truth_gap']), ('gold_agreement', a['gold_gap'])):
      graded = where & (gap != 0)
      if graded.any():
        out[f'judge/{key}{suffix}'] = float(_score(lean * np.sign(gap))[graded].mean())

  agreements('', np.ones(pf.shape, bool))
  for i, name in enumerate(names):
    agreements(f'/{name}', pr == i)
    out[f'judge/pairs/{name}'] = int((pr == i).sum())
  out['judge/position_flip_rate'] = float(((pf > 0.5) != (pb > 0.5)).mean())
  # Backward, the response shown first is `second`: a reading below 1/2 chose it.
  out['judge/first_shown_rate'] = float(np.r_[_score(pf - 0.5), _score(0.5 - pb)].mean())
  longer = np.sign(a['first_length'] - a['second_length'])  # +1: first is the longer
  if longer.any():
    unequal = longer != 0
    judge = float(_score(lean * longer)[unequal].mean())
    truth = float(_score(np.sign(a['truth_gap']) * longer)[unequal].mean())
    out.update({'judge/longer_rate': judge, 'judge/truth_longer_rate': truth,
                'judge/length_bias': judge - truth})
  if source is not None:
    agreements('_own', a['source'] == 0)
    agreements('_other', a['source'] == 1)
    if 'judge/agreement_own' in out and 'judge/agreement_other' in out:
      out['judge/self_preference'] = (out['judge/agreement_own'] -
                                      out['judge/agreement_other'])
  out['judge/pairs'] = int(pf.shape[0])
  return out


def _vector(name, x) -> np.ndarray:
  """x as a finite, non-empty float64 [N], else a one-line UserError naming it."""
  try:
    x = np.asarray(x, np.float64)
  except (TypeError, ValueError):
    raise UserError(f'judge metrics: {name} is not numeric') from None
  if x.ndim != 1 or x.shape[0] == 0:
    raise UserError(f'judge metrics: {name} must be a non-empty 1-D array, got shape '
                    f'{x.shape}')
  if not np.isfinite(x).all():
    raise UserError(f'judge metrics: {name} holds non-finite values')
  return x
