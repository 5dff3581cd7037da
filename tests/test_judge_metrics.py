"""The judge's metrics against independent counts: a planted judge whose every mistake,
position flip and pick of the longer response is chosen by hand (its metrics counted by
plain loops over the plan and written out as numbers), random pairs against a loop-based
reference of every key, the swap symmetry of the verdict bit for bit, and bad input as one
UserError line."""
import math

import numpy as np
import pytest

from rlhf_jax.analysis import judge_metrics
from rlhf_jax.errors import UserError

NAMES = ('helpful', 'honest', 'concise', 'unused')  # 'unused' has no pair at all
# The planted judge. VERDICT: which response the averaged reading picks (+1 first, -1
# second, 0 a tie at exactly 1/2); FWD / BWD: which one each single reading chose (0: a
# reading of exactly 1/2). The readings are multiples of 1/8, so every average is exact.
#   principle truth gold len1 len2 src  p_fwd  p_bwd  VERDICT FWD BWD
ROWS = [
    (0, 1, 1, 10, 20, 0, .75, .875, +1, +1, +1),   # right; picks the shorter
    (0, -2, -1, 30, 10, 0, .25, .125, -1, -1, -1),  # right; picks the shorter
    (0, 1, -1, 20, 10, 1, .875, .75, +1, +1, +1),  # right by truth, wrong by gold; longer
    (0, 0, .5, 15, 15, 1, .75, .25, 0, +1, -1),    # truth tie; always picks shown-first
    (1, 1, 1, 12, 40, 0, .25, .375, -1, -1, -1),   # wrong, for the longer one
    (1, -1, -1, 40, 12, 0, .875, .25, +1, +1, -1),  # wrong, flips, for the longer one
    (1, 3, 2, 8, 8, 1, .625, .5, +1, +1, 0),       # right; undecided backward = a flip
    (1, 0, 0, 20, 25, 1, .5, .5, 0, 0, 0),         # undecided on a full tie
    (2, 1, -1, 5, 50, 0, .75, .625, +1, +1, +1),   # right by truth, wrong by gold
    (2, -1, 1, 50, 5, 0, .125, .25, -1, -1, -1),   # right by truth, wrong by gold
    (2, 1, 1, 30, 60, 1, .375, .625, 0, -1, +1),   # always picks shown-second: a tie
    (2, -1, -1, 60, 30, 1, .625, .75, +1, +1, +1),  # wrong, for the longer one
]
# The same numbers counted by hand from the table.
HAND = {
    'judge/agreement': 6.5 / 10, 'judge/gold_agreement': 4 / 11,
    'judge/agreement/helpful': 1.0, 'judge/gold_agreement/helpful': 2.5 / 4,
    'judge/agreement/honest': 1 / 3, 'judge/gold_agreement/honest': 1 / 3,
    'judge/agreement/concise': 2.5 / 4, 'judge/gold_agreement/concise': 0.5 / 4,
    'judge/pairs/helpful': 4, 'judge/pairs/honest': 4, 'judge/pairs/concise': 4,
    'judge/pairs/unused': 0,
    'judge/position_flip_rate': 4 / 12, 'judge/first_shown_rate': 13.5 / 24,
    'judge/longer_rate': 5 / 10, 'judge/truth_longer_rate': 1.5 / 10,
    'judge/length_bias': 3.5 / 10,
    'judge/agreement_own': 4 / 6, 'judge/agreement_other': 2.5 / 4,
    'judge/self_preference': 4 / 6 - 2.5 / 4,
    'judge/gold_agreement_own': 2 / 6, 'judge/gold_agreement_other': 2 / 5,
    'judge/pairs': 12,
}


def _sign(x):
  return (x > 0) - (x < 0)


def _score(a, b):
  """1 where two choices (+1/-1) match, 0 where opposite, 1/2 where either is a tie."""
  if a == 0 or b == 0:
    return 0.5
  return 1.0 if a == b else 0.0


def _columns(rows):
  cols = list(zip(*rows))
  keys = ('principle', 'truth_gap', 'gold_gap', 'first_length', 'second_length', 'source',
          'p_forward', 'p_backward')
  return {k: np.array(c) for k, c in zip(keys, cols)}


def _mean_or_skip(out, key, scores):
  if scores:
    out[key] = sum(scores) / len(scores)


def _expected(rows, names, verdicts, chose_fwd, chose_bwd, with_source=True):
  """Every metric by loops over the pairs, from which response each verdict and each
  single reading picked (+1 first, -1 second, 0 neither)."""
  out = {}
  groups = [('', lambda r: True)]
  groups += [(f'/{n}', lambda r, i=i: r[0] == i) for i, n in enumerate(names)]
  if with_source:
    groups += [('_own', lambda r: r[5] == 0), ('_other', lambda r: r[5] == 1)]
  for suffix, member in groups:
    for key, col in (('agreement', 1), ('gold_agreement', 2)):
      scores = []
      for r, v in zip(rows, verdicts):
        if member(r) and r[col] != 0:
          scores.append(_score(v, _sign(r[col])))
      _mean_or_skip(out, f'judge/{key}{suffix}', scores)
  for i, n in enumerate(names):
    out[f'judge/pairs/{n}'] = sum(1 for r in rows if r[0] == i)
  flips = 0
  for f, b in zip(chose_fwd, chose_bwd):
    flips += (f == 1) != (b == 1)
  out['judge/position_flip_rate'] = flips / len(rows)
  shown_first = []
  for f, b in zip(chose_fwd, chose_bwd):
    shown_first.append(_score(f, +1))  # forward, `first` is shown first
    shown_first.append(_score(b, -1))  # backward, `second` is
  out['judge/first_shown_rate'] = sum(shown_first) / len(shown_first)
  judge, truth = [], []
  for r, v in zip(rows, verdicts):
    if r[3] != r[4]:
      longer = +1 if r[3] > r[4] else -1
      judge.append(_score(v, longer))
      truth.append(_score(_sign(r[1]), longer))
  if judge:
    out['judge/longer_rate'] = sum(judge) / len(judge)
    out['judge/truth_longer_rate'] = sum(truth) / len(truth)
    out['judge/length_bias'] = out['judge/longer_rate'] - out['judge/truth_longer_rate']
  if 'judge/agreement_own' in out and 'judge/agreement_other' in out:
    out['judge/self_preference'] = out['judge/agreement_own'] - out['judge/agreement_other']
  out['judge/pairs'] = len(rows)
  return out


def _reference(rows, names, with_source=True):
  """`_expected` from the readings alone: each verdict and reading's pick, by a loop."""
  verdicts, fwd, bwd = [], [], []
  for r in rows:
    verdicts.append(_sign((r[6] + r[7]) / 2 - 0.5))
    fwd.append(_sign(r[6] - 0.5))
    bwd.append(_sign(r[7] - 0.5))
  return _expected(rows, names, verdicts, fwd, bwd, with_source)


def _metrics(rows, names, with_source=True):
  c = _columns(rows)
  return judge_metrics.metrics(
      p_forward=c['p_forward'], p_backward=c['p_backward'], principle=c['principle'],
      principle_names=names, truth_gap=c['truth_gap'], gold_gap=c['gold_gap'],
      first_length=c['first_length'], second_length=c['second_length'],
      source=c['source'] if with_source else None)


def _assert_same(got, want):
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if isinstance(value, int):
      assert type(got[key]) is int and got[key] == value, key
    else:
      assert type(got[key]) is float and got[key] == pytest.approx(value, abs=1e-12), key


def test_planted_judge_readings_realise_the_plan():
  for r in ROWS:
    assert _sign(float(judge_metrics.verdict(r[6], r[7])) - 0.5) == r[8]
    assert _sign(r[6] - 0.5) == r[9] and _sign(r[7] - 0.5) == r[10]


def test_planted_judge_metrics_match_loop_counts_and_hand_counts():
  planned = _expected(ROWS, NAMES, [r[8] for r in ROWS], [r[9] for r in ROWS],
                      [r[10] for r in ROWS])
  _assert_same(planned, HAND)
  _assert_same(_reference(ROWS, NAMES), HAND)
  _assert_same(_metrics(ROWS, NAMES), HAND)
  assert 'judge/agreement/unused' not in HAND  # a principle without untied pairs


def test_without_source_no_source_keys():
  got = _metrics(ROWS, NAMES, with_source=False)
  want = {k: v for k, v in HAND.items() if '_own' not in k and '_other' not in k
          and 'self_preference' not in k}
  _assert_same(got, want)


def test_a_source_without_untied_pairs_drops_its_keys_and_self_preference():
  # Only truth-tied pairs from the other policy: its truth keys go, its gold keys stay.
  rows = [r for r in ROWS if r[5] == 0 or r[1] == 0]
  got = _metrics(rows, NAMES)
  assert 'judge/agreement_other' not in got and 'judge/self_preference' not in got
  assert 'judge/gold_agreement_other' in got and 'judge/agreement_own' in got
  _assert_same(got, _reference(rows, NAMES))
  # Equal lengths everywhere: no length keys.
  rows = [r[:3] + (7, 7) + r[5:] for r in ROWS]
  got = _metrics(rows, NAMES)
  assert not any('longer' in k or 'length' in k for k in got)
  _assert_same(got, _reference(rows, NAMES))


@pytest.mark.parametrize('grid', [True, False])
def test_random_pairs_match_loop_reference(grid):
  rng = np.random.default_rng(1 if grid else 2)
  n = 500
  if grid:  # multiples of 1/8: exact ties of readings and verdicts happen often
    p = rng.integers(0, 9, size=(2, n)) / 8
  else:
    p = rng.uniform(size=(2, n))
  rows = list(zip(rng.integers(0, 3, n).tolist(), rng.integers(-2, 3, n).tolist(),
                  rng.normal(size=n).round(1).tolist(), rng.integers(1, 6, n).tolist(),
                  rng.integers(1, 6, n).tolist(), rng.integers(0, 2, n).tolist(),
                  p[0].tolist(), p[1].tolist()))
  _assert_same(_metrics(rows, NAMES), _reference(rows, NAMES))
  _assert_same(_metrics(rows, NAMES, with_source=False),
               _reference(rows, NAMES, with_source=False))


def test_verdict_swap_symmetry_is_exact():
  rng = np.random.default_rng(3)
  pf, pb = rng.integers(0, 2**52 + 1, size=(2, 1000)) / 2**52
  pf[:3], pb[:3] = (0.0, 1.0, 0.5), (1.0, 0.0, 0.5)
  v = judge_metrics.verdict(pf, pb)
  np.testing.assert_array_equal(judge_metrics.verdict(1 - pb, 1 - pf), 1 - v)
  # Any float readings: the same to within rounding.
  pf, pb = rng.uniform(size=(2, 1000))
  np.testing.assert_allclose(judge_metrics.verdict(1 - pb, 1 - pf),
                             1 - judge_metrics.verdict(pf, pb), rtol=0, atol=1e-15)


@pytest.mark.parametrize('change', [
    dict(p_forward=[]), dict(p_forward=[0.5, 0.5]), dict(p_backward=[1.5]),
    dict(p_forward=[-0.1]), dict(p_backward=[math.nan]), dict(principle=[3]),
    dict(principle=[-1]), dict(principle=[0.5]), dict(source=[2]),
    dict(truth_gap=[math.inf]), dict(gold_gap=[[1.0]]), dict(first_length=['long']),
    dict(principle_names=()), dict(principle_names=('a', 'a', 'b')),
])
def test_bad_input_is_one_user_error_line(change):
  args = dict(p_forward=[0.7], p_backward=[0.6], principle=[0],
              principle_names=('a', 'b', 'c'), truth_gap=[1.0], gold_gap=[1.0],
              first_length=[3], second_length=[4], source=[0])
  args.update(change)
  with pytest.raises(UserError) as e:
    judge_metrics.metrics(**args)
  assert '\n' not in str(e.value)
