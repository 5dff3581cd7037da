"""Exact-theory companions of the model-collapse loops: two toy recursions that are simulated
over thousands of seeds in one `jit(vmap(...))` and whose expectations are known exactly.

Indexing, shared by both: model n = 1, 2, ..., G. Model 1 is fitted on real data; the data of
model n + 1 is sampled from model n. Simulations return row n - 1 for model n, and the
closed forms below are functions of the same n.

Schedules (`SCHEDULES`):
  replace     model n is fitted only on the newest data (the samples of model n - 1, or the
              real data for n = 1).
  accumulate  model n is fitted on everything so far: the real data and the samples of
              models 1 .. n - 1, n batches in all.

Iterated Gaussian fitting (Shumailov et al. 2024). The real data are M draws from
N(mu0, var0); each batch is M draws from the previous model. A model is the fitted mean and
the MLE variance (sum of squared deviations divided by the number of samples fitted on, not
by that number minus one) of its pool of N_n samples: N_n = M (replace) or n M (accumulate).
  E[var_n] = var0 * prod_{k=1..n} (1 - M / N_k^2)
    replace:     var0 * ((M - 1) / M)^n                      -> 0
    accumulate:  var0 * prod_{k=1..n} (1 - 1 / (M k^2))       -> var0 * sin(pi a) / (pi a),
                 a = 1 / sqrt(M) (Euler's product for the sine), e.g. 0.843 var0 at M = 10.
  Why: given model n - 1, its pool (N_{n-1} points, mean mu, variance v) gains M fresh
  draws from N(mu, v) whose MLE variance s2 has mean (M - 1) v / M and whose mean xbar
  differs from mu by variance v / M. Pooling (N_{n-1} v + M s2) / N_n plus the
  between-group term N_{n-1} M (xbar - mu)^2 / N_n^2 gives E[var_n | model n-1] =
  v (1 - M / N_n^2) in both schedules (replace is N_{n-1} = 0, N_n = M).
  E[mu_n] = mu0, and E[(mu_n - mu0)^2] = var0 - E[var_n]: the fitted second moment about
  mu0, var_n + (mu_n - mu0)^2, is a martingale, since it is the pool's mean of (x - mu0)^2.

Linear regression on its own labels (Gerstgrasser et al. 2024). One design X [T, d] with
N(0, 1) entries is drawn per seed and kept for every batch (design='fixed'); w* is given.
Real labels are y_1 = X w* + e_1; the labels of batch n + 1 are y_{n+1} = X w_n + e_{n+1}, with
fresh noise e ~ N(0, sigma^2 I_T). Model n is the OLS fit on its pool of batches. The error is
||w_n - w*||^2, the excess squared test error on isotropic inputs x ~ N(0, I_d); it does not
depend on w*. With P = (X^T X)^{-1} X^T, replace gives w_n - w* = sum_{k<=n} P e_k and
accumulate (pooled normal equations, n identical designs) gives w_n - w* = w_{n-1} - w* +
P e_n / n. Averaging over X with E[(X^T X)^{-1}] = I / (T - d - 1) (inverse Wishart):
    replace:     E err_n = sigma^2 d / (T - d - 1) * n
    accumulate:  E err_n = sigma^2 d / (T - d - 1) * sum_{k=1..n} 1 / k^2
                         <  sigma^2 d / (T - d - 1) * pi^2 / 6.
design='fresh' draws a new X for every batch. The replace formula still holds exactly (the
increments stay independent with the same mean square); the accumulate formula does not,
since pooled fits then mix different designs, so only the simulation is available for it.
"""
import dataclasses
import math
from typing import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError

SCHEDULES = ('replace', 'accumulate')
DESIGNS = ('fixed', 'fresh')


def _check_schedule(schedule: str):
  if schedule not in SCHEDULES:
    raise UserError(f'collapse schedule must be one of {SCHEDULES}, got {schedule!r}')


# -- iterated Gaussian fitting -------------------------------------------------------------

@flax.struct.dataclass
class GaussianFits:
  """The fitted models n = 1..G in rows 0..G-1; a leading [S] axis when vmapped over seeds.

  mean: [G] float32 fitted mean.
  var:  [G] float32 fitted MLE variance (divided by the pool size).
  """
  mean: jax.Array
  var: jax.Array


@flax.struct.dataclass
class _Pool:
  """Samples fitted on so far, as count, mean and sum of squared deviations (scalars)."""
  count: jax.Array
  mean: jax.Array
  m2: jax.Array


def _merge(pool: _Pool, x: jax.Array) -> _Pool:
  """Adds samples x [M] to the pool. Chan's pairwise update keeps float32 accurate when the
  mean is large against the spread, where sum(x^2)/N - mean^2 would cancel."""
  count = pool.count + x.shape[0]
  batch_mean = x.mean()
  delta = batch_mean - pool.mean
  mean = pool.mean + delta * (x.shape[0] / count)
  m2 = pool.m2 + ((x - batch_mean) ** 2).sum() + delta ** 2 * pool.count * x.shape[0] / count
  return _Pool(count=count, mean=mean, m2=m2)


def make_gaussian(*, mu0: float, var0: float, samples: int, generations: int,
                  schedule: str) -> Callable[[jax.Array], GaussianFits]:
  """Returns run(key) -> GaussianFits for `generations` models fitted on `samples` draws
  per batch; pure and scan-based, so jit(vmap(run))(keys) runs many seeds at once."""
  _check_schedule(schedule)
  if samples < 2 or generations < 1 or var0 <= 0:
    raise UserError('gaussian collapse: need samples >= 2, generations >= 1 and var0 > 0')
  empty = _Pool(count=jnp.zeros((), jnp.float32), mean=jnp.zeros((), jnp.float32),
                m2=jnp.zeros((), jnp.float32))

  def step(carry, key):
    pool, mu, var = carry
    x = mu + jnp.sqrt(var) * jax.random.normal(key, (samples,), jnp.float32)
    pool = _merge(pool if schedule == 'accumulate' else empty, x)
    fit_var = pool.m2 / pool.count
    return (pool, pool.mean, fit_var), GaussianFits(mean=pool.mean, var=fit_var)

  def run(key: jax.Array) -> GaussianFits:
    init = (empty, jnp.float32(mu0), jnp.float32(var0))
    _, fits = jax.lax.scan(step, init, jax.random.split(key, generations))
    return fits

  return run


def gaussian_expected_var(*, var0: float, samples: int, generations: int,
                          schedule: str) -> np.ndarray:
  """E[var_n] for n = 1..G, float64 [G] (module doc)."""
  _check_schedule(schedule)
  n = np.arange(1, generations + 1, dtype=np.float64)
  pool = samples * (n if schedule == 'accumulate' else np.ones_like(n))
  return var0 * np.cumprod(1.0 - samples / pool ** 2)


def gaussian_var_limit(*, var0: float, samples: int, schedule: str) -> float:
  """lim_n E[var_n]: 0 for replace; var0 sin(pi a) / (pi a), a = M^-1/2, for accumulate.
  E[var_n] decreases in n, so under accumulate it never falls below this."""
  _check_schedule(schedule)
  if schedule == 'replace':
    return 0.0
  a = math.pi / math.sqrt(samples)
  return var0 * math.sin(a) / a


# -- linear regression on its own labels -----------------------------------------------------

@flax.struct.dataclass
class RegressionFits:
  """The fitted models n = 1..G in rows 0..G-1; a leading [S] axis when vmapped over seeds.

  weights: [G, d] float32 OLS weights w_n.
  error:   [G] float32 ||w_n - w*||^2, the excess test error on N(0, I_d) inputs.
  """
  weights: jax.Array
  error: jax.Array


def make_regression(*, w_star: jax.Array, rows: int, sigma: float, generations: int,
                    schedule: str, design: str = 'fixed') -> Callable[[jax.Array], RegressionFits]:
  """Returns run(key) -> RegressionFits for `generations` OLS models, each batch `rows`
  labelled examples; w_star [d]. Pure and scan-based for jit(vmap(run))(keys)."""
  _check_schedule(schedule)
  if design not in DESIGNS:
    raise UserError(f'regression design must be one of {DESIGNS}, got {design!r}')
  w_star = jnp.asarray(w_star, jnp.float32)
  dim = w_star.shape[0]
  if rows < dim + 2 or generations < 1 or sigma < 0:
    raise UserError('regression collapse: need rows >= dim + 2 (finite E[(X^T X)^-1]), '
                    'generations >= 1 and sigma >= 0')

  def step(carry, xs):
    # The pool is kept as its normal equations, sum X^T X and sum X^T y: OLS on the
    # stacked batches, in O(d^2) memory whatever the number of generations.
    gram, moment, w_prev, x_fixed = carry
    key_design, key_noise = xs
    x = (jax.random.normal(key_design, (rows, dim), jnp.float32) if design == 'fresh'
         else x_fixed)
    # Broadcast-and-sum instead of matmuls: XLA:CPU picks another kernel for a batched
    # matrix-vector product, and then a vmapped run would differ from a single seed's in
    # the last bit.
    y = (x * w_prev).sum(-1) + sigma * jax.random.normal(key_noise, (rows,), jnp.float32)
    batch_gram, batch_moment = (x[:, :, None] * x[:, None, :]).sum(0), (x * y[:, None]).sum(0)
    if schedule == 'accumulate':
      gram, moment = gram + batch_gram, moment + batch_moment
    else:
      gram, moment = batch_gram, batch_moment
    w = jnp.linalg.solve(gram, moment)
    err = ((w - w_star) ** 2).sum()
    return (gram, moment, w, x_fixed), RegressionFits(weights=w, error=err)

  def run(key: jax.Array) -> RegressionFits:
    key_fixed, key_designs, key_noises = jax.random.split(key, 3)
    x_fixed = jax.random.normal(key_fixed, (rows, dim), jnp.float32)
    init = (jnp.zeros((dim, dim), jnp.float32), jnp.zeros((dim,), jnp.float32), w_star,
            x_fixed)
    xs = (jax.random.split(key_designs, generations), jax.random.split(key_noises, generations))
    _, fits = jax.lax.scan(step, init, xs)
    return fits

  return run


def regression_expected_error(*, sigma: float, dim: int, rows: int, generations: int,
                              schedule: str) -> np.ndarray:
  """E||w_n - w*||^2 for n = 1..G, float64 [G], Gaussian design fixed across batches
  (module doc); for design='fresh' only the replace schedule's values hold."""
  _check_schedule(schedule)
  n = np.arange(1, generations + 1, dtype=np.float64)
  per_batch = sigma ** 2 * dim / (rows - dim - 1)
  return per_batch * (n if schedule == 'replace' else np.cumsum(1.0 / n ** 2))


def regression_error_limit(*, sigma: float, dim: int, rows: int, schedule: str) -> float:
  """lim_n E||w_n - w*||^2: infinite for replace, sigma^2 d / (T - d - 1) pi^2 / 6 for
  accumulate (an upper bound at every n)."""
  _check_schedule(schedule)
  if schedule == 'replace':
    return math.inf
  return sigma ** 2 * dim / (rows - dim - 1) * math.pi ** 2 / 6


# -- plot ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Curve:
  """values: [S, G] one measurement per seed of models n = 1..G; theory: [G] its exact
  expectation; limit: its n -> infinity value, drawn dashed when finite."""
  values: np.ndarray
  theory: np.ndarray
  limit: float | None = None


def mean_and_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean over seeds [G] and the half-width of its 95% confidence band, 1.96 SE [G]."""
  values = np.asarray(values, np.float64)
  return values.mean(0), 1.96 * values.std(0, ddof=1) / np.sqrt(values.shape[0])


def plot_theory(path: str, *, gaussian: Mapping[str, Curve], regression: Mapping[str, Curve]):
  """Two panels, fitted variance (Gaussian) and test error (regression) against n: per
  schedule the simulation mean with its 95% band, the theory line over it, and the limit."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  panels = ((axes[0], gaussian, 'fitted variance var_n', 'Iterated Gaussian fitting'),
            (axes[1], regression, 'test error ||w_n - w*||^2', 'Linear regression'))
  for ax, curves, ylabel, title in panels:
    for i, (schedule, curve) in enumerate(curves.items()):
      color = f'C{i}'
      n = np.arange(1, len(curve.theory) + 1)
      mean, half = mean_and_band(curve.values)
      ax.plot(n, mean, 'o', color=color, ms=4,
              label=f'{schedule}: simulation ({len(curve.values)} seeds)')
      ax.fill_between(n, mean - half, mean + half, color=color, alpha=0.25)
      ax.plot(n, curve.theory, '-', color=color, label=f'{schedule}: theory')
      if curve.limit is not None and math.isfinite(curve.limit):
        ax.axhline(curve.limit, color=color, ls='--', lw=0.8)
    ax.set_xlabel('generation n (n = 1: fitted on real data)')
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
