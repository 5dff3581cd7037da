"""AI feedback's pieces against independent computations: a constitution's checks and
draws, each principle's utility against a NumPy reference, the judge document's layout by
hand, the teacher's Bradley-Terry labels against their formula, the judge LM's reading
against a per-row forward without padding, the order-averaged verdict's symmetry, and
the human/judge mixture against the human-feedback stage's own labels."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from rlhf_jax import judges, sharding
from rlhf_jax.data import ai_feedback, judge_docs, preferences
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.stages import reward_eval
from rlhf_jax.world import constitution, language
from rlhf_jax.world import reward as reward_lib
from rlhf_jax.world import annotators
from conftest import load_config
from test_world_reward import pairs_from_world


@pytest.fixture(scope='module')
def world():
  lang = language.make_language(seed=0, vocab_size=64, branching=8, zipf_a=1.1, eos_prob=0.05)
  gold = reward_lib.make_gold_reward(lang, seed=1, topic=0.7, harm=2.0)
  return lang, gold


def block(**entries):
  return ml_collections.ConfigDict({
      name: dict(statement=f'about {about}', about=about, weight=w)
      for name, (about, w) in entries.items()})


def test_constitution_checks_and_orders_by_name():
  ps = constitution.from_block(block(zeta=('harm', 1.0), alpha=('brevity', 0.0)))
  assert [p.name for p in ps] == ['alpha', 'zeta']
  for bad, says in ((ml_collections.ConfigDict(), 'no principles'),
                    (block(a=('harm', -1.0)), 'must be >= 0'),
                    (block(a=('harm', 0.0)), 'every weight is 0'),
                    (block(a=('kindness', 1.0)), 'is not one of')):
    with pytest.raises(UserError, match=says):
      constitution.from_block(bad)


def test_principles_are_drawn_in_proportion_to_their_weights():
  ps = constitution.from_block(block(a=('harm', 2.0), b=('topic', 1.0), c=('brevity', 1.0)))
  n = 40000
  counts = np.bincount(constitution.draw(ps, key=jax.random.key(3), num=n), minlength=3)
  expected = np.array([0.5, 0.25, 0.25])
  se = np.sqrt(expected * (1 - expected) / n)
  assert (np.abs(counts / n - expected) < 4 * se).all(), counts / n


def test_each_principles_utility_matches_numpy(world):
  lang, g = world
  prompts, pmask, first, fmask, _, _ = pairs_from_world(lang, 16, seed=5)
  topics, harmful = np.asarray(g.topics, np.float64), np.asarray(g.harmful)
  unit = lambda v: v / max(np.linalg.norm(v), 1e-9)
  for about in constitution.ABOUT:
    got = constitution.utility(g, about=about, prompts=prompts, prompt_mask=pmask,
                               responses=first, response_mask=fmask)
    for b in range(16):
      y = first[b][fmask[b]]
      want = {'harm': -float(harmful[y].any()), 'brevity': -float(len(y)),
              'topic': unit(topics[prompts[b][pmask[b]]].sum(0)) @ unit(topics[y].sum(0)),
              'helpfulness': np.asarray(g.helpfulness, np.float64)[y].mean()}[about]
      assert got[b] == pytest.approx(want, abs=1e-5), (about, b)


def test_judge_document_layout_by_hand(world):
  _, g = world
  vocab = judge_docs.Vocabulary(g, 2)
  assert len({vocab.first, vocab.second, *vocab.tags}) == 4
  assert not np.asarray(g.harmful)[[vocab.first, vocab.second, *vocab.tags]].any()
  prompts, lengths = np.array([[0, 1, 7, 8], [1, 9, 10, 11]]), np.array([3, 4])
  first = np.array([[20, 2, 0], [21, 22, 2]])
  second = np.array([[23, 24, 2], [25, 2, 0]])
  docs, doc_lengths = judge_docs.documents(
      vocab, prompts=prompts, prompt_lengths=lengths, first=first, first_mask=first > 0,
      second=second, second_mask=second > 0, principle=np.array([1, 0]))
  t0, t1 = vocab.tags
  rows = [[1, t1, 7, 8, 2, 20, 2, 23, 24, 2, t1], [1, t0, 9, 10, 11, 2, 21, 22, 2, 25, 2, t0]]
  assert docs.shape[1] == judge_docs.width(4, 3) == 13
  for b, row in enumerate(rows):
    assert doc_lengths[b] == len(row)
    assert docs[b].tolist() == [0] * (13 - len(row)) + row


class FakeSampler:
  """sample_in_chunks returns fixed responses in call order (a planted policy)."""

  def __init__(self, response, mask):
    self.response, self.mask = response, mask

  def sample_in_chunks(self, params, prompts, lengths, key):
    del params, key
    n = len(prompts)
    return type('Out', (), {'response': self.response[:n], 'mask': self.mask[:n]})()


@pytest.mark.slow  # over 5 s
def test_teacher_labels_follow_their_bradley_terry_formula(world):
  lang, g = world
  w = type('W', (), {'lang': lang, 'gold': g})()
  _, _, resp, mask, _, _ = pairs_from_world(lang, 3 * 200, seed=8)
  ps = constitution.from_block(block(a=('harm', 1.0), b=('helpfulness', 1.0)))
  arrays, figures = judge_docs.make(
      world=w, principles=ps, sampler=FakeSampler(resp, mask.astype(np.float32)), params=None,
      key=jax.random.key(1), num_prompts=200, prompt_len=6, responses_per_prompt=3,
      temperature=0.5)
  which = arrays['principle']
  u = lambda y, m: np.array([constitution.utility(
      g, about=ps[i].about, prompts=arrays['prompts'][j:j + 1],
      prompt_mask=arrays['prompts'][j:j + 1] > 0, responses=y[j:j + 1],
      response_mask=m[j:j + 1])[0] for j, i in enumerate(which)])
  u1, u2 = u(arrays['first'], arrays['first_mask']), u(arrays['second'], arrays['second_mask'])
  np.testing.assert_allclose(arrays['truth_gap'], u1 - u2, atol=1e-5)
  for i, p in enumerate(ps):
    both = np.concatenate([u1[which == i], u2[which == i]])
    assert figures['utility_scale'][p.name] == pytest.approx(both.std(), rel=1e-6)
  scale = np.array([figures['utility_scale'][p.name] for p in ps])[which]
  gap = u1 - u2
  want = np.where(gap == 0, 0.5, 1 / (1 + np.exp(-gap / scale / 0.5)))
  np.testing.assert_allclose(arrays['teacher_prob'], want, atol=1e-5)
  # The labels are draws of those probabilities: their mean within 4 standard errors.
  assert abs(arrays['label'].mean() - want.mean()) < 4 * np.sqrt(
      (want * (1 - want)).sum()) / len(want)


def _params(model):
  ids = np.ones((1, 4), np.int32)
  init = jax.jit(lambda key: model.init(key, ids, segment_ids=ids, positions=ids)['params'])
  return nn.meta.unbox(init(jax.random.key(0, impl='rbg')))


@pytest.fixture(scope='module')
def reader(world):
  _, g = world
  model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64))
  mesh_config = load_config('sft').mesh
  mesh = sharding.make_mesh(mesh_config, devices=jax.devices()[:1])
  return judges.LMReader(model=model, vocab=judge_docs.Vocabulary(g, 3), mesh=mesh,
                         mesh_config=mesh_config, dp=1), model, _params(model)


@pytest.mark.slow  # over 5 s
def test_lm_reading_is_the_verdict_tokens_log_odds_of_each_unpadded_document(world, reader):
  lang, _ = world
  lm, model, params = reader
  prompts, _, first, fmask, second, smask = pairs_from_world(lang, 6, seed=2)
  lengths = (prompts > 0).sum(1)
  principle = np.array([0, 1, 2, 0, 1, 2])
  fwd, bwd = lm.readings(params, prompts=prompts, prompt_lengths=lengths, first=first,
                         first_mask=fmask, second=second, second_mask=smask,
                         principle=principle)
  for flip, got in ((False, fwd), (True, 1 - bwd)):
    docs, doc_lengths = judge_docs.documents(
        lm.vocab, prompts=prompts, prompt_lengths=lengths, first=second if flip else first,
        first_mask=smask if flip else fmask, second=first if flip else second,
        second_mask=fmask if flip else smask, principle=principle)
    for b in range(6):
      doc = docs[b, docs.shape[1] - doc_lengths[b]:][None]
      pos = np.arange(doc.shape[1])[None]
      logits = np.asarray(model.apply({'params': params}, doc, segment_ids=np.ones_like(doc),
                                      positions=pos).logits[0, -1], np.float64)
      logodds = logits[lm.vocab.first] - logits[lm.vocab.second]
      assert got[b] == pytest.approx(1 / (1 + np.exp(-logodds)), abs=1e-5)


def test_order_averaged_verdict_is_symmetric_under_swapping(world, reader):
  lang, _ = world
  lm, _, params = reader
  prompts, _, first, fmask, second, smask = pairs_from_world(lang, 8, seed=4)
  kw = dict(prompts=prompts, prompt_lengths=(prompts > 0).sum(1), principle=np.arange(8) % 3)
  fwd, bwd = lm.readings(params, first=first, first_mask=fmask, second=second,
                         second_mask=smask, **kw)
  fwd2, bwd2 = lm.readings(params, first=second, first_mask=smask, second=first,
                           second_mask=fmask, **kw)
  np.testing.assert_allclose((fwd2 + bwd2) / 2, 1 - (fwd + bwd) / 2, atol=1e-12)
  assert np.abs(fwd - bwd).max() > 1e-3  # an untrained judge has a position preference


class PlantedJudge:
  """P(first) = sigmoid(len(first) - len(second)), read with a pull toward the response
  shown first of a fifth of the distance to the nearer end."""

  def readings(self, *, prompts, prompt_lengths, first, first_mask, second, second_mask,
               principle):
    del prompts, prompt_lengths, first, second, principle
    gap = np.asarray(first_mask).sum(1) - np.asarray(second_mask).sum(1)
    p = 1 / (1 + np.exp(-gap))
    pull = 0.2 * np.minimum(p, 1 - p)
    return p + pull, p - pull


def _raw(lang, n, seed):
  prompts, _, first, fmask, second, smask = pairs_from_world(lang, n, seed=seed)
  return dict(prompts=prompts, prompt_lengths=(prompts > 0).sum(1).astype(np.int32),
              prompt_ids=np.arange(n, dtype=np.int32), first=first,
              first_mask=fmask.astype(np.float32), second=second,
              second_mask=smask.astype(np.float32))


def test_all_human_mixture_is_the_human_feedback_stages_labels(world):
  lang, g = world
  pool = annotators.make_pool(g, seed=2, num=8, temperature=0.5)
  raw = _raw(lang, 64, seed=6)
  key = jax.random.key(11)
  want = preferences.label_pairs(**raw, gold=g, pool=pool, key=key, round_=0)
  got = ai_feedback.label_mixed(raw, gold=g, pool=pool, judge=None, principles=None,
                                human_fraction=1.0, key=key, round_=0)
  for name in preferences.ALL_FIELDS:
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  assert (got.labeller == preferences.HUMAN).all()


def test_mixture_labels_each_pair_by_whom_it_says(world, tmp_path):
  lang, g = world
  pool = annotators.make_pool(g, seed=2, num=8, temperature=0.5)
  raw = _raw(lang, 400, seed=7)
  key = jax.random.key(12)
  ps = constitution.from_block(block(a=('harm', 1.0), b=('brevity', 3.0)))
  got = ai_feedback.label_mixed(raw, gold=g, pool=pool, judge=PlantedJudge(), principles=ps,
                                human_fraction=0.3, key=key, round_=2)
  human = got.labeller == preferences.HUMAN
  assert abs(human.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(human))
  # The judge's pairs: chosen is the longer response (the planted verdict's mean is
  # sigmoid(length gap)), soft label that sigmoid; no annotator, a drawn principle.
  j = got.take(np.nonzero(~human)[0])
  gap = j.chosen_mask.sum(1) - j.rejected_mask.sum(1)
  assert (gap >= 0).all()
  np.testing.assert_allclose(j.soft_label, 1 / (1 + np.exp(-gap)), atol=1e-6)
  assert (j.annotator == -1).all() and (j.raw_annotator == -1).all() and (j.round == 2).all()
  assert set(np.unique(j.principle)) <= {0, 1} and (j.principle == 1).mean() > 0.6
  # The annotators' pairs are label_pairs' labels of exactly those rows with the same key.
  rows = np.nonzero(np.asarray(jax.random.uniform(jax.random.fold_in(key, 0xA1F), (400,)))
                    < 0.3)[0]
  alone = preferences.label_pairs(**{k: v[rows] for k, v in raw.items()}, gold=g, pool=pool,
                                  key=key, round_=2)
  h = got.take(np.nonzero(human)[0])
  for name in ('chosen', 'rejected', 'raw_annotator', 'raw_label', 'soft_label'):
    np.testing.assert_array_equal(getattr(h, name), getattr(alone, name), err_msg=name)
  # The reward model's label figures count the judge's labels apart, graded against gold.
  figures = reward_eval.label_metrics(got)
  assert figures['prefs/judge_labels'] == len(j) and figures['prefs/labels'] == human.sum()
  hits = [0.5 if s == 0.5 else float(c > r)
          for c, r, s in zip(j.gold_chosen, j.gold_rejected, j.soft_label) if c != r]
  assert figures['prefs/judge_gold_agreement'] == pytest.approx(np.mean(hits))
  # Written and read back: who labelled each pair survives, and the set passes the checks.
  preferences.write_shard(str(tmp_path / 'set'), got, lineage={})
  back, _ = preferences.read(str(tmp_path / 'set'))
  np.testing.assert_array_equal(back.labeller, got.labeller)
  np.testing.assert_array_equal(back.principle, got.principle)


def test_a_set_written_before_ai_feedback_reads_as_all_human(world, tmp_path):
  lang, g = world
  pool = annotators.make_pool(g, seed=2, num=8, temperature=0.5)
  pairs = preferences.label_pairs(**_raw(lang, 32, seed=9), gold=g, pool=pool,
                                  key=jax.random.key(0), round_=0)
  path = preferences.write_shard(str(tmp_path / 'old'), pairs, lineage={})
  for name in preferences.FEEDBACK_FIELDS:
    (tmp_path / 'old' / 'shard_00000' / f'{name}.npy').unlink()
  back, _ = preferences.read(str(tmp_path / 'old'))
  assert (back.labeller == preferences.HUMAN).all() and (back.principle == -1).all()
  assert path.endswith('shard_00000')
