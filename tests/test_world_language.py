"""Tests for the true language against independent float64 NumPy computations."""
import itertools
import math

import jax
import numpy as np
import pytest
import scipy.stats

from rlhf_jax.errors import UserError
from rlhf_jax.world import language
from rlhf_jax.world.language import BOS_ID, EOS_ID, PAD_ID

TINY = dict(vocab_size=64, branching=8, zipf_a=1.1, eos_prob=0.05)
SMALL = dict(vocab_size=1024, branching=32, zipf_a=1.1, eos_prob=0.01)


@pytest.fixture(scope='module')
def tiny():
  return language.make_language(seed=0, **TINY)


@pytest.fixture(scope='module')
def small():
  return language.make_language(seed=0, **SMALL)


def dense_matrix(lang):
  """[V, V] float64 transition matrix, built entry by entry from the sparse table."""
  succ = np.asarray(lang.succ)
  logp = np.asarray(lang.logp, dtype=np.float64)
  p = np.zeros((lang.vocab_size, lang.vocab_size))
  for s in range(lang.vocab_size):
    for k in range(succ.shape[1]):
      p[s, succ[s, k]] += np.exp(logp[s, k])
  return p


def reference_token_logprobs(p, tokens):
  """Plain-loop float64 reference for `token_logprobs`."""
  out = np.zeros((tokens.shape[0], tokens.shape[1] - 1))
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1] - 1):
      prev, nxt = tokens[b, t], tokens[b, t + 1]
      if prev in (EOS_ID, PAD_ID):  # the row has ended: padding is not scored
        continue
      out[b, t] = np.log(p[prev, nxt]) if p[prev, nxt] > 0 else -np.inf
  return out


def reference_visits(p, *, tol=1e-16):
  """Expected content-token visits by summing BOS-row @ Q^n until the chain has ended."""
  p = p / p.sum(axis=1, keepdims=True)
  q = p[3:, 3:]
  d = p[BOS_ID, 3:].copy()
  visits = np.zeros_like(d)
  while d.sum() > tol:
    visits += d
    d = d @ q
  return visits


def reference_entropy_rate(p):
  p = p / p.sum(axis=1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
  visits = reference_visits(p)
  return (h[BOS_ID] + visits @ h[3:]) / (1.0 + visits.sum())


def merged_chisquare(observed, expected, *, min_expected=5.0):
  """Chi-square p-value after pooling cells whose expected count is small."""
  observed, expected = np.asarray(observed, float), np.asarray(expected, float)
  small = expected < min_expected
  obs = list(observed[~small]) + ([observed[small].sum()] if small.any() else [])
  exp = list(expected[~small]) + ([expected[small].sum()] if small.any() else [])
  if exp[-1] < min_expected and len(exp) > 1:
    obs[-2] += obs.pop()
    exp[-2] += exp.pop()
  return scipy.stats.chisquare(obs, exp).pvalue


def test_table_structure(tiny, small):
  for lang, cfg in ((tiny, TINY), (small, SMALL)):
    assert lang.succ.dtype == np.int32 and lang.logp.dtype == np.float32
    succ, logp = np.asarray(lang.succ), np.asarray(lang.logp, np.float64)
    v, k = cfg['vocab_size'], cfg['branching']
    assert succ.shape == logp.shape == (v, k)
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-6)
    # BOS row: distinct content tokens only.
    assert len(set(succ[BOS_ID])) == k and succ[BOS_ID].min() >= 3
    # Content rows: distinct content successors, then EOS with eos_prob.
    assert (succ[3:, -1] == EOS_ID).all()
    np.testing.assert_allclose(np.exp(logp[3:, -1]), cfg['eos_prob'], rtol=1e-6)
    assert (succ[3:, :-1] >= 3).all()
    assert all(len(set(row)) == k - 1 for row in succ[3:, :-1])
    # PAD and EOS rows: PAD with probability one.
    for s in (PAD_ID, EOS_ID):
      np.testing.assert_allclose(dense_matrix(lang)[s, PAD_ID], 1.0)


def test_tiny_enumeration_sums_to_one():
  lang = language.make_language(seed=1, vocab_size=6, branching=3, zipf_a=1.1,
                                eos_prob=0.3)
  p = dense_matrix(lang)
  max_len = 8
  rows = []
  for n in range(1, max_len + 1):
    for xs in itertools.product(range(3, 6), repeat=n):
      rows.append([BOS_ID, *xs, EOS_ID] + [PAD_ID] * (max_len - n))
  tokens = np.array(rows, np.int32)
  logps = np.asarray(language.sequence_logprob(lang, tokens=tokens), np.float64)
  complete_mass = np.exp(logps).sum()
  # Mass still going after max_len content tokens, by propagating the dense chain.
  d = p[BOS_ID, 3:]
  for _ in range(max_len):
    d = d @ p[3:, 3:]
  assert abs(complete_mass + d.sum() - 1.0) < 1e-6
  # Impossible sequences score -inf, possible ones are finite: count paths in the graph.
  adj = (p[3:, 3:] > 0).astype(int)
  walks = (p[BOS_ID, 3:] > 0).astype(int)
  num_paths = 0
  for _ in range(max_len):
    num_paths += walks.sum()
    walks = walks @ adj
  assert np.isfinite(logps).sum() == num_paths
  assert np.isneginf(logps).sum() == len(logps) - num_paths


def test_sample_format(tiny):
  toks = np.asarray(language.sample(tiny, key=jax.random.key(0), batch_size=512,
                                    seq_len=24))
  assert toks.shape == (512, 24) and toks.dtype == np.int32
  assert (toks[:, 0] == BOS_ID).all() and (toks[:, 1:] != BOS_ID).all()
  assert (toks[:, 1] >= 3).all()  # never EOS right after BOS
  for row in toks:
    ends = np.flatnonzero(row == EOS_ID)
    if ends.size:
      assert ends.size == 1 and (row[ends[0] + 1:] == PAD_ID).all()
      assert (row[1:ends[0]] >= 3).all()
    else:
      assert (row[1:] >= 3).all()  # truncated: no PAD, no EOS
  assert (toks[:, -1] >= 3).any() and (toks == EOS_ID).any()  # both kinds present
  one = language.sample(tiny, key=jax.random.key(0), batch_size=3, seq_len=1)
  np.testing.assert_array_equal(one, [[BOS_ID]] * 3)


def test_sampled_frequencies_match(tiny):
  toks = np.asarray(language.sample(tiny, key=jax.random.key(42), batch_size=20000,
                                    seq_len=16))
  p = dense_matrix(tiny)
  p = p / p.sum(axis=1, keepdims=True)
  first = np.bincount(toks[:, 1], minlength=tiny.vocab_size)
  support = p[BOS_ID] > 0
  assert first[~support].sum() == 0
  assert merged_chisquare(first[support], 20000 * p[BOS_ID, support]) > 1e-3

  prev, nxt = toks[:, :-1].ravel(), toks[:, 1:].ravel()
  state = np.bincount(prev[prev >= 3]).argmax()
  after = nxt[prev == state]
  assert len(after) > 2000
  counts = np.bincount(after, minlength=tiny.vocab_size)
  support = p[state] > 0
  assert counts[~support].sum() == 0
  assert merged_chisquare(counts[support], len(after) * p[state, support]) > 1e-3


@pytest.mark.parametrize('cfg_name', ['tiny', 'small'])
def test_token_logprobs_match_reference(cfg_name, request):
  lang = request.getfixturevalue(cfg_name)
  toks = np.array(language.sample(lang, key=jax.random.key(7), batch_size=64,
                                  seq_len=48))
  # Corrupt a few positions so that impossible transitions (-inf) are covered.
  rng = np.random.default_rng(0)
  for b in range(0, 64, 8):
    t = rng.integers(1, 47)
    if toks[b, t] >= 3:
      toks[b, t] = rng.integers(3, lang.vocab_size)
  p = dense_matrix(lang)
  want = reference_token_logprobs(p, toks)
  got = np.asarray(language.token_logprobs(lang, tokens=toks), np.float64)
  assert got.shape == (64, 47) and got.dtype == np.float64
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  assert np.isneginf(want).any()
  finite = np.isfinite(want)
  np.testing.assert_allclose(got[finite], want[finite], atol=1e-5, rtol=0)
  seq = np.asarray(language.sequence_logprob(lang, tokens=toks), np.float64)
  np.testing.assert_allclose(seq, want.sum(axis=1), atol=1e-4, rtol=1e-6)
  # Dense next-token distributions are the rows of the matrix.
  prev = np.array([[BOS_ID, 3, lang.vocab_size - 1], [EOS_ID, PAD_ID, 10]])
  probs = np.asarray(language.next_token_probs(lang, prev=prev))
  assert probs.shape == (2, 3, lang.vocab_size)
  np.testing.assert_allclose(probs, p[prev], atol=1e-6)


def test_enumerated_rows_pad_is_free_only_after_eos():
  """Every row of width 5 over a 7-token world, scored against a plain-Python walk of the
  transition table: a PAD right after BOS or a content token is impossible (-inf), a PAD
  after EOS or PAD is free, and the rows the true language can emit (PAD only after the
  end) carry total probability exactly one."""
  lang = language.make_language(seed=3, vocab_size=7, branching=3, zipf_a=1.1, eos_prob=0.3)
  table = {}  # (prev, next) -> probability, entry by entry from the sparse lists
  for s, (succ, logp) in enumerate(zip(np.asarray(lang.succ).tolist(),
                                       np.asarray(lang.logp, np.float64).tolist())):
    for t, lp in zip(succ, logp):
      table[s, t] = table.get((s, t), 0.0) + math.exp(lp)
  assert table.get((BOS_ID, PAD_ID), 0.0) == 0.0 and table[EOS_ID, PAD_ID] == 1.0

  def python_logp(row):
    total = 0.0
    for prev, nxt in zip(row, row[1:]):
      if prev in (EOS_ID, PAD_ID):
        continue
      p = table.get((prev, nxt), 0.0)
      if p == 0.0:
        return -math.inf
      total += math.log(p)
    return total

  rows = np.array([(BOS_ID, *r) for r in itertools.product(range(7), repeat=4)], np.int32)
  got = np.asarray(language.sequence_logprob(lang, tokens=rows), np.float64)
  want = np.array([python_logp(r) for r in rows.tolist()])
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=1e-5)

  by_row = {tuple(r): g for r, g in zip(rows.tolist(), got)}
  x = int(np.asarray(lang.succ)[BOS_ID, 0])  # a content token BOS can emit
  y = next(t for t in range(3, 7) if table.get((x, t), 0.0) > 0)
  assert by_row[BOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID] == -np.inf
  assert by_row[BOS_ID, x, PAD_ID, PAD_ID, PAD_ID] == -np.inf
  assert by_row[BOS_ID, x, y, PAD_ID, PAD_ID] == -np.inf
  assert by_row[BOS_ID, x, PAD_ID, y, EOS_ID] == -np.inf
  ended = math.log(table[BOS_ID, x]) + math.log(table[x, EOS_ID])
  assert by_row[BOS_ID, x, EOS_ID, PAD_ID, PAD_ID] == pytest.approx(ended, abs=1e-6)

  # The true language pads only after EOS; rows cut off at the width carry the rest of
  # the mass. Scoring a mid-row PAD as free would add p(BOS x1 .. xk) for each cut.
  emittable = [all(t == PAD_ID for t in r[r.index(EOS_ID) + 1:]) if EOS_ID in r else True
               for r in rows.tolist()]
  assert np.exp(got[emittable]).sum() == pytest.approx(1.0, abs=1e-5)


def test_entropy_rate_matches_monte_carlo(tiny):
  toks = language.sample(tiny, key=jax.random.key(3), batch_size=4000, seq_len=400)
  lp = np.asarray(language.token_logprobs(tiny, tokens=toks), np.float64)
  toks = np.asarray(toks)
  assert (toks == EOS_ID).any(axis=1).all()  # untruncated
  nll = -lp.sum(axis=1)
  n = (toks[:, 1:] != PAD_ID).sum(axis=1)
  ratio = nll.sum() / n.sum()
  # Delta-method standard error of a ratio of means.
  se = np.std(nll - ratio * n, ddof=1) / np.sqrt(len(n)) / n.mean()
  h = language.entropy_rate(tiny)
  assert abs(ratio - h) < 3 * se, (ratio, h, se)
  length = language.expected_length(tiny)
  assert abs(n.mean() - length) < 3 * n.std(ddof=1) / np.sqrt(len(n))
  assert length == pytest.approx(1 + 1 / TINY['eos_prob'], rel=1e-6)


def test_entropy_rate_matches_power_series(tiny):
  rng = np.random.default_rng(0)
  # Content rows of a built language all have the same entropy (a shuffled Zipf row),
  # so give them random weights to make the visit weighting matter.
  logp = np.array(tiny.logp, np.float64)
  noise = rng.normal(size=logp[3:, :-1].shape) * 1.5
  content = logp[3:, :-1] + noise
  content -= np.log(np.exp(content).sum(axis=1, keepdims=True))
  logp[3:, :-1] = content + np.log(rng.uniform(0.5, 0.95, size=(logp.shape[0] - 3, 1)))
  logp[3:, -1] = np.log1p(-np.exp(logp[3:, :-1]).sum(axis=1))
  for lang in (tiny, tiny.replace(logp=np.asarray(logp, np.float32))):
    p = dense_matrix(lang)
    assert language.entropy_rate(lang) == pytest.approx(reference_entropy_rate(p),
                                                        abs=1e-9)
    visits = reference_visits(p)
    assert language.expected_length(lang) == pytest.approx(1 + visits.sum(), abs=1e-9)
    uni = language.unigram_probs(lang)
    np.testing.assert_allclose(uni[3:], visits / (1 + visits.sum()), atol=1e-12)
    assert uni[EOS_ID] == pytest.approx(1 / (1 + visits.sum()), abs=1e-12)
    assert uni[PAD_ID] == uni[BOS_ID] == 0.0


def test_determinism():
  a = language.make_language(seed=5, **TINY)
  b = language.make_language(seed=5, **TINY)
  c = language.make_language(seed=6, **TINY)
  np.testing.assert_array_equal(a.succ, b.succ)
  np.testing.assert_array_equal(a.logp, b.logp)
  assert not np.array_equal(a.succ, c.succ)
  assert not np.array_equal(a.logp, c.logp)
  key = jax.random.key(9)
  np.testing.assert_array_equal(
      language.sample(a, key=key, batch_size=8, seq_len=32),
      language.sample(b, key=key, batch_size=8, seq_len=32))


@pytest.mark.parametrize('cfg_name', ['tiny', 'small'])
def test_heavy_tail(cfg_name, request):
  lang = request.getfixturevalue(cfg_name)
  p = dense_matrix(lang)
  p = p / p.sum(axis=1, keepdims=True)
  q = p[3:, 3:]
  visits = np.linalg.solve((np.eye(len(q)) - q).T, p[BOS_ID, 3:])
  unigram = np.sort(visits / visits.sum())
  tail = unigram[:len(unigram) // 10].sum()
  head = unigram[-(len(unigram) // 10):].sum()
  # Every content token is reachable, but the rarest tenth of the vocabulary holds
  # under 1% of the mass (a uniform language would give it 10%) and the commonest
  # tenth over 30%.
  assert unigram[0] > 0
  assert 0 < tail < 0.01
  assert head > 0.3


def test_large_vocab_is_sparse_and_reachable():
  lang = language.make_language(seed=0, vocab_size=32768, branching=32, zipf_a=1.1,
                                eos_prob=0.01)
  succ = np.asarray(lang.succ)
  assert succ.shape == (32768, 32)
  reached = np.zeros(32768, bool)
  frontier = np.unique(succ[BOS_ID])
  while frontier.size:
    reached[frontier] = True
    nxt = np.unique(succ[frontier])
    frontier = nxt[~reached[nxt]]
  assert reached[3:].all()
  assert language.expected_length(lang) == pytest.approx(101.0, rel=1e-5)


@pytest.mark.parametrize('field, value', [
    ('vocab_size', 4), ('vocab_size', 64.0), ('branching', 1), ('branching', 62),
    ('zipf_a', 0.0), ('zipf_a', -1.0), ('eos_prob', 0.0), ('eos_prob', 1.0),
    ('seed', 'x'),
])
def test_bad_arguments(field, value):
  kwargs = dict(seed=0, **TINY)
  kwargs[field] = value
  with pytest.raises(UserError, match=f'world.{field}'):
    language.make_language(**kwargs)
