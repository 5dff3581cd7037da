"""Best-of-n: the exact discrete distribution against every one of the K^n draws in exact
rationals, its KL against the continuous bound (below it by the second-order Jensen gap,
strictly below with ties), `select` on sampled draws against it, the KL estimator on a
Gaussian toy and a tied toy against exact expectations, and the experiment's bad input.

Monte-Carlo checks allow 4 standard errors, so a fixed seed that passes is not a fluke:
each comparison alone fails by chance about once in 16000 seeds.
"""
import itertools
import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from conftest import REPO, cli_env
from rlhf_jax.analysis import best_of_n as bon
from rlhf_jax.errors import UserError

# A reference over six outcomes with ties (1 and 2 share a reward, as do 4 and 5).
TOY_PROBS = np.array([0.15, 0.1, 0.2, 0.25, 0.1, 0.2])
TOY_REWARDS = np.array([0.0, 1.0, 1.0, 2.0, 3.0, 3.0])


def test_select_takes_the_first_maximum():
  rewards = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [-1.0, -2.0, 0.5]])
  np.testing.assert_array_equal(bon.select(rewards), [1, 0, 2])
  assert bon.kl_bound(1) == 0.0
  assert bon.kl_bound(4) == pytest.approx(math.log(4) - 0.75, abs=1e-15)
  with pytest.raises(UserError):
    bon.kl_bound(0)


def brute_force(probs, rewards, n):
  """Best-of-n over all K^n draws in exact rationals: the kept draw is the first of the
  highest reward (plain Python, not `select`)."""
  pi = [Fraction(0)] * len(probs)
  for draws in itertools.product(range(len(probs)), repeat=n):
    best = max(range(n), key=lambda i: (rewards[draws[i]], -i))
    pi[draws[best]] += math.prod(probs[d] for d in draws)
  return pi


@pytest.mark.parametrize('n', [1, 2, 3])
def test_exact_discrete_matches_every_draw(n):
  probs = [Fraction(1, 10), Fraction(3, 10), Fraction(2, 10), Fraction(4, 10)]
  rewards = [1.0, 0.0, 1.0, 2.0]               # outcomes 0 and 2 tie
  want = brute_force(probs, rewards, n)
  want_kl = sum(float(q) * math.log(q / p) for q, p in zip(want, probs) if q)
  pi_bon, kl = bon.exact_discrete(probs=np.array(probs, float), rewards=np.array(rewards), n=n)
  np.testing.assert_allclose(pi_bon, [float(q) for q in want], rtol=0, atol=1e-14)
  assert kl == pytest.approx(want_kl, abs=1e-14)
  # The tie is split in proportion to the reference (1 : 2), not given to one outcome.
  assert pi_bon[2] == pytest.approx(2 * pi_bon[0], rel=1e-12)


@pytest.mark.parametrize('n', [2, 4, 16])
def test_near_continuous_kl_reaches_the_bound_and_ties_lower_it(n):
  rng = np.random.default_rng(n)
  k = 2000
  probs = rng.uniform(0.5, 1.5, k)
  probs /= probs.sum()
  rewards = rng.normal(size=k)
  _, kl = bon.exact_discrete(probs=probs, rewards=rewards, n=n)
  # With distinct rewards the exact KL is sum_k p_k phi(mean of h over cell k), phi(x) =
  # x log x, h(u) = n u^(n-1) the Beta(n, 1) density on the CDF axis; the bound is the
  # integral of phi(h). Jensen makes the gap >= 0, and to second order it is
  # sum_k p_k^3 h'^2 / (24 h) <= (p_max K)^2 / (24 K^2) * int h'^2/h = 2.25/(24 K^2) *
  # n (n-1)^2/(n-2) (n > 2; 2 log K for n = 2, the first cell cutting off int 2/u):
  # at most 6e-6 here (n = 16), so 1e-4 leaves a margin of 15.
  gap = bon.kl_bound(n) - kl
  assert -1e-12 <= gap < 1e-4
  # Ties: rewards on a grid of 0.5 (about 13 levels). The KL is then the KL between the
  # reward levels' own distributions, F^n - F_^n against their reference masses.
  tied = np.round(rewards * 2) / 2
  pi_tied, kl_tied = bon.exact_discrete(probs=probs, rewards=tied, n=n)
  levels, group = np.unique(tied, return_inverse=True)
  mass = np.bincount(group, weights=probs)
  cdf = np.cumsum(mass)
  level_mass = cdf ** n - (cdf - mass) ** n
  assert kl_tied == pytest.approx(np.sum(level_mass * np.log(level_mass / mass)), abs=1e-12)
  np.testing.assert_allclose(np.bincount(group, weights=pi_tied), level_mass, atol=1e-12)
  assert 0 < kl_tied < bon.kl_bound(n) - 1e-3


@pytest.mark.parametrize('n', [2, 5])
def test_select_on_sampled_draws_matches_exact(n):
  rng = np.random.default_rng(10 + n)
  draws = 200_000
  items = rng.choice(len(TOY_PROBS), size=(draws, n), p=TOY_PROBS)
  kept = items[np.arange(draws), bon.select(TOY_REWARDS[items])]
  freq = np.bincount(kept, minlength=len(TOY_PROBS)) / draws
  pi_bon, _ = bon.exact_discrete(probs=TOY_PROBS, rewards=TOY_REWARDS, n=n)
  se = np.sqrt(pi_bon * (1 - pi_bon) / draws)
  assert np.all(np.abs(freq - pi_bon) < 4 * se), (freq, pi_bon, se)


def test_continuous_bias_by_quadrature():
  """continuous_bias's closed-form count law against integrating the binomial over U ~
  Beta(n, 1) by Gauss-Legendre (exact: the integrand is a polynomial of degree < 2*64)."""
  m = 32
  nodes, weights = np.polynomial.legendre.leggauss(64)
  u, w = (nodes + 1) / 2, weights / 2
  c = np.arange(m + 1)
  binom = np.array([math.comb(m, j) for j in c], float)
  for n in (2, 4, 16):
    pmf = binom[None] * u[:, None] ** c * (1 - u[:, None]) ** (m - c)
    mean_log_f = np.sum(w * n * u ** (n - 1) * (pmf @ np.log((c + 1) / (m + 1))))
    assert bon.continuous_bias(n=n, ref_samples=m) == pytest.approx(
        (n - 1) * (mean_log_f + 1 / n), abs=1e-12)
    assert bon.continuous_bias(n=n, ref_samples=m) == pytest.approx(1 / (2 * m), rel=0.04)


@pytest.mark.parametrize('n', [2, 4, 16])
def test_kl_estimate_on_gaussian_rewards(n):
  """Rewards N(0, 1) under the reference, so pi_bon is exactly the max of n and its KL is
  log n - (n-1)/n. Each of 20000 "prompts" has one best-of-n sample and its own M = 64
  reference samples; the estimate's expectation is the bound plus continuous_bias (about
  +1/128), which is about one standard error here, so it is tested with the bias removed
  and, looser, without."""
  rng = np.random.default_rng(100 + n)
  prompts, m = 20_000, 64
  cands = rng.normal(size=(prompts, n))
  best = cands[np.arange(prompts), bon.select(cands)]
  est = bon.kl_estimate(rewards=best, ref_rewards=rng.normal(size=(prompts, m)), n=n)
  bias = bon.continuous_bias(n=n, ref_samples=m)
  assert abs(est.kl - bias - bon.kl_bound(n)) < 4 * est.se, (est.kl, bias, est.se)
  assert abs(est.kl - bon.kl_bound(n)) < 4 * est.se + bias
  # The se is honest: the estimate's exact sd follows from the count's law, P(C = c) =
  # n M! (c+n-1)! / (c! (M+n)!) (checked by quadrature above), and the ratio at count c.
  c = np.arange(m + 1)
  log_p = [math.log(n) + math.lgamma(m + 1) + math.lgamma(j + n) - math.lgamma(j + 1) -
           math.lgamma(m + n + 1) for j in c]
  ratio = math.log(n) + (n - 1) * np.log((c + 1) / (m + 1))
  p = np.exp(log_p)
  sd = math.sqrt(np.sum(p * ratio ** 2) - np.sum(p * ratio) ** 2)
  assert est.se == pytest.approx(sd / math.sqrt(prompts), rel=0.05)


def expected_estimate(probs, rewards, n, m):
  """E[kl_estimate] on a discrete reference with M = m references, by summing over the
  trinomial law of (#refs below, #refs tied) for each reward level the best-of-n sample
  can take, with level masses F^n - F_^n. Plain Python, no kl_estimate or log_ratio."""
  total = 0.0
  pmf = lambda k, t, p: math.comb(t, k) * p ** k * (1 - p) ** (t - k)
  for level in np.unique(rewards):
    f_lo, f_hi = probs[rewards < level].sum(), probs[rewards <= level].sum()
    expect = 0.0
    for below in range(m + 1):
      for tied in range(m - below + 1):
        weight = pmf(below, m, f_lo) * pmf(tied, m - below, (f_hi - f_lo) / (1 - f_lo))
        lo, hi = (below + 1) / (m + 1), (below + tied + 1) / (m + 1)
        ratio = (math.log(n) + (n - 1) * math.log(hi) if tied == 0 else
                 math.log((hi ** n - lo ** n) / (hi - lo)))
        expect += weight * ratio
    total += (f_hi ** n - f_lo ** n) * expect
  return total


@pytest.mark.parametrize('n', [2, 4, 16])
def test_kl_estimate_with_ties(n):
  """Six outcomes on four reward levels: the estimate's mean over sampled best-of-n draws
  (by `select`) matches its exact expectation, which is the exact tie-lowered KL up to the
  O(1/M) bias; the continuous formula on the same counts is far off."""
  rng = np.random.default_rng(200 + n)
  prompts, m = 20_000, 32
  items = rng.choice(len(TOY_PROBS), size=(prompts, n), p=TOY_PROBS)
  best = TOY_REWARDS[items[np.arange(prompts), bon.select(TOY_REWARDS[items])]]
  ref = TOY_REWARDS[rng.choice(len(TOY_PROBS), size=(prompts, m), p=TOY_PROBS)]
  est = bon.kl_estimate(rewards=best, ref_rewards=ref, n=n)
  expected = expected_estimate(TOY_PROBS, TOY_REWARDS, n, m)
  assert abs(est.kl - expected) < 4 * est.se, (est.kl, expected, est.se)
  _, exact = bon.exact_discrete(probs=TOY_PROBS, rewards=TOY_REWARDS, n=n)
  assert exact < bon.kl_bound(n) - 0.01
  # The bias is O(1/M): +0.021, +0.025, +0.061 at M = 32, about half that at M = 64.
  bias = expected - exact
  assert 0 < bias < 2 / m
  assert 0.4 < (expected_estimate(TOY_PROBS, TOY_REWARDS, n, 2 * m) - exact) / bias < 0.6
  naive = math.log(n) + (n - 1) * np.log(((ref <= best[:, None]).sum(1) + 1) / (m + 1))
  assert naive.mean() - exact > 20 * est.se


def experiment(*args):
  return subprocess.run([sys.executable, 'experiments/best_of_n.py', *args], cwd=REPO,
                        env=cli_env(1), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope='module')
def fake_sft(tmp_path_factory):
  """A directory that passes for an SFT run as far as its config.json goes (bad input is
  caught before any checkpoint is read)."""
  import json
  workdir = tmp_path_factory.mktemp('fake') / 'sft'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(
      {'stage': 'sft', 'model': {'vocab_size': 64}, 'world': {'seed': 0}}))
  return str(workdir)


@pytest.mark.parametrize('case, mentions', [
    ('missing-run', 'holds no run'),
    ('n-zero', 'n must be >= 1'),
    ('not-a-reward-model', 'not a reward_model run'),
    ('negative-slots', '--continuous_slots=-8 must be 0'),
])
def test_experiment_bad_input(fake_sft, tmp_path, case, mentions):
  args = {'missing-run': [f'--sft_run={tmp_path / "nowhere"}'],
          'n-zero': ['--ns=0,2'],
          'not-a-reward-model': [f'--sft_run={fake_sft}', f'--rm_run={fake_sft}'],
          'negative-slots': ['--continuous_slots=-8']}[case]
  result = experiment(*args, f'--out={tmp_path / "out"}')
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and mentions in lines[0], lines
  assert not (tmp_path / 'out').exists()
