"""The true language: a seeded order-1 Markov chain with exactly computable probabilities.

Token ids: PAD=0, BOS=1, EOS=2, content tokens 3..V-1. A sequence is
`BOS x1 x2 ... xn EOS` with n >= 1, padded with PAD after EOS.

The chain is stored sparsely so that V = 32k costs V*K numbers, not V*V:
row `s` of `succ` lists the K possible next tokens after `s` and the same row of
`logp` their log-probabilities.

- BOS row: K distinct content tokens, never EOS, so every sequence has at least one
  content token.
- Content rows: K-1 distinct content tokens in columns 0..K-2 and EOS in the last
  column, with probability `eos_prob`; the content successors share `1 - eos_prob`.
  Because every content row can end, every sequence ends with probability one and the
  expected length is `1 + 1/eos_prob` tokens after BOS (EOS included).
- PAD and EOS rows are never used to score or sample a real token; they hold PAD in
  every column with log-probabilities `[0, -inf, ...]`. So "after EOS or PAD comes PAD
  with probability one", which is exactly the padding convention, and the sampler
  needs no special case for finished rows.

The heavy tail comes from two Zipf laws with exponent `zipf_a`. Content token ids are
sorted by a global popularity (like a frequency-sorted tokenizer vocabulary): token
`3 + r - 1` has weight `r**-zipf_a`, and successors are drawn from it without
replacement, so high ids are rare everywhere. Inside each row the successors get
weights `k**-zipf_a` for k = 1..K in a random order, so some transitions are rare.

Reachability: popularity draws alone would leave the highest ids unreachable at
large V. So column 0 of each content row is its successor on one random cycle through
all content tokens (weighted like any other column, at a random Zipf rank). The BOS
row reaches some content token, and the cycle then reaches every content token with
positive probability.
"""
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from rlhf_jax.errors import UserError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_FIRST_CONTENT = 3

# Above this many content tokens the visit-count solve goes sparse and iterative;
# below it a dense LU is exact and quick.
_DENSE_SOLVE_MAX = 4096


@flax.struct.dataclass
class Language:
  """Sparse successor table of the true language.

  succ:       [V, K] int32 next-token ids for each previous token (see module doc).
  logp:       [V, K] float32 their log-probabilities; logsumexp over K is 0 per row.
  vocab_size: V, including the three special tokens.
  """
  succ: jax.Array
  logp: jax.Array
  vocab_size: int = flax.struct.field(pytree_node=False)

  @property
  def branching(self) -> int:
    return self.succ.shape[1]


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate(*, seed, vocab_size, branching, zipf_a, eos_prob):
  if not _is_int(seed):
    raise UserError(f'world.seed must be an integer, got {seed!r}')
  if not _is_int(vocab_size) or vocab_size < 5:
    raise UserError(
        f'world.vocab_size must be an integer >= 5 (PAD, BOS, EOS and at least two '
        f'content tokens), got {vocab_size!r}')
  num_content = vocab_size - _FIRST_CONTENT
  # Content rows spend one column on EOS, so K = 1 would leave them no content
  # successor and make almost every token unreachable.
  if not _is_int(branching) or not 2 <= branching <= num_content:
    raise UserError(
        f'world.branching must be an integer in [2, vocab_size - 3 = {num_content}] '
        f'(one column is EOS), got {branching!r}')
  if (not isinstance(zipf_a, (int, float, np.floating, np.integer))
      or isinstance(zipf_a, bool) or not np.isfinite(zipf_a) or zipf_a <= 0):
    raise UserError(f'world.zipf_a must be a finite number > 0, got {zipf_a!r}')
  if (not isinstance(eos_prob, (int, float, np.floating, np.integer))
      or isinstance(eos_prob, bool) or not 0 < eos_prob < 1):
    raise UserError(f'world.eos_prob must be a number in (0, 1), got {eos_prob!r}')


def _draw_without_replacement(rng, *, cdf, taken, num_draws):
  """Extends each row of `taken` [R, J] by `num_draws` distinct indices of `cdf`.

  Sequential draws proportional to the popularity, restricted to indices not yet in
  the row. Rejection (redraw on collision) is exact and fast when the row is a small
  part of the vocabulary; rows still colliding after a few rounds (rare tokens left
  to draw) fall back to renormalising the remaining weights explicitly.
  """
  weights = np.diff(cdf, prepend=0.0)
  rows = np.arange(taken.shape[0])
  for _ in range(num_draws):
    cand = np.searchsorted(cdf, rng.random(taken.shape[0]) * cdf[-1], side='right')
    cand = np.minimum(cand, len(cdf) - 1)
    bad = (cand[:, None] == taken).any(axis=1)
    for _ in range(32):
      if not bad.any():
        break
      idx = rows[bad]
      redraw = np.searchsorted(cdf, rng.random(len(idx)) * cdf[-1], side='right')
      cand[idx] = np.minimum(redraw, len(cdf) - 1)
      bad[idx] = (cand[idx, None] == taken[idx]).any(axis=1)
    for i in rows[bad]:
      w = weights.copy()
      w[taken[i]] = 0.0
      cand[i] = rng.choice(len(w), p=w / w.sum())
    taken = np.concatenate([taken, cand[:, None]], axis=1)
  return taken


def _zipf_row_logp(rng, *, num_rows, width, zipf_a, mass):
  """[num_rows, width] float64 log of `mass * k**-a / sum` with ranks k shuffled per row."""
  ranks = np.argsort(rng.random((num_rows, width)), axis=1) + 1.0
  w = ranks ** -zipf_a
  return np.log(mass) + np.log(w) - np.log(w.sum(axis=1, keepdims=True))


def make_language(*, seed: int, vocab_size: int, branching: int, zipf_a: float,
                  eos_prob: float) -> Language:
  """Builds the true language deterministically from `seed` (see module doc)."""
  _validate(seed=seed, vocab_size=vocab_size, branching=branching, zipf_a=zipf_a,
            eos_prob=eos_prob)
  rng = np.random.default_rng(seed)
  v, k = int(vocab_size), int(branching)
  num_content = v - _FIRST_CONTENT
  popularity = np.arange(1, num_content + 1, dtype=np.float64) ** -float(zipf_a)
  cdf = np.cumsum(popularity)

  # Indices below are content indices 0..C-1 (token id minus 3).
  order = rng.permutation(num_content)
  cycle_next = np.empty(num_content, dtype=np.int64)
  cycle_next[order] = np.roll(order, -1)
  content_succ = _draw_without_replacement(
      rng, cdf=cdf, taken=cycle_next[:, None], num_draws=k - 2)
  content_logp = _zipf_row_logp(
      rng, num_rows=num_content, width=k - 1, zipf_a=zipf_a, mass=1.0 - eos_prob)

  bos_succ = _draw_without_replacement(
      rng, cdf=cdf, taken=np.empty((1, 0), dtype=np.int64), num_draws=k)
  bos_logp = _zipf_row_logp(rng, num_rows=1, width=k, zipf_a=zipf_a, mass=1.0)

  succ = np.full((v, k), PAD_ID, dtype=np.int64)
  logp = np.full((v, k), -np.inf, dtype=np.float64)
  logp[[PAD_ID, EOS_ID], 0] = 0.0
  succ[BOS_ID] = bos_succ[0] + _FIRST_CONTENT
  logp[BOS_ID] = bos_logp[0]
  succ[_FIRST_CONTENT:, :k - 1] = content_succ + _FIRST_CONTENT
  succ[_FIRST_CONTENT:, k - 1] = EOS_ID
  logp[_FIRST_CONTENT:, :k - 1] = content_logp
  logp[_FIRST_CONTENT:, k - 1] = np.log(eos_prob)
  return Language(
      succ=jnp.asarray(succ, dtype=jnp.int32),
      logp=jnp.asarray(logp.astype(np.float32)),
      vocab_size=v)


def from_block(world) -> Language:
  """The language of a config's `world` block (seed, vocab_size, branching, zipf_a, eos_prob)."""
  return make_language(seed=world.seed, vocab_size=world.vocab_size, branching=world.branching,
                       zipf_a=world.zipf_a, eos_prob=world.eos_prob)


@functools.partial(jax.jit, static_argnames=('batch_size', 'seq_len'))
def sample(lang: Language, *, key: jax.Array, batch_size: int, seq_len: int) -> jax.Array:
  """[batch_size, seq_len] int32 rows `BOS x1 ... EOS PAD ...`, truncated at seq_len."""
  bos = jnp.full((batch_size,), BOS_ID, dtype=jnp.int32)
  if seq_len <= 1:
    return bos[:, None][:, :seq_len]

  def step(prev, step_key):
    # PAD/EOS rows put all mass on PAD, so finished rows keep emitting PAD.
    col = jax.random.categorical(step_key, lang.logp[prev], axis=-1)
    nxt = jnp.take_along_axis(lang.succ[prev], col[:, None], axis=1)[:, 0]
    return nxt, nxt

  _, toks = jax.lax.scan(step, bos, jax.random.split(key, seq_len - 1))
  return jnp.concatenate([bos[:, None], toks.T], axis=1)


@jax.jit
def token_logprobs(lang: Language, *, tokens: jax.Array) -> jax.Array:
  """[B, T-1] float32 log p_true(tokens[:, t+1] | tokens[:, t]).

  0 where the previous token is EOS or PAD: a row ends at its EOS, and what follows is
  padding, not scored (the table puts PAD there with probability one). Elsewhere the
  table decides, PAD included: -inf where the target is not a successor of the previous
  token, so a PAD right after BOS or a content token (a row cut short without its EOS,
  or a model sample that emits PAD mid-sequence) has p_true = 0, as under the true
  language, which never emits it there. A consumer summing these gets -inf for such a
  row; the true-KL estimates (`eval/true_kl`, `collapse/true_kl`) score only fresh true
  samples, which never hold one, so they stay finite.
  """
  tokens = jnp.asarray(tokens, dtype=jnp.int32)
  prev, nxt = tokens[:, :-1], tokens[:, 1:]
  match = lang.succ[prev] == nxt[..., None]  # [B, T-1, K]
  # Successors in a used row are distinct, so at most one column matches.
  lp = jnp.max(jnp.where(match, lang.logp[prev], -jnp.inf), axis=-1)
  ignore = (prev == EOS_ID) | (prev == PAD_ID)
  return jnp.where(ignore, 0.0, lp).astype(jnp.float32)


@jax.jit
def sequence_logprob(lang: Language, *, tokens: jax.Array) -> jax.Array:
  """[B] float32 log p_true of each row (sum of `token_logprobs`)."""
  return token_logprobs(lang, tokens=tokens).sum(axis=-1)


@jax.jit
def next_token_probs(lang: Language, *, prev: jax.Array) -> jax.Array:
  """[..., V] float32 dense next-token distribution after each token in `prev` [...]."""
  prev = jnp.asarray(prev, dtype=jnp.int32)
  flat = prev.reshape(-1)
  rows = jnp.arange(flat.shape[0])[:, None]
  dense = jnp.zeros((flat.shape[0], lang.vocab_size), jnp.float32)
  dense = dense.at[rows, lang.succ[flat]].add(jnp.exp(lang.logp[flat]))
  return dense.reshape(prev.shape + (lang.vocab_size,))


def _row_probs(lang: Language):
  """float64 succ [V, K] and row-normalised probabilities [V, K].

  Renormalising in float64 gives the chain the sampler draws from (categorical
  normalises the float32 logits), so the exact quantities below are about it.
  """
  succ = np.asarray(lang.succ, dtype=np.int64)
  logp = np.asarray(lang.logp, dtype=np.float64)
  p = np.exp(logp - logp.max(axis=1, keepdims=True))
  return succ, p / p.sum(axis=1, keepdims=True)


def _expected_visits(lang: Language) -> np.ndarray:
  """[V] float64 expected count of each token in one untruncated sequence.

  With Q the content-to-content block of the transition matrix and b the BOS row
  restricted to content tokens, the visits to content tokens solve
  v = b + v Q, i.e. (I - Q)^T v = b. BOS and EOS occur exactly once.
  """
  succ, p = _row_probs(lang)
  v_size = lang.vocab_size
  c = v_size - _FIRST_CONTENT
  b = np.zeros(c)
  np.add.at(b, succ[BOS_ID] - _FIRST_CONTENT, p[BOS_ID])
  src = np.repeat(np.arange(c), succ.shape[1])
  dst = succ[_FIRST_CONTENT:].reshape(-1) - _FIRST_CONTENT
  w = p[_FIRST_CONTENT:].reshape(-1)
  keep = dst >= 0  # drops the EOS column
  q_t = scipy.sparse.csr_matrix((w[keep], (dst[keep], src[keep])), shape=(c, c))
  a = scipy.sparse.identity(c, format='csr') - q_t
  if c <= _DENSE_SOLVE_MAX:
    visits = np.linalg.solve(a.toarray(), b)
  else:
    # A direct sparse LU fills in badly on a random graph; I - Q is well conditioned
    # (spectral radius of Q <= 1 - eos_prob), so GMRES converges quickly.
    visits, info = scipy.sparse.linalg.gmres(a, b, rtol=1e-13, atol=0.0,
                                             restart=200, maxiter=1000)
    if info != 0:
      raise RuntimeError(f'visit-count solve did not converge (info={info})')
  out = np.zeros(v_size)
  out[BOS_ID] = 1.0
  out[EOS_ID] = 1.0
  out[_FIRST_CONTENT:] = visits
  return out


def expected_length(lang: Language) -> float:
  """Expected number of tokens after BOS, EOS included, of an untruncated sequence.

  Equals 1 + 1/eos_prob since every content row ends with probability eos_prob.
  """
  visits = _expected_visits(lang)
  return float(visits[_FIRST_CONTENT:].sum() + 1.0)


def unigram_probs(lang: Language) -> np.ndarray:
  """[V] float64 share of each token among emitted tokens (after BOS, EOS included)."""
  visits = _expected_visits(lang)
  visits[BOS_ID] = 0.0
  return visits / visits.sum()


def entropy_rate(lang: Language) -> float:
  """Exact entropy per emitted token (nats) of the untruncated process.

  The chain started at BOS is absorbed at EOS. With v(s) the expected visits to
  content token s (see `_expected_visits`) and H(s) the entropy of row s,

    H_per_token = (H(BOS) + sum_s v(s) H(s)) / (1 + sum_s v(s)),

  the expected -log p_true of a whole sequence divided by its expected number of
  emitted tokens (content tokens plus the EOS). This is what a Monte Carlo ratio
  of summed -log p to summed token counts converges to.

  In a table from `make_language` every content row is a shuffled Zipf row with the
  same EOS mass, so H(s) is one number and, with sum_s v(s) = 1/eos_prob, this is
  (H(BOS) + H(s)/eos_prob) / (1 + 1/eos_prob); the visit weighting matters for
  tables edited by hand (e.g. `lang.replace(logp=...)`).
  """
  _, p = _row_probs(lang)
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  row_entropy = -plogp.sum(axis=1)
  visits = _expected_visits(lang)
  content = visits[_FIRST_CONTENT:]
  seq_entropy = row_entropy[BOS_ID] + content @ row_entropy[_FIRST_CONTENT:]
  return float(seq_entropy / (1.0 + content.sum()))
