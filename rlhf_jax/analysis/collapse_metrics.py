"""Metrics of the model-collapse loops, shared by the bigram engine and the Transformer loop.

Token ids: PAD=0, BOS=1, EOS=2 in the world and in the sentencepiece tokenizer alike.

Transitions. A transition is a pair (prev, next) of consecutive tokens in a row, counted
when next != PAD and prev is neither EOS nor PAD. The packed row
`BOS a b EOS BOS c EOS PAD` counts BOS->a, a->b, b->EOS, BOS->c, c->EOS (not EOS->BOS, which
only joins two documents, nor anything into PAD); a row truncated before its EOS counts
its transitions up to the cut. The emitted tokens of a set of rows are the `next` of its
counted transitions, so BOS and PAD are never emitted and EOS is.

Tail (`TAIL_FRACTION` = 0.1), a [V, V] bool mask over (prev, next):
  world  The true language's transitions ranked by their expected count per sequence,
         visits(s) * p(t|s) (exact, untruncated process), rarest first; the tail is the
         longest rarest-first prefix whose share of all expected transitions is
         <= TAIL_FRACTION. Transitions out of EOS and PAD are not transitions.
  text   With no true distribution, the tail is a set of tokens: the rarest tokens of the
         real training data by count as emitted tokens (tokens never seen are the rarest;
         ties go to the higher id, as tokenizers give rare pieces high ids; PAD and BOS are
         never in it), the longest such prefix whose share of emitted tokens is
         <= TAIL_FRACTION. The mask has that token set in every row.

Model metrics, over held-out real transitions (s -> t) with q(.|context) the model's
next-token distribution (for a bigram model the context is s):
  tail_mass   mean of sum_{t': tail[s, t']} q(t'|context). The true model scores the
              tail's share in expectation (about TAIL_FRACTION on the world); a collapsing
              model forgets rare continuations and drives it down.
  true_kl     per token, nats: mean of log p_true(t|s) - log q(t|context) over held-out
              true transitions, the repo's `eval/true_kl`. NaN without a true language.
  perplexity  exp(mean of -log q(t|context)) over the same transitions.

Tail metrics of a bigram model (`bigram_tail_metrics`), not linear in q, so that losing
tail transitions shows even where the refits are unbiased and the mean tail mass stays put
(a run that loses some tail transitions and inflates others keeps its tail mass):
  tail_survival  share of the tail transitions (s, t) with q(t|s) >= SURVIVAL_FRACTION
                 p(t|s): those the model still gives at least half their true probability.
                 NaN without a true language.
  tail_support   share of the tail transitions with q(t|s) > 0: those the model can still
                 emit at all. It is non-increasing over generations when zero probabilities
                 are absorbing (the maximum-likelihood engine of `loops/collapse_bigram.py`).
  tail_min_mass  tail_mass with q capped at p: mean over the held-out transitions s -> t of
                 sum_{t': tail[s, t']} min(q(t'|s), p(t'|s)). The truth scores its tail
                 mass; inflating one tail transition cannot make up for losing another.
                 Concave in q, so under refits that are unbiased per transition it falls in
                 expectation (Jensen). NaN without a true language.

Sample statistics of a set of rows:
  distinct_1       distinct emitted tokens / emitted tokens
  distinct_2       distinct counted transitions / counted transitions
  unigram_entropy  entropy (nats) of the emitted tokens' frequency distribution
  mean_length      emitted tokens per row
All are 0 for rows with no transition.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.world import language
from rlhf_jax.world.language import BOS_ID, EOS_ID, PAD_ID

TAIL_FRACTION = 0.1
SURVIVAL_FRACTION = 0.5


@flax.struct.dataclass
class SampleStats:
  """Statistics of a set of rows (module doc); scalars, or [...] under vmap.

  distinct_1, distinct_2, unigram_entropy, mean_length: float32.
  """
  distinct_1: jax.Array
  distinct_2: jax.Array
  unigram_entropy: jax.Array
  mean_length: jax.Array


@flax.struct.dataclass
class ModelMetrics:
  """A model scored on held-out real transitions (module doc); scalars, or [...] under vmap.

  true_kl:    float32 nats per token; NaN without a true language.
  perplexity: float32.
  tail_mass:  float32 in [0, 1].
  """
  true_kl: jax.Array
  perplexity: jax.Array
  tail_mass: jax.Array


@flax.struct.dataclass
class TailMetrics:
  """Tail metrics of a bigram model (module doc); float32 scalars, or [...] under vmap.

  survival, support: shares of the tail transitions, in [0, 1]; min_mass: in [0, tail
  mass]. survival and min_mass are NaN without a true language.
  """
  survival: jax.Array
  support: jax.Array
  min_mass: jax.Array


def counted(prev: jax.Array, nxt: jax.Array) -> jax.Array:
  """bool, same shape: which (prev, next) pairs are transitions (module doc)."""
  return (nxt != PAD_ID) & (prev != EOS_ID) & (prev != PAD_ID)


def bigram_counts(tokens: jax.Array, *, vocab_size: int) -> jax.Array:
  """[V, V] float32 transition counts of int rows `tokens` [N, T]; jit- and vmappable.

  float32 counts are exact up to 2^24 per cell.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  prev, nxt = tokens[:, :-1], tokens[:, 1:]
  weight = counted(prev, nxt).astype(jnp.float32)
  # One scatter-add into a flat buffer: vmap turns it into a batched scatter, where
  # a [V, V] 2-D index update would need per-seed index arithmetic anyway.
  flat = jnp.zeros(vocab_size * vocab_size, jnp.float32)
  flat = flat.at[(prev * vocab_size + nxt).reshape(-1)].add(weight.reshape(-1))
  return flat.reshape(vocab_size, vocab_size)


def count_statistics(counts: jax.Array, *, rows) -> SampleStats:
  """Sample statistics (module doc) of rows whose transition counts are `counts` [V, V];
  `rows` is how many rows they came from. Jit- and vmappable."""
  counts = jnp.asarray(counts, jnp.float32)
  emitted = counts.sum(0)
  total = emitted.sum()
  safe = jnp.maximum(total, 1.0)
  p = emitted / safe
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return SampleStats(
      distinct_1=(emitted > 0).sum().astype(jnp.float32) / safe,
      distinct_2=(counts > 0).sum().astype(jnp.float32) / safe,
      unigram_entropy=entropy,
      mean_length=total / jnp.maximum(jnp.asarray(rows, jnp.float32), 1.0))


def true_logp_table(lang: language.Language) -> np.ndarray:
  """[V, V] float64 log p_true(t|s), -inf off the support. Rows PAD and EOS are all -inf:
  nothing out of them is a transition."""
  succ, p = language._row_probs(lang)
  table = np.full((lang.vocab_size, lang.vocab_size), -np.inf)
  rows = np.repeat(np.arange(lang.vocab_size), succ.shape[1])
  with np.errstate(divide='ignore'):
    table[rows, succ.reshape(-1)] = np.log(p.reshape(-1))
  table[[PAD_ID, EOS_ID]] = -np.inf
  return table


def _expected_transitions(lang: language.Language) -> np.ndarray:
  """[V, V] float64 expected count of each transition in one untruncated sequence."""
  succ, p = language._row_probs(lang)
  visits = language._expected_visits(lang)
  expected = np.zeros((lang.vocab_size, lang.vocab_size))
  rows = np.repeat(np.arange(lang.vocab_size), succ.shape[1])
  np.add.at(expected, (rows, succ.reshape(-1)), (visits[:, None] * p).reshape(-1))
  expected[[PAD_ID, EOS_ID]] = 0.0
  return expected


def _rarest_prefix(weights: np.ndarray, order: np.ndarray, fraction: float) -> np.ndarray:
  """Indices of the longest prefix of `order` whose share of weights.sum() is <= fraction."""
  share = np.cumsum(weights[order]) / weights.sum()
  return order[:int(np.searchsorted(share, fraction, side='right'))]


def world_tail(lang: language.Language, *, fraction: float = TAIL_FRACTION) -> np.ndarray:
  """[V, V] bool: the world's tail transitions (module doc)."""
  expected = _expected_transitions(lang).reshape(-1)
  support = np.flatnonzero(expected > 0)
  order = support[np.argsort(expected[support], kind='stable')]
  mask = np.zeros(expected.shape, bool)
  mask[_rarest_prefix(expected, order, fraction)] = True
  return mask.reshape(lang.vocab_size, lang.vocab_size)


def text_tail(counts, *, fraction: float = TAIL_FRACTION) -> np.ndarray:
  """[V, V] bool: the rarest emitted tokens of real data with transition counts `counts`
  [V, V], the same token set in every row (module doc)."""
  emitted = np.asarray(counts, np.float64).sum(0)
  vocab = emitted.shape[0]
  ids = np.arange(vocab)
  candidates = ids[(ids != PAD_ID) & (ids != BOS_ID)]
  # lexsort's last key is the primary one: count ascending, then higher id first.
  order = candidates[np.lexsort((-candidates, emitted[candidates]))]
  tokens = np.zeros(vocab, bool)
  if emitted.sum() > 0:
    tokens[_rarest_prefix(emitted, order, fraction)] = True
  return np.broadcast_to(tokens, (vocab, vocab)).copy()


def bigram_model_metrics(log_q: jax.Array, *, heldout_counts: jax.Array, true_logp, tail
                         ) -> ModelMetrics:
  """Metrics of a bigram model log q(t|s) = log_q [..., V, V] from the held-out transition
  counts [V, V] (a sufficient statistic). true_logp [V, V] or None; tail [V, V] bool.
  Leading axes of log_q (seeds) carry through; jit- and vmappable."""
  log_q = jnp.asarray(log_q, jnp.float32)
  c = jnp.asarray(heldout_counts, jnp.float32)
  n = c.sum()
  seen = c > 0
  # Only held-out cells enter the sums: elsewhere 0 * -inf would be NaN.
  weighted = lambda x: jnp.where(seen, c * x, 0.0).sum((-2, -1)) / n
  nll = weighted(-log_q)
  if true_logp is None:
    true_kl = jnp.full(nll.shape, jnp.nan, jnp.float32)
  else:
    true_kl = weighted(jnp.asarray(true_logp, jnp.float32) - log_q)
  tail_q = jnp.where(jnp.asarray(tail, bool), jnp.exp(log_q), 0.0).sum(-1)   # [..., V]
  tail_mass = (tail_q * c.sum(-1)).sum(-1) / n
  return ModelMetrics(true_kl=true_kl, perplexity=jnp.exp(nll), tail_mass=tail_mass)


def bigram_tail_metrics(log_q: jax.Array, *, heldout_counts: jax.Array, true_logp, tail,
                        survival_fraction: float = SURVIVAL_FRACTION) -> TailMetrics:
  """Tail metrics (module doc) of a bigram model log q(t|s) = log_q [..., V, V]; the
  arguments are those of `bigram_model_metrics`. Leading axes of log_q carry through;
  jit- and vmappable."""
  q = jnp.exp(jnp.asarray(log_q, jnp.float32))
  tail = jnp.asarray(tail, bool)
  cells = jnp.maximum(tail.sum(), 1).astype(jnp.float32)
  share = lambda x: jnp.where(tail, x, False).sum((-2, -1)).astype(jnp.float32) / cells
  support = share(q > 0)
  if true_logp is None:
    nan = jnp.full(support.shape, jnp.nan, jnp.float32)
    return TailMetrics(survival=nan, support=support, min_mass=nan)
  p = jnp.exp(jnp.asarray(true_logp, jnp.float32))
  c = jnp.asarray(heldout_counts, jnp.float32)
  # Each state s weighs as often as it is the source of a held-out transition, as in
  # tail_mass, so that the truth's min_mass is its tail_mass.
  capped = jnp.where(tail, jnp.minimum(q, p), 0.0).sum(-1)                 # [..., V]
  return TailMetrics(survival=share(q >= survival_fraction * p), support=support,
                     min_mass=(capped * c.sum(-1)).sum(-1) / c.sum())


def positionwise_model_metrics(*, log_q: jax.Array, prev: jax.Array, next: jax.Array,
                               true_logp, tail) -> dict:
  """Sums over one batch for any model that gives log q per position [B, T, V] (normalised
  over V) for targets next [B, T] after tokens prev [B, T]; usually prev = rows[:, :-1],
  next = rows[:, 1:]. Returns {'count', 'true_kl_sum', 'nll_sum', 'tail_sum'} (float32
  scalars; true_kl_sum NaN without true_logp) to add up over batches and pass to
  `finish_positionwise`."""
  log_q = jnp.asarray(log_q, jnp.float32)
  prev, nxt = jnp.asarray(prev, jnp.int32), jnp.asarray(next, jnp.int32)
  mask = counted(prev, nxt)
  lq = jnp.take_along_axis(log_q, nxt[..., None], axis=-1)[..., 0]
  masked_sum = lambda x: jnp.where(mask, x, 0.0).sum()
  if true_logp is None:
    true_kl_sum = jnp.float32(jnp.nan)
  else:
    true_kl_sum = masked_sum(jnp.asarray(true_logp, jnp.float32)[prev, nxt] - lq)
  tail_q = jnp.where(jnp.asarray(tail, bool)[prev], jnp.exp(log_q), 0.0).sum(-1)
  return {'count': mask.sum().astype(jnp.float32), 'true_kl_sum': true_kl_sum,
          'nll_sum': masked_sum(-lq), 'tail_sum': masked_sum(tail_q)}


def finish_positionwise(sums) -> ModelMetrics:
  """ModelMetrics from `positionwise_model_metrics` sums added up over batches."""
  n = sums['count']
  return ModelMetrics(true_kl=jnp.asarray(sums['true_kl_sum'] / n, jnp.float32),
                      perplexity=jnp.exp(jnp.asarray(sums['nll_sum'] / n, jnp.float32)),
                      tail_mass=jnp.asarray(sums['tail_sum'] / n, jnp.float32))
