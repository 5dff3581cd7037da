"""Model collapse on a toy bigram language model: a whole run of G generations as one pure
`run(rng)` over `lax.scan`, so `jax.jit(jax.vmap(run))(keys)` runs many seeds at once.

Model: a table log q(t|s) [V, V] with the PAD and BOS columns at -inf, so a model never
emits them. C, the training data's transition counts (`collapse_metrics` defines a
transition), is a sufficient statistic, so a fit costs O(V^2) however much data there is.
The engine (`ENGINES`, chosen by `CollapseSpec.engine`) fits it:
  mle   the textbook refit (Shumailov et al. 2024): the exact maximum-likelihood
        categorical of each row, q(t|s) = C[s, t] / sum_t' C[s, t']. A transition no
        training row makes gets q = 0 exactly; a model never samples it, so under replace
        it stays at 0 in every later generation (zero is absorbing) and the tail can only
        shrink. A row whose state s has no training transition has no likelihood to
        maximise; it keeps the previous generation's row (generation 0: uniform over the
        emittable tokens), so every row stays a distribution and zeros stay absorbing in
        every row. Such a row is mostly unreachable: a model moves into s only if its data
        did, so s was in the data only as the last token of a truncated row (or, at
        generation 0, not at all). The held-out real data make transitions any finite
        sample misses, so the true KL and perplexity of an mle model are +inf; the tail
        metrics (`collapse_metrics.bigram_tail_metrics`) are its measures.
  adam  a smoothed fit: logits [V, V], log q = log_softmax(logits) (masked as above),
        trained for `train_steps` full-batch Adam steps at `lr` on the mean cross-entropy
        -sum C log q / sum C. `weight_decay` adds 0.5 * weight_decay * sum(logits^2) over
        the emittable columns; against the per-token mean cross-entropy, its strength
        relative to the data falls as 1 / (number of training transitions). The optimiser
        state starts afresh each generation. Starting from zeros, a finite fit leaves every
        transition some probability, so no transition is ever lost for good.
`train_steps`, `lr`, `init` and `weight_decay` are the adam engine's; mle has no optimiser
(mle refuses init='finetune' and weight_decay > 0, and ignores train_steps and lr).

Generation g = 0..G-1 fits model g (adam: from zeros, or from model g - 1's logits under
init='finetune'), scores it on held-out real transitions, and samples M rows from it:
BOS, then tokens at `temperature` until EOS (then PAD) or `seq_len` tokens in all.
Training data (`SCHEDULES`, chosen by `CollapseSpec.schedule`): generation 0 trains on M
fresh real rows; generation g + 1 on
  replace     generation g's M samples only;
  accumulate  all data so far: the real rows and the samples of generations 0..g;
  mix         round(mix_fraction M) fresh real rows (a new draw each generation) and the
              first M - round(mix_fraction M) of generation g's samples.
Real rows come from `RealData`: the true language (world) or a fixed pool of rows (text).

What collapses (tiny world, M = 256, engine adam, 64 seeds): under replace the true KL
rises from 0.107 to 0.459 nats/token by generation 4; under accumulate to 0.137, by ever
smaller steps. The mean tail mass falls only a little (0.0994 -> 0.0961 under replace): it
is linear in q, and a refit that is unbiased per transition leaves its mean over seeds in
place while each run loses some tail transitions and inflates others. What moves the mean
is the learner's bias: an adam fit leaks about 1.4% of the mass onto transitions the truth
never makes, and replace compounds the leak. Under mle (exact for the BOS row, which every
row visits once: E[q_g(t|BOS)] = p(t|BOS); for other rows the visit count and the draws
depend on each other, an O(1/visits) bias) the mean tail mass stays put too, while the
tail metrics that are not linear in q fall; `experiments/model_collapse.py` measures both.

RNG: the run's key splits into the real rows of generation 0 and a generation key;
generation g folds in g and splits that into its sampling key and the key of its
schedule (the fresh real rows of `mix`). Training is deterministic.
"""
import dataclasses
import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.analysis import collapse_metrics as cm
from rlhf_jax.errors import UserError
from rlhf_jax.world import language
from rlhf_jax.world.language import BOS_ID, EOS_ID, PAD_ID

INITS = ('scratch', 'finetune')


@dataclasses.dataclass(frozen=True)
class CollapseSpec:
  """Static settings of one collapse run (hashable; see the module doc).

  engine: 'mle' (the textbook refit, the default) or 'adam' (`ENGINES`). The adam
  settings: on the tiny world (V = 64, K = 8, 5% EOS; entropy rate 1.77 nats/token), 100
  Adam steps at lr 0.1 fit a generation-0 model on 256 real rows to a true KL of
  0.107 nats/token (mean of 64 seeds), the best of the schedules measured (lr 0.03 to
  0.3, 50 to 1000 steps; lr 0.03 for 500 steps ties at 5x the cost). Fewer steps
  underfit (0.115 at 50); more start to fit the sample's noise, pushing unseen
  transitions towards zero (0.133 at 1000 steps, 0.154 at lr 0.3 for 1000; 8 seeds).
  """
  generations: int = 5
  engine: str = 'mle'
  samples: int = 256
  seq_len: int = 64
  schedule: str = 'replace'
  mix_fraction: float = 0.5
  temperature: float = 1.0
  init: str = 'scratch'
  train_steps: int = 100
  lr: float = 0.1
  weight_decay: float = 0.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise UserError(f'collapse schedule must be one of {tuple(SCHEDULES)}, '
                      f'got {self.schedule!r}')
    if self.engine not in ENGINES:
      raise UserError(f'collapse engine must be one of {tuple(ENGINES)}, got {self.engine!r}')
    if self.init not in INITS:
      raise UserError(f'collapse init must be one of {INITS}, got {self.init!r}')
    for name in ('generations', 'samples', 'seq_len', 'train_steps'):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise UserError(f'collapse {name} must be an integer, got {value!r}')
    for name in ('generations', 'samples', 'train_steps'):
      if getattr(self, name) < 1:
        raise UserError(f'collapse {name} must be >= 1, got {getattr(self, name)!r}')
    if self.seq_len < 2:
      raise UserError(f'collapse seq_len must be >= 2 (BOS and one token), got {self.seq_len!r}')
    if not 0.0 <= self.mix_fraction <= 1.0:
      raise UserError(f'collapse mix_fraction must be in [0, 1], got {self.mix_fraction!r}')
    if not self.temperature > 0:
      raise UserError(f'collapse temperature must be > 0, got {self.temperature!r}')
    if not self.lr > 0:
      raise UserError(f'collapse lr must be > 0, got {self.lr!r}')
    if not self.weight_decay >= 0:
      raise UserError(f'collapse weight_decay must be >= 0, got {self.weight_decay!r}')
    if self.engine == 'mle' and (self.init != 'scratch' or self.weight_decay != 0):
      raise UserError('collapse init=finetune and weight_decay are the adam engine\'s; '
                      f'engine mle has no optimiser (got init={self.init!r}, '
                      f'weight_decay={self.weight_decay!r})')

  @property
  def mix_real_rows(self) -> int:
    return round(self.mix_fraction * self.samples)


@flax.struct.dataclass
class RealData:
  """Where real rows come from; exactly one field is set (use `world` or `text`).

  lang: the true language; a fresh draw samples new rows from it.
  pool: [P, T] int32 real rows; a fresh draw picks rows uniformly with replacement.
  """
  lang: language.Language | None = None
  pool: jax.Array | None = None

  @classmethod
  def world(cls, lang: language.Language) -> 'RealData':
    return cls(lang=lang)

  @classmethod
  def text(cls, pool) -> 'RealData':
    pool = np.asarray(pool)
    if pool.ndim != 2 or pool.shape[0] < 1 or pool.shape[1] < 2:
      raise UserError(f'collapse real pool must be [rows >= 1, length >= 2], got {pool.shape}')
    if not np.issubdtype(pool.dtype, np.integer):
      raise UserError(f'collapse real pool must hold token ids, got dtype {pool.dtype}')
    return cls(pool=jnp.asarray(pool, jnp.int32))

  def draw(self, *, key: jax.Array, rows: int, seq_len: int) -> jax.Array:
    """[rows, seq_len] (world) or [rows, T] (pool) int32 fresh real rows."""
    if self.lang is not None:
      return language.sample(self.lang, key=key, batch_size=rows, seq_len=seq_len)
    return self.pool[jax.random.randint(key, (rows,), 0, self.pool.shape[0])]


@flax.struct.dataclass
class Data:
  """One generation's training data as its sufficient statistic.

  counts: [V, V] float32 transition counts.
  rows:   float32 scalar, the number of rows they came from.
  """
  counts: jax.Array
  rows: jax.Array


@flax.struct.dataclass
class ScheduleInput:
  """What generation g leaves for a schedule to build generation g + 1's data from.

  trained: Data generation g trained on.
  samples: [M, seq_len] int32 rows generation g's model sampled.
  sampled: Data of those rows.
  """
  trained: Data
  samples: jax.Array
  sampled: Data


def _data(rows: jax.Array, vocab_size: int) -> Data:
  return Data(counts=cm.bigram_counts(rows, vocab_size=vocab_size),
              rows=jnp.float32(rows.shape[0]))


# A schedule: (state, *, key, spec, fresh_real) -> Data, with fresh_real(key, rows) -> Data
# a fresh draw of real rows.

def _replace(state: ScheduleInput, *, key, spec, fresh_real) -> Data:
  del key, spec, fresh_real
  return state.sampled


def _accumulate(state: ScheduleInput, *, key, spec, fresh_real) -> Data:
  del key, spec, fresh_real
  return Data(counts=state.trained.counts + state.sampled.counts,
              rows=state.trained.rows + state.sampled.rows)


def _mix(state: ScheduleInput, *, key, spec, fresh_real) -> Data:
  real_rows = spec.mix_real_rows
  if real_rows == 0:
    return state.sampled
  real = fresh_real(key, real_rows)
  if real_rows == spec.samples:
    return real
  # Samples are i.i.d., so their first rows are as good a subsample as any.
  synthetic = _data(state.samples[:spec.samples - real_rows], state.sampled.counts.shape[0])
  return Data(counts=real.counts + synthetic.counts, rows=real.rows + synthetic.rows)


SCHEDULES: dict[str, Callable[..., Data]] = {
    'replace': _replace, 'accumulate': _accumulate, 'mix': _mix}


@flax.struct.dataclass
class CollapseTrace:
  """Per generation g = 0..G-1: a leading [G] axis, [S, G] under vmap over seeds; float32.

  true_kl, perplexity, tail_mass: model g on the held-out real transitions (`collapse_metrics`).
  tail_survival, tail_support, tail_min_mass: model g's `collapse_metrics.TailMetrics`.
  train_loss: model g's cross-entropy (nats/token) on its training data.
  sample_distinct_1, sample_distinct_2, sample_unigram_entropy, sample_mean_length: the M
    rows model g sampled.
  data_distinct_1, data_distinct_2, data_unigram_entropy, data_mean_length: the data model g
    trained on; data_rows: how many rows it holds.
  models: [G, V, V] (or [S, G, V, V]) log q of every generation's model, only from
    `make_collapse(..., keep_models=True)`; None otherwise.
  """
  true_kl: jax.Array
  perplexity: jax.Array
  tail_mass: jax.Array
  tail_survival: jax.Array
  tail_support: jax.Array
  tail_min_mass: jax.Array
  train_loss: jax.Array
  sample_distinct_1: jax.Array
  sample_distinct_2: jax.Array
  sample_unigram_entropy: jax.Array
  sample_mean_length: jax.Array
  data_distinct_1: jax.Array
  data_distinct_2: jax.Array
  data_unigram_entropy: jax.Array
  data_mean_length: jax.Array
  data_rows: jax.Array
  models: jax.Array | None = None


def _emittable(vocab: int) -> jax.Array:
  return (jnp.arange(vocab) != PAD_ID) & (jnp.arange(vocab) != BOS_ID)


def log_probs(logits: jax.Array) -> jax.Array:
  """[..., V, V] float32 log q(t|s) of a logit table: PAD and BOS columns at -inf."""
  return jax.nn.log_softmax(jnp.where(_emittable(logits.shape[-1]), logits, -jnp.inf), axis=-1)


def train(counts: jax.Array, *, init: jax.Array, steps: int, lr: float,
          weight_decay: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Fits logits [V, V] from `init` to transition counts [V, V] by `steps` full-batch Adam
  steps; returns (logits, their cross-entropy on the counts, nats/token)."""
  n = jnp.maximum(counts.sum(), 1.0)
  row_counts = counts.sum(-1, keepdims=True)
  vocab = counts.shape[-1]
  emittable = (jnp.arange(vocab) != PAD_ID) & (jnp.arange(vocab) != BOS_ID)
  opt = optax.adam(lr)

  def step(carry, _):
    logits, opt_state = carry
    # d/dlogits of -sum C log q / n is (rowsum(C) q - C) / n. Written out, a step is one
    # softmax and Adam, a third of the work of differentiating the loss, in the loop that
    # dominates a run's time.
    q = jax.nn.softmax(jnp.where(emittable, logits, -jnp.inf), axis=-1)
    grads = (row_counts * q - counts) / n + weight_decay * jnp.where(emittable, logits, 0.0)
    updates, opt_state = opt.update(grads, opt_state)
    return (optax.apply_updates(logits, updates), opt_state), None

  (logits, _), _ = jax.lax.scan(step, (init, opt.init(init)), None, length=steps)
  # Cells with no count stay out of the sum: 0 * -inf (masked columns) would be NaN.
  xent = -jnp.where(counts > 0, counts * log_probs(logits), 0.0).sum() / n
  return logits, xent


def mle_fit(counts: jax.Array, *, prev_log_q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The maximum-likelihood bigram of transition counts [V, V] (module doc, engine mle):
  log(C[s, t] / sum_t' C[s, t']), -inf where C is 0, and the row of prev_log_q [V, V] (a
  normalised log table) where row s has no counts. Returns (log q, its cross-entropy on
  the counts, nats/token: the counts' empirical conditional entropy)."""
  counts = jnp.where(_emittable(counts.shape[-1]), counts, 0.0)
  row = counts.sum(-1, keepdims=True)
  seen = counts > 0
  fitted = jnp.where(seen, jnp.log(jnp.where(seen, counts, 1.0) / jnp.maximum(row, 1.0)),
                     -jnp.inf)
  xent = -jnp.where(seen, counts * fitted, 0.0).sum() / jnp.maximum(row.sum(), 1.0)
  return jnp.where(row > 0, fitted, prev_log_q), xent


@flax.struct.dataclass
class Fit:
  """One generation's fitted model.

  params: [V, V] float32 what the next generation's fit starts from (adam: logits; mle:
    log q).
  log_q:  [V, V] float32 normalised log q(t|s), PAD and BOS columns at -inf.
  loss:   float32 scalar, its cross-entropy on its training data, nats/token.
  """
  params: jax.Array
  log_q: jax.Array
  loss: jax.Array


def _fit_mle(counts, *, prev, spec) -> Fit:
  del spec
  log_q, loss = mle_fit(counts, prev_log_q=prev)
  return Fit(params=log_q, log_q=log_q, loss=loss)


def _fit_adam(counts, *, prev, spec) -> Fit:
  init = prev if spec.init == 'finetune' else jnp.zeros_like(prev)
  logits, loss = train(counts, init=init, steps=spec.train_steps, lr=spec.lr,
                       weight_decay=spec.weight_decay)
  return Fit(params=logits, log_q=log_probs(logits), loss=loss)


@dataclasses.dataclass(frozen=True)
class Engine:
  """How a generation fits its model (module doc).

  init: vocab -> [V, V] params before generation 0 (mle: the uniform rows that rows
    without data fall back to; adam: zero logits).
  fit:  (counts [V, V], *, prev params [V, V], spec) -> Fit.
  """
  init: Callable[[int], jax.Array]
  fit: Callable[..., Fit]


ENGINES: dict[str, Engine] = {
    'mle': Engine(init=lambda v: log_probs(jnp.zeros((v, v), jnp.float32)), fit=_fit_mle),
    'adam': Engine(init=lambda v: jnp.zeros((v, v), jnp.float32), fit=_fit_adam)}


def sample_rows(log_q: jax.Array, *, key: jax.Array, rows: int, seq_len: int,
                temperature: float = 1.0) -> jax.Array:
  """[rows, seq_len] int32 ancestral samples `BOS x1 ... EOS PAD ...` from a bigram model
  log q [V, V], truncated at seq_len tokens (BOS included)."""
  probs = jax.nn.softmax(log_q / temperature, axis=-1)
  # Inverse-CDF draws: one uniform per row and step instead of V Gumbels, and a binary
  # search of ceil(log2 V) single-element gathers instead of a [rows, V] gather, which is
  # what keeps many vmapped seeds (and large V) cheap. The search returns the first column
  # whose cdf reaches x = u * total. That is never a zero-probability column (it would need
  # cdf[j-1] < x <= cdf[j] = cdf[j-1]), and u > 0 keeps it off the leading PAD and BOS
  # columns, whose cdf is 0. cumsum may add in a tree whose rounding differs from prefix
  # to prefix, so a zero-probability column's cdf could exceed its predecessor's by an
  # ulp; a running max over the positive columns' cdf makes the equality exact, which is
  # what keeps mle's zeros absorbing.
  cdf = jax.lax.cummax(jnp.where(probs > 0, jnp.cumsum(probs, axis=-1), 0.0),
                       axis=probs.ndim - 1)
  vocab = cdf.shape[-1]
  bos = jnp.full((rows,), BOS_ID, jnp.int32)

  def step(prev, u):
    x = u * cdf[prev, vocab - 1]
    lo, hi = jnp.zeros_like(prev), jnp.full_like(prev, vocab - 1)
    for _ in range(max(1, (vocab - 1).bit_length())):
      mid = (lo + hi) // 2
      below = cdf[prev, mid] < x
      lo, hi = jnp.where(below, mid + 1, lo), jnp.where(below, hi, mid)
    nxt = jnp.where((prev == EOS_ID) | (prev == PAD_ID), PAD_ID, lo)
    return nxt, nxt

  # All of a run's uniforms in one draw: one vectorised generator call instead of a key
  # split and a small call per step.
  uniforms = jax.random.uniform(key, (seq_len - 1, rows), minval=jnp.finfo(jnp.float32).tiny,
                                maxval=1.0)
  _, toks = jax.lax.scan(step, bos, uniforms)
  return jnp.concatenate([bos[:, None], toks.T], axis=1)


def _check_tables(*, vocab_size, real, heldout_counts, true_logp, tail):
  if (real.lang is None) == (real.pool is None):
    raise UserError('collapse real data needs exactly one of a language or a pool')
  square = (vocab_size, vocab_size)
  for name, table in (('heldout_counts', heldout_counts), ('true_logp', true_logp),
                      ('tail', tail)):
    if table is not None and np.shape(table) != square:
      raise UserError(f'collapse {name} must be [{vocab_size}, {vocab_size}], '
                      f'got {np.shape(table)}')
  if not float(np.asarray(heldout_counts).sum()) > 0:
    raise UserError('collapse heldout_counts has no transitions')
  if real.lang is not None and real.lang.vocab_size != vocab_size:
    raise UserError(f'collapse vocab_size {vocab_size} != the language\'s '
                    f'{real.lang.vocab_size}')
  if real.pool is not None and not 0 <= int(real.pool.min()) <= int(real.pool.max()) < vocab_size:
    raise UserError(f'collapse real pool holds token ids outside [0, {vocab_size})')


def make_collapse(spec: CollapseSpec, *, vocab_size: int, real: RealData, heldout_counts,
                  true_logp, tail, keep_models: bool = False
                  ) -> Callable[[jax.Array], CollapseTrace]:
  """Returns run(rng) -> CollapseTrace for one seed (module doc). heldout_counts [V, V]:
  held-out real transitions; true_logp [V, V] or None (text); tail [V, V] bool;
  keep_models: also return every generation's log q (CollapseTrace.models)."""
  _check_tables(vocab_size=vocab_size, real=real, heldout_counts=heldout_counts,
                true_logp=true_logp, tail=tail)
  heldout_counts = jnp.asarray(heldout_counts, jnp.float32)
  true_logp = None if true_logp is None else jnp.asarray(true_logp, jnp.float32)
  tail = jnp.asarray(tail, bool)
  fresh_real = lambda key, rows: _data(real.draw(key=key, rows=rows, seq_len=spec.seq_len),
                                       vocab_size)
  schedule = functools.partial(SCHEDULES[spec.schedule], spec=spec, fresh_real=fresh_real)
  engine = ENGINES[spec.engine]

  def generation(key_gens, carry, g):
    data, prev = carry
    key_sample, key_schedule = jax.random.split(jax.random.fold_in(key_gens, g))
    fit = engine.fit(data.counts, prev=prev, spec=spec)
    log_q = fit.log_q
    metrics = cm.bigram_model_metrics(log_q, heldout_counts=heldout_counts,
                                      true_logp=true_logp, tail=tail)
    tail_metrics = cm.bigram_tail_metrics(log_q, heldout_counts=heldout_counts,
                                          true_logp=true_logp, tail=tail)
    samples = sample_rows(log_q, key=key_sample, rows=spec.samples, seq_len=spec.seq_len,
                          temperature=spec.temperature)
    sampled = _data(samples, vocab_size)
    sample_stats = cm.count_statistics(sampled.counts, rows=sampled.rows)
    data_stats = cm.count_statistics(data.counts, rows=data.rows)
    trace = CollapseTrace(
        true_kl=metrics.true_kl, perplexity=metrics.perplexity, tail_mass=metrics.tail_mass,
        tail_survival=tail_metrics.survival, tail_support=tail_metrics.support,
        tail_min_mass=tail_metrics.min_mass, train_loss=fit.loss,
        sample_distinct_1=sample_stats.distinct_1, sample_distinct_2=sample_stats.distinct_2,
        sample_unigram_entropy=sample_stats.unigram_entropy,
        sample_mean_length=sample_stats.mean_length,
        data_distinct_1=data_stats.distinct_1, data_distinct_2=data_stats.distinct_2,
        data_unigram_entropy=data_stats.unigram_entropy,
        data_mean_length=data_stats.mean_length, data_rows=data.rows,
        models=log_q if keep_models else None)
    state = ScheduleInput(trained=data, samples=samples, sampled=sampled)
    return (schedule(state, key=key_schedule), fit.params), trace

  def run(rng: jax.Array) -> CollapseTrace:
    key_real, key_gens = jax.random.split(rng)
    data = fresh_real(key_real, spec.samples)
    _, trace = jax.lax.scan(functools.partial(generation, key_gens),
                            (data, engine.init(vocab_size)), jnp.arange(spec.generations))
    return trace

  return run


def trace_to_rows(trace: CollapseTrace) -> list[dict]:
  """One dict per (seed, generation) with plain floats, for CSV tables (every field but
  `models`); seed 0 only when the trace is a single run's [G]."""
  fields = {f.name: np.asarray(getattr(trace, f.name), np.float64)
            for f in dataclasses.fields(trace) if f.name != 'models'}
  fields = {k: v[None] if v.ndim == 1 else v for k, v in fields.items()}
  seeds, generations = next(iter(fields.values())).shape
  return [{'seed': s, 'generation': g, **{k: float(v[s, g]) for k, v in fields.items()}}
          for s in range(seeds) for g in range(generations)]
