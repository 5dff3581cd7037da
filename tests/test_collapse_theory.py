"""Exact-theory companions of model collapse: the vmapped simulations against their closed
forms over thousands of seeds (within 4 standard errors, so a deterministic seed that passes
is not a fluke: each comparison alone fails by chance about once in 16000 seeds), the
closed forms against an exact rational recursion, single seeds against float64 refits on
the stacked data, and vmap against one seed at a time."""
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.analysis import collapse_metrics as cm
from rlhf_jax.analysis import collapse_theory as ct
from rlhf_jax.errors import UserError
from rlhf_jax.loops import collapse_bigram as cb
from rlhf_jax.world import language

SEEDS = 20000
GENS = 10
M, MU0, VAR0 = 10, 3.0, 2.0                     # Gaussian: samples per batch, true mean, variance
DIM, ROWS, SIGMA = 4, 24, 0.5                   # regression: d, T, noise sd
W_STAR = jnp.array([1.0, -0.5, 0.25, 2.0])
PER_BATCH = SIGMA ** 2 * DIM / (ROWS - DIM - 1)  # sigma^2 d / (T - d - 1)


def simulate(run, seeds=SEEDS, seed=0):
  return jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(seed), seeds))


def mean_se(values):
  values = np.asarray(values, np.float64)
  return values.mean(0), values.std(0, ddof=1) / np.sqrt(values.shape[0])


def gaussian(schedule, **kw):
  return ct.make_gaussian(**{**dict(mu0=MU0, var0=VAR0, samples=M, generations=GENS,
                                    schedule=schedule), **kw})


def regression(schedule, **kw):
  return ct.make_regression(**{**dict(w_star=W_STAR, rows=ROWS, sigma=SIGMA,
                                      generations=GENS, schedule=schedule), **kw})


def moment_recursion(schedule, samples, generations, mu0, var0):
  """E[var_n] exactly, in rationals, from the expected pooled sums a = E[(sum x)^2] and
  b = E[sum x^2]: a derivation independent of the module's one-step product."""
  m, mu0, var0 = Fraction(samples), Fraction(mu0), Fraction(var0)
  n, a, b = m, m * m * mu0 ** 2 + m * var0, m * (var0 + mu0 ** 2)   # the real batch
  out = []
  for _ in range(generations):
    var = b / n - a / n ** 2
    out.append(var)
    # M draws from N(mu, var), mu = S1/N: E[sum x^2] = M b/N, E[(sum x)^2] = M^2 a/N^2 + M var.
    new_b, new_a, cross = m * b / n, m * m * a / n ** 2 + m * var, m * a / n
    if schedule == 'accumulate':   # E[(S1 + sum x)^2] = a + 2 E[S1 sum x] + E[(sum x)^2]
      n, a, b = n + m, a + 2 * cross + new_a, b + new_b
    else:
      n, a, b = m, new_a, new_b
  return out


@pytest.mark.parametrize('schedule', ct.SCHEDULES)
def test_gaussian_closed_form_equals_exact_moment_recursion(schedule):
  for samples in (2, 5, 10):
    want = [float(v) for v in moment_recursion(schedule, samples, 12, mu0=Fraction(7, 3),
                                               var0=Fraction(3, 2))]
    got = ct.gaussian_expected_var(var0=1.5, samples=samples, generations=12,
                                   schedule=schedule)
    np.testing.assert_allclose(got, want, rtol=1e-13)
  np.testing.assert_allclose(ct.gaussian_expected_var(var0=VAR0, samples=M, generations=GENS,
                                                      schedule='replace'),
                             VAR0 * (1 - 1 / M) ** np.arange(1, GENS + 1), rtol=1e-13)


@pytest.mark.parametrize('schedule', ct.SCHEDULES)
def test_gaussian_simulation_matches_expectation(schedule):
  fits = simulate(gaussian(schedule))
  want = ct.gaussian_expected_var(var0=VAR0, samples=M, generations=GENS, schedule=schedule)
  var, var_se = mean_se(fits.var)
  assert np.all(np.abs(var - want) <= 4 * var_se), ((var - want) / var_se)
  # The mean does not drift, and its spread takes up exactly the variance lost.
  mean, mean_se_ = mean_se(fits.mean)
  assert np.all(np.abs(mean - MU0) <= 4 * mean_se_), ((mean - MU0) / mean_se_)
  sq, sq_se = mean_se((np.asarray(fits.mean, np.float64) - MU0) ** 2)
  assert np.all(np.abs(sq - (VAR0 - want)) <= 4 * sq_se)
  # Power: 20000 seeds resolve E[var_n] to under 2% (0.3% at n = 1), so the other
  # schedule's expectation, 8% away at n = 2 and 2.4x at n = 10, is rejected from n = 2 on
  # (at n = 1 both fit the same real batch).
  other, = set(ct.SCHEDULES) - {schedule}
  wrong = ct.gaussian_expected_var(var0=VAR0, samples=M, generations=GENS, schedule=other)
  assert np.all(var_se < 0.02 * want)
  assert np.all(np.abs(var - wrong)[1:] > 4 * var_se[1:])


def test_gaussian_accumulate_does_not_collapse():
  """E[var_n] decreases to var0 sin(pi a)/(pi a), a = M^-1/2 (Euler's product): 0.843 var0
  at M = 10. Over 100 generations the simulated mean stays above that floor, while under
  replace it falls to var0 0.9^100 = 3e-5 var0."""
  gens, seeds = 100, 4000
  floor = ct.gaussian_var_limit(var0=VAR0, samples=M, schedule='accumulate')
  assert floor == pytest.approx(VAR0 * 0.843436, rel=1e-5)
  want = ct.gaussian_expected_var(var0=VAR0, samples=M, generations=gens, schedule='accumulate')
  assert np.all(np.diff(want) < 0) and want[-1] > floor and want[-1] - floor < 0.002 * VAR0
  fits = simulate(gaussian('accumulate', generations=gens), seeds=seeds)
  var, se = mean_se(fits.var)
  assert np.all(var >= floor - 4 * se), (var.min(), floor)
  assert np.all(np.abs(var - want) <= 4 * se)
  replace = np.asarray(simulate(gaussian('replace', generations=gens), seeds=seeds).var)
  assert replace[:, -1].mean() < 1e-3 * VAR0 < 0.5 * floor
  # Not only on average: the typical seed keeps most of its variance (median 0.73 var0),
  # where under replace log var_n drifts down by about 0.22 a generation (median 3e-10).
  assert np.median(np.asarray(fits.var)[:, -1]) > 0.5 * VAR0
  assert np.median(replace[:, -1]) < 1e-6 * VAR0


def test_single_seed_gaussian_fits_equal_float64_refits():
  """Replays one seed's draws (same keys as the module) and refits each pool in float64 with
  np.mean / np.var (ddof=0) on the stacked samples."""
  key = jax.random.key(7)
  for schedule in ct.SCHEDULES:
    fits = gaussian(schedule, generations=6)(key)
    mu, var, pool = MU0, VAR0, []
    for k in jax.random.split(key, 6):
      x = mu + np.sqrt(var) * np.asarray(jax.random.normal(k, (M,), jnp.float32), np.float64)
      pool = pool + [x] if schedule == 'accumulate' else [x]
      stacked = np.concatenate(pool)
      mu, var = stacked.mean(), stacked.var()
      n = len(pool) if schedule == 'accumulate' else 1
      assert stacked.shape == (n * M,)
    np.testing.assert_allclose(fits.var[-1], var, rtol=2e-4)
    np.testing.assert_allclose(fits.mean[-1], mu, rtol=2e-5)


@pytest.mark.parametrize('schedule', ct.SCHEDULES)
@pytest.mark.slow
def test_mle_bigram_bos_row_is_iterated_categorical_fitting(schedule):
  """The bigram engine mle (loops/collapse_bigram.py) on a 10-token world, M rows of BOS and
  one token. Every row starts with BOS once, so each generation refits the BOS row on exactly
  M i.i.d. draws from the previous model (pooled with the earlier draws under accumulate):
  iterated fitting of a categorical. Its Gini impurity 1 - sum_t q(t)^2 is the MLE
  variance of the one-hot draws, and the Gaussian derivation (collapse_theory's module doc)
  used nothing but i.i.d. draws with the model's mean and variance, so E[1 - sum q_n^2]
  follows `gaussian_expected_var` with var0 = 1 - sum p^2: ((M - 1) / M)^n under replace.
  And q_n(t) is a martingale, E[q_n(t|BOS)] = p(t|BOS), while each run's row drifts to one
  token (the heterozygosity decay of neutral drift)."""
  lang = language.make_language(seed=0, vocab_size=10, branching=4, zipf_a=1.1,
                                eos_prob=0.05)
  true_logp = cm.true_logp_table(lang)
  heldout = language.sample(lang, key=jax.random.key(1), batch_size=64, seq_len=8)
  spec = cb.CollapseSpec(engine='mle', generations=GENS, samples=M, seq_len=2,
                         schedule=schedule)
  run = cb.make_collapse(spec, vocab_size=10, real=cb.RealData.world(lang),
                         heldout_counts=cm.bigram_counts(heldout, vocab_size=10),
                         true_logp=true_logp, tail=cm.world_tail(lang), keep_models=True)
  q = np.exp(np.asarray(simulate(run).models, np.float64)[:, :, 1])      # BOS rows [S, G, V]
  p = np.exp(true_logp[1])
  assert (p > 0).sum() == 4
  gini, gini_se = mean_se(1 - (q ** 2).sum(-1))
  want = ct.gaussian_expected_var(var0=1 - (p ** 2).sum(), samples=M, generations=GENS,
                                  schedule=schedule)
  assert np.all(np.abs(gini - want) <= 4 * gini_se), ((gini - want) / gini_se)
  mean, se = mean_se(q)
  assert np.all(np.abs(mean - p)[:, p > 0] <= 4 * se[:, p > 0]), ((mean - p) / se)
  assert np.all(mean[:, p == 0] == 0)
  # Power, as for the Gaussian: the other schedule's expectation is rejected from n = 2.
  other, = set(ct.SCHEDULES) - {schedule}
  wrong = ct.gaussian_expected_var(var0=1 - (p ** 2).sum(), samples=M, generations=GENS,
                                   schedule=other)
  assert np.all(np.abs(gini - wrong)[1:] > 4 * gini_se[1:])


def test_regression_replace_grows_linearly():
  """Slope of the per-seed least-squares line over n = 1..10: its SE over 20000 seeds is
  about 0.7% of sigma^2 d/(T-d-1), so 4 SE is a 2.7% tolerance; the intercept is 0."""
  fits = simulate(regression('replace'), seed=1)
  want = ct.regression_expected_error(sigma=SIGMA, dim=DIM, rows=ROWS, generations=GENS,
                                      schedule='replace')
  np.testing.assert_allclose(want, PER_BATCH * np.arange(1, GENS + 1), rtol=1e-13)
  err, se = mean_se(fits.error)
  assert np.all(np.abs(err - want) <= 4 * se), ((err - want) / se)
  n = np.arange(1, GENS + 1, dtype=np.float64)
  design = np.stack([n, np.ones_like(n)], 1)
  coef = np.linalg.lstsq(design, np.asarray(fits.error, np.float64).T, rcond=None)[0]  # [2, S]
  (slope, intercept), (slope_se, intercept_se) = mean_se(coef.T)
  assert slope_se < 0.01 * PER_BATCH
  assert abs(slope - PER_BATCH) <= 4 * slope_se, (slope, PER_BATCH, slope_se)
  assert abs(intercept) <= 4 * intercept_se, (intercept, intercept_se)
  # Error at n = 10 is ten times that at n = 1: nothing saturates.
  assert err[-1] / err[0] == pytest.approx(10, rel=0.05)


def test_regression_replace_fresh_design_matches_same_formula():
  fits = simulate(regression('replace', design='fresh'), seed=2)
  want = ct.regression_expected_error(sigma=SIGMA, dim=DIM, rows=ROWS, generations=GENS,
                                      schedule='replace')
  err, se = mean_se(fits.error)
  assert np.all(np.abs(err - want) <= 4 * se), ((err - want) / se)


def test_regression_accumulate_stays_bounded():
  fits = simulate(regression('accumulate'), seed=3)
  want = ct.regression_expected_error(sigma=SIGMA, dim=DIM, rows=ROWS, generations=GENS,
                                      schedule='accumulate')
  np.testing.assert_allclose(want, PER_BATCH * np.cumsum(1 / np.arange(1, GENS + 1) ** 2),
                             rtol=1e-13)
  bound = ct.regression_error_limit(sigma=SIGMA, dim=DIM, rows=ROWS, schedule='accumulate')
  assert bound == pytest.approx(PER_BATCH * np.pi ** 2 / 6, rel=1e-13)
  err, se = mean_se(fits.error)
  assert np.all(np.abs(err - want) <= 4 * se), ((err - want) / se)
  assert np.all(err <= bound + 4 * se)
  # Resolution: SE under 1% of the mean, against a gap of 1.6x to replace at n = 2 and 6.5x
  # at n = 10.
  assert np.all(se < 0.01 * want) and err[-1] < 0.2 * PER_BATCH * GENS


@pytest.mark.slow  # over the quick check's 5 s (5.1-6.5 s on 2 idle cores)
def test_single_seed_regression_fits_equal_float64_stacked_ols():
  """Replays one seed's draws and refits with np.linalg.lstsq on the stacked rows of every
  batch in the pool, in float64."""
  key = jax.random.key(11)
  w_star = np.asarray(W_STAR, np.float64)
  for design in ct.DESIGNS:
    for schedule in ct.SCHEDULES:
      fits = regression(schedule, generations=5, design=design)(key)
      key_fixed, key_designs, key_noises = jax.random.split(key, 3)
      x_fixed = np.asarray(jax.random.normal(key_fixed, (ROWS, DIM)), np.float64)
      w, xs, ys = w_star, [], []
      for kd, kn in zip(jax.random.split(key_designs, 5), jax.random.split(key_noises, 5)):
        x = (np.asarray(jax.random.normal(kd, (ROWS, DIM)), np.float64) if design == 'fresh'
             else x_fixed)
        y = x @ w + SIGMA * np.asarray(jax.random.normal(kn, (ROWS,)), np.float64)
        xs, ys = (xs + [x], ys + [y]) if schedule == 'accumulate' else ([x], [y])
        w = np.linalg.lstsq(np.concatenate(xs), np.concatenate(ys), rcond=None)[0]
      np.testing.assert_allclose(fits.weights[-1], w, atol=2e-5)
      np.testing.assert_allclose(fits.error[-1], ((w - w_star) ** 2).sum(), rtol=1e-4)


@pytest.mark.slow
def test_vmap_equals_one_seed_at_a_time():
  keys = jax.random.split(jax.random.key(5), 3)
  for make in (gaussian, regression):
    for schedule in ct.SCHEDULES:
      run = make(schedule)
      batched = jax.jit(jax.vmap(run))(keys)
      single = jax.jit(run)
      for i in range(3):
        one = single(keys[i])
        # Equal to float32 rounding, not bitwise: XLA may pick another kernel (and so
        # another summation order) for a batched solve than for one seed's.
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
          np.testing.assert_allclose(np.asarray(got)[i], np.asarray(want), rtol=1e-5,
                                     atol=1e-6)


def test_plot_theory_writes_png(tmp_path):
  values = np.random.default_rng(0).normal(1.0, 0.5, size=(400, GENS))
  mean, half = ct.mean_and_band(values)
  np.testing.assert_allclose(mean, values.mean(0))
  np.testing.assert_allclose(half, 1.96 * values.std(0, ddof=1) / 20)
  curve = lambda limit: ct.Curve(values=values, theory=np.ones(GENS), limit=limit)
  path = tmp_path / 'theory.png'
  ct.plot_theory(str(path), gaussian={'replace': curve(0.0), 'accumulate': curve(0.8)},
                 regression={'replace': curve(np.inf), 'accumulate': curve(1.6)})
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and path.stat().st_size > 10000


def test_bad_input_is_a_user_error():
  with pytest.raises(UserError, match='schedule'):
    gaussian('refresh')
  with pytest.raises(UserError, match='rows'):
    regression('replace', rows=DIM + 1)
  with pytest.raises(UserError, match='design'):
    regression('replace', design='random')
