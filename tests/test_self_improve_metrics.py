"""analysis/self_improve_metrics against plain-Python counts and a linearised error model."""
import collections
import math

import numpy as np
import pytest

from rlhf_jax.analysis import self_improve_metrics as sim
from rlhf_jax.errors import UserError


def _python_filter_stats(kept, correct):
  n_kept = n_correct = both = 0
  for k, c in zip(kept, correct):
    n_kept += bool(k)
    n_correct += bool(c)
    both += bool(k) and bool(c)
  nan = float('nan')
  return {'kept_fraction': n_kept / len(kept) if len(kept) else nan,
          'precision': both / n_kept if n_kept else nan,
          'recall': both / n_correct if n_correct else nan,
          'kept': n_kept, 'correct': n_correct}


def _same(got, want):
  assert got.keys() == want.keys()
  for key in want:
    if isinstance(want[key], float) and math.isnan(want[key]):
      assert math.isnan(got[key]), key
    else:
      assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_filter_stats_matches_python_count():
  rng = np.random.default_rng(0)
  for n in (1, 7, 50):
    kept, correct = rng.random(n) < 0.4, rng.random(n) < 0.6
    _same(sim.filter_stats(kept, correct), _python_filter_stats(kept, correct))
  planted = sim.filter_stats([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
  _same(planted, {'kept_fraction': 0.6, 'precision': 2 / 3, 'recall': 2 / 3, 'kept': 3,
                  'correct': 3})
  # Nothing kept: precision undefined; nothing correct: recall undefined. NaN, not 0/1.
  nothing = sim.filter_stats(np.zeros(4, bool), [1, 0, 1, 0])
  _same(nothing, _python_filter_stats([0] * 4, [1, 0, 1, 0]))
  assert math.isnan(nothing['precision']) and nothing['recall'] == 0.0
  assert math.isnan(sim.filter_stats([1, 0], [0, 0])['recall'])
  with pytest.raises(UserError):
    sim.filter_stats(np.ones(3, bool), np.ones(4, bool))


def _python_keep(answers, found):
  kept = np.zeros(found.shape, bool)
  for i in range(found.shape[0]):
    votes = collections.Counter()
    first_seen = {}
    for j in range(found.shape[1]):
      if found[i, j]:
        a = tuple(answers[i, j])
        votes[a] += 1
        first_seen.setdefault(a, j)
    if not votes:
      continue
    top = max(votes.values())
    winner = min((a for a in votes if votes[a] == top), key=first_seen.get)
    for j in range(found.shape[1]):
      kept[i, j] = bool(found[i, j]) and tuple(answers[i, j]) == winner
  return kept


def test_self_consistency_keep_planted_and_random():
  a, b, c = [1, 2], [3, 4], [1, 4]
  answers = np.array([
      [b, a, a, b, c],  # a and b tie at 2: b seen first wins
      [a, a, b, b, b],  # but the first a is not found: b wins 3 to 1
      [c, a, b, c, a],  # nothing found: nothing kept
      [c, c, a, a, b],  # c's two votes include an unfound one: a wins 2 to 1
  ])
  found = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 1]],
                   bool)
  want = np.array([[1, 0, 0, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 0]],
                  bool)
  np.testing.assert_array_equal(_python_keep(answers, found), want)
  np.testing.assert_array_equal(sim.self_consistency_keep(answers, found), want)
  rng = np.random.default_rng(1)
  pool = np.array([[3, 4], [5, 0], [3, 0]])  # three answers sharing tokens: frequent ties
  for k in (1, 4, 7):
    answers = pool[rng.integers(0, 3, (200, k))]
    found = rng.random((200, k)) < 0.6
    np.testing.assert_array_equal(sim.self_consistency_keep(answers, found),
                                  _python_keep(answers, found))
  with pytest.raises(UserError):
    sim.self_consistency_keep(np.zeros((2, 3)), np.zeros((2, 3), bool))


def _python_diversity(responses, mask, answers, found):
  p, k = found.shape
  distinct, entropy = [], []
  for i in range(p):
    traces = {tuple(int(t) for t, m in zip(responses[i, j], mask[i, j]) if m)
              for j in range(k)}
    distinct.append(len(traces) / k)
    counts = collections.Counter(tuple(answers[i, j]) if found[i, j] else 'none'
                                 for j in range(k))
    entropy.append(-sum(n / k * math.log(n / k) for n in counts.values()))
  return {'distinct_traces': sum(distinct) / p, 'answer_entropy': sum(entropy) / p}


def test_diversity_matches_set_and_counter():
  rng = np.random.default_rng(2)
  p, k, r = 60, 6, 5
  for _ in range(3):
    # Short responses over two tokens, so traces repeat; lengths 1..r with EOS (=9) last.
    responses = rng.integers(0, 2, (p, k, r))
    length = rng.integers(1, r + 1, (p, k))
    responses[np.arange(r) == (length - 1)[..., None]] = 9
    mask = (np.arange(r) < length[..., None]).astype(np.int32)
    # After EOS: junk that differs between otherwise identical traces.
    responses = np.where(mask > 0, responses, rng.integers(0, 9, (p, k, r)))
    answers = rng.integers(0, 2, (p, k, 2))
    found = rng.random((p, k)) < 0.7
    got = sim.diversity(responses, mask, answers, found)
    want = _python_diversity(responses, mask, answers, found)
    assert got == pytest.approx(want, abs=1e-12)
  # Two traces equal up to EOS, different after it, are one; a third is another.
  responses = np.array([[[4, 9, 1], [4, 9, 2], [4, 5, 9]]])
  mask = np.array([[[1, 1, 0], [1, 1, 0], [1, 1, 1]]])
  answers = np.array([[[7], [7], [8]]])
  got = sim.diversity(responses, mask, answers, np.array([[1, 1, 0]], bool))
  # Answers: {7: 2, none: 1}.
  assert got == pytest.approx({'distinct_traces': 2 / 3,
                               'answer_entropy': -(2 / 3 * math.log(2 / 3)
                                                   + 1 / 3 * math.log(1 / 3))}, abs=1e-12)


def _linearised_se(rounds, p_inf, p_0, r0, sd):
  """The least-squares estimator's standard errors to first order, sd * sqrt(diag((J^T
  J)^-1)), J the curve's closed-form derivatives at the true parameters."""
  e = np.exp(-rounds / r0)
  jac = np.stack([1 - e, e, -(p_inf - p_0) * e * rounds / r0**2], axis=1)
  return sd * np.sqrt(np.diag(np.linalg.inv(jac.T @ jac)))


@pytest.mark.parametrize('p_inf,p_0', [(0.8, 0.2), (0.3, 0.9)])
def test_fit_saturating_recovers_rising_and_falling(p_inf, p_0):
  rounds, r0, sd = np.arange(10.0), 2.0, 0.01
  clean = p_inf - (p_inf - p_0) * np.exp(-rounds / r0)
  exact = sim.fit_saturating(rounds, clean)
  assert exact.converged
  np.testing.assert_allclose([exact.p_inf, exact.p_0, exact.r0], [p_inf, p_0, r0],
                             atol=1e-6)
  assert exact.rmse < 1e-8
  # ~(0.006, 0.010, 0.086); 400 seeded refits gave sd (0.0065, 0.0097, 0.088).
  se = _linearised_se(rounds, p_inf, p_0, r0, sd)
  for seed in range(5):
    noisy = clean + np.random.default_rng(seed).normal(0, sd, rounds.shape)
    fit = sim.fit_saturating(rounds, noisy)
    assert fit.converged
    # 4 standard errors: a false failure about once in 10^4 per parameter and seed.
    assert np.all(np.abs(np.array([fit.p_inf, fit.p_0, fit.r0]) - [p_inf, p_0, r0])
                  < 4 * se)
    residual = fit(rounds) - noisy
    assert fit.rmse == pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-9)
    # Least squares beats the true curve on its own data, and sits near the noise level.
    assert fit.rmse <= np.sqrt(np.mean((clean - noisy)**2)) + 1e-12
    assert 0.3 * sd < fit.rmse < 2 * sd


@pytest.mark.parametrize('values', [[], [0.4], [0.1, 0.5, 0.6], [0.5] * 6])
def test_fit_saturating_degenerate_falls_back(values):
  fit = sim.fit_saturating(np.arange(len(values)), values)
  assert not fit.converged and math.isnan(fit.r0)
  if values:
    mean = sum(values) / len(values)
    assert fit.p_inf == fit.p_0 == pytest.approx(mean, abs=1e-12)
    assert fit.rmse == pytest.approx(
        math.sqrt(sum((v - mean)**2 for v in values) / len(values)), abs=1e-12)
  else:
    assert math.isnan(fit.p_inf) and math.isnan(fit.p_0)
  with pytest.raises(UserError):
    sim.fit_saturating(np.arange(3), [0.1, float('nan'), 0.2])


def test_fit_saturating_says_whether_the_ceiling_was_seen():
  """identified: r0 within the rounds fitted. A curve saturating at r0 = 1 over rounds
  0..4 is; a straight line over the same rounds is not (its fitted r0 runs past them, and
  p_inf is an extrapolation, kept inside [0, 1] for values that are)."""
  rounds = np.arange(5.0)
  seen = sim.fit_saturating(rounds=rounds, values=0.8 - 0.6 * np.exp(-rounds))
  assert seen.identified and seen.r0 == pytest.approx(1.0, abs=1e-6)
  line = sim.fit_saturating(rounds=rounds, values=0.3 - 0.02 * rounds)
  assert line.converged and not line.identified and line.r0 > 4
  assert 0.0 <= line.p_inf <= 0.3
