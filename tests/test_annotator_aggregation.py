"""Several labels per preference pair and their aggregate, against NumPy recomputations:
k distinct annotators per pair, each label drawn with the Bradley-Terry probability of that
annotator's utility (planted adversarial annotators included); the majority and consistency
aggregates of the stored raw labels; the soft-label Bradley-Terry loss (y = 1 is the old
loss, bit for bit) and the reward step on it; the aggregate's gold agreement; old sets
without raw labels; and one short reward-model run on three labels per pair."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import losses
from rlhf_jax.data import preferences
from rlhf_jax.data.batch import PairBatch
from rlhf_jax.data.row_source import split_by_prompt
from rlhf_jax.errors import UserError
from rlhf_jax.models import reward_model
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.stages import preference_data, reward_eval
from rlhf_jax.train import reward_step
from rlhf_jax.train.state import TrainState
from rlhf_jax.world import annotators, language
from rlhf_jax.world import reward as reward_lib

from conftest import load_config
from test_world_reward import pairs_from_world, reference_reward

K, NUM, ROWS = 3, 6, 600


@pytest.fixture(scope='module')
def labelled():
  """ROWS pairs of true continuations, K labels each from a pool of NUM annotators, a
  third of them adversarial; the raw draws' inputs kept for the references."""
  lang = language.make_language(seed=0, vocab_size=64, branching=8, zipf_a=1.1, eos_prob=0.05)
  gold = reward_lib.make_gold_reward(lang, seed=1, topic=0.7, length=0.01, harm=2.0)
  pool = annotators.make_pool(gold, seed=3, num=NUM, minority_fraction=1 / 6, length_bias=0.02,
                              temperature=0.2, temperature_spread=0.1,
                              unreliable_fraction=1 / 3, unreliable_temperature=0.3,
                              unreliable_flip=True)
  p, pm, y1, m1, y2, m2 = pairs_from_world(lang, ROWS, seed=4)
  raw = dict(prompts=p, prompt_lengths=pm.sum(1), prompt_ids=np.arange(ROWS) // 3,
             first=y1, first_mask=m1.astype(np.float32), second=y2,
             second_mask=m2.astype(np.float32))
  by = {m: preferences.label_pairs(**raw, gold=gold, pool=pool, key=jax.random.key(5),
                                   round_=0, labels_per_pair=K, method=m)
        for m in ('majority', 'consistency')}
  return gold, pool, raw, by


def first_relative(pairs, raw):
  """(labels, probs) [N, K] relative to each kept row's `first` response, and whether
  chosen is `first`."""
  keep = ~((raw['first'] * raw['first_mask']) == (raw['second'] * raw['second_mask'])).all(1)
  first = raw['first'][keep]
  is_first = (pairs.chosen == first).all(axis=1)
  labels = np.where(is_first[:, None], pairs.raw_label, 1 - pairs.raw_label)
  probs = np.where(is_first[:, None], pairs.raw_prob, 1 - pairs.raw_prob).astype(np.float64)
  return labels, probs, is_first


def test_k_distinct_annotators_label_by_their_bradley_terry_probability(labelled):
  gold, pool, raw, by = labelled
  pairs = by['majority']
  who = pairs.raw_annotator
  assert who.shape == (len(pairs), K) and ROWS - 10 < len(pairs) <= ROWS
  assert all(len(set(row)) == K for row in who.tolist()) and who.min() >= 0 and who.max() < NUM
  # Each annotator labels a share K / NUM of the pairs (uniform draws without replacement).
  counts = np.bincount(who.ravel(), minlength=NUM)
  share = K / NUM
  assert (np.abs(counts - ROWS * share) <= 4 * np.sqrt(ROWS * share * (1 - share))).all()
  # Each stored probability is the annotator's Bradley-Terry probability of preferring
  # chosen, recomputed in float64 from the gold reward's formula and the pool.
  sign = np.asarray(pool.sign)
  assert (sign == -1).sum() == 2  # round(6 / 3) planted adversaries
  for i in range(0, len(pairs), 7):
    for j in range(K):
      a = int(who[i, j])
      kw = dict(helpfulness=np.asarray(pool.group_helpfulness)[int(pool.group[a])],
                length_bias=float(pool.length_bias[a]))
      row = (pairs.prompts[i], pairs.prompts[i] > 0)
      diff = (reference_reward(gold, *row, pairs.chosen[i], pairs.chosen_mask[i] > 0, **kw) -
              reference_reward(gold, *row, pairs.rejected[i], pairs.rejected_mask[i] > 0, **kw))
      expected = 1 / (1 + np.exp(-sign[a] * diff / float(pool.temperature[a])))
      assert abs(pairs.raw_prob[i, j] - expected) < 2e-5, (i, j)
  # The labels are drawn with those probabilities: relative to the response shown first
  # (before the aggregate oriented the pair), each label is a Bernoulli(prob) draw.
  labels, probs, _ = first_relative(pairs, raw)
  for adversarial in (False, True):
    sel = (sign[who] == -1) == adversarial
    var = (probs[sel] * (1 - probs[sel])).sum()
    assert abs(labels[sel].sum() - probs[sel].sum()) <= 4 * np.sqrt(var)
  # annotator/group/annotator_prob: the first labeller's, and the labellers' mean.
  np.testing.assert_array_equal(pairs.annotator, who[:, 0])
  np.testing.assert_array_equal(pairs.group, np.asarray(pool.group)[who[:, 0]])
  np.testing.assert_allclose(pairs.annotator_prob, pairs.raw_prob.mean(axis=1), atol=1e-6)


def test_majority_aggregate_is_the_vote_of_the_stored_labels(labelled):
  _, _, raw, by = labelled
  pairs = by['majority']
  labels, _, is_first = first_relative(pairs, raw)
  votes = labels.sum(axis=1)
  np.testing.assert_array_equal(is_first, 2 * votes > K)  # K odd: no ties
  np.testing.assert_allclose(pairs.soft_label, np.maximum(votes, K - votes) / K, rtol=1e-6)
  # Recomputed from the first two labels only: a split vote is a tie, soft label 1/2,
  # and keeps the orientation; agreeing votes turn the pair their way.
  two = preferences.aggregate(pairs, method='majority', labels_per_pair=2)
  votes2 = pairs.raw_label[:, :2].sum(axis=1)
  turned = votes2 == 0
  np.testing.assert_array_equal(two.chosen, np.where(turned[:, None], pairs.rejected,
                                                     pairs.chosen))
  np.testing.assert_array_equal(two.gold_chosen, np.where(turned, pairs.gold_rejected,
                                                          pairs.gold_chosen))
  np.testing.assert_array_equal(two.soft_label, np.where(votes2 == 1, 0.5, 1.0))
  np.testing.assert_array_equal(two.raw_label, np.where(turned[:, None],
                                                        1 - pairs.raw_label[:, :2],
                                                        pairs.raw_label[:, :2]))


def test_consistency_aggregate_is_consistency_weights_of_the_stored_labels(labelled):
  _, pool, raw, by = labelled
  pairs = by['consistency']
  labels, _, is_first = first_relative(pairs, raw)
  matrix, observed = np.zeros((len(pairs), NUM)), np.zeros((len(pairs), NUM))
  for i in range(len(pairs)):
    for j in range(K):
      matrix[i, pairs.raw_annotator[i, j]] = labels[i, j]
      observed[i, pairs.raw_annotator[i, j]] = 1
  accuracy, consensus = annotators.consistency_weights(matrix, observed)
  np.testing.assert_array_equal(is_first, consensus >= 0.5)
  np.testing.assert_allclose(pairs.soft_label, np.maximum(consensus, 1 - consensus), rtol=1e-6)
  # The planted adversaries are found (accuracy below 1/2), and so the weighted consensus
  # agrees with gold more often than the majority vote.
  adversarial = np.asarray(pool.sign) == -1
  assert accuracy[adversarial].max() < 0.5 < accuracy[~adversarial].min()
  agreement = lambda p: reward_eval.label_metrics(p)['prefs/aggregate_gold_agreement']
  assert agreement(pairs) > agreement(by['majority']) + 0.05
  # Aggregating an aggregated set again changes nothing.
  again = preferences.aggregate(pairs, method='consistency')
  np.testing.assert_array_equal(again.chosen, pairs.chosen)
  np.testing.assert_allclose(again.soft_label, pairs.soft_label, rtol=1e-6)


def test_soft_bradley_terry_matches_float64_and_y1_is_the_old_loss():
  rng = np.random.default_rng(0)
  c, r = (rng.normal(size=64) * 4 for _ in range(2))
  y = rng.uniform(size=64)
  d = c - r
  ref = y * np.logaddexp(0, -d) + (1 - y) * np.logaddexp(0, d)
  got = losses.bradley_terry(jnp.asarray(c, jnp.float32), jnp.asarray(r, jnp.float32),
                             jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  cf, rf, ones = (jnp.asarray(x, jnp.float32) for x in (c, r, np.ones(64)))
  np.testing.assert_array_equal(losses.bradley_terry(cf, rf, ones), losses.bradley_terry(cf, rf))
  g1 = jax.grad(lambda a: losses.bradley_terry(a, rf, ones).sum())(cf)
  g0 = jax.grad(lambda a: losses.bradley_terry(a, rf).sum())(cf)
  np.testing.assert_array_equal(g1, g0)
  # d/dd of the soft loss is sigmoid(d) - y.
  g = jax.grad(lambda a: losses.bradley_terry(a, rf, jnp.asarray(y, jnp.float32)).sum())(cf)
  np.testing.assert_allclose(g, 1 / (1 + np.exp(-d)) - y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_reward_step_trains_on_the_soft_label():
  """train/loss of the step is the weighted mean soft-label loss of the model's rewards
  (NumPy, float64); all-ones labels give exactly the loss of a batch without labels."""
  cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, d_ff=64)
  rng = np.random.default_rng(2)
  b, p, rlen = 6, 4, 5
  prompts = np.zeros((b, p), np.int32)
  prompts[:, -2:] = [1, 7]
  masks = (np.arange(rlen)[None, None] < rng.integers(1, rlen + 1, (2, b))[..., None])
  toks = (rng.integers(3, 32, (2, b, rlen)) * masks).astype(np.int32)
  weight = np.array([1, 1, 1, 1, 1, 0], np.float32)
  label = np.array([1.0, 0.5, 0.8, 2 / 3, 0.6, 0.9], np.float32)
  batch = lambda y: PairBatch(prompts=prompts, prompt_lengths=np.full(b, 2, np.int32),
                              chosen=toks[0], rejected=toks[1],
                              chosen_mask=masks[0].astype(np.float32),
                              rejected_mask=masks[1].astype(np.float32), weight=weight,
                              ref_chosen=np.zeros(b, np.float32),
                              ref_rejected=np.zeros(b, np.float32), label=y)
  model = reward_model.ensemble(cfg, 1)
  # Init, step and forward jitted, as the stage runs them (op by op they took a minute).
  # The init from an RBG key: compiling threefry's draws took seconds.
  params = nn.meta.unbox(jax.jit(reward_model.init_params(model))(
      jax.random.key(1, impl='rbg')))
  tx = optax.sgd(0.0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  @jax.jit  # the rewards' forward in the step's program: one compile fewer (seconds each)
  def jitted(state, batch):
    metrics = reward_step.train_step(state, batch, model=model, tx=tx,
                                     schedule=lambda s: 0.0, bootstrap=False)[1]
    return metrics, reward_step.pair_rewards(state.params, batch, model=model)

  step = lambda y: jitted(state, batch(y))[0]
  c, r = (np.asarray(x, np.float64)[0] for x in jitted(state, batch(label))[1])
  d = c - r
  ref = (label * np.logaddexp(0, -d) + (1 - label) * np.logaddexp(0, d))
  expected = (ref * weight).sum() / weight.sum()
  assert float(step(label)['train/loss']) == pytest.approx(expected, rel=1e-5)
  assert float(step(np.ones(b, np.float32))['train/loss']) == float(step(None)['train/loss'])


def test_aggregate_gold_agreement_is_a_count():
  rng = np.random.default_rng(3)
  n = 200
  gold_c, gold_r = rng.integers(0, 3, n).astype(np.float32), rng.integers(0, 3, n).astype(
      np.float32)
  soft = rng.choice([0.5, 2 / 3, 1.0], n).astype(np.float32)
  who = np.stack([rng.permutation(5)[:3] for _ in range(n)]).astype(np.int32)
  who[:50, 1:] = -1  # pairs of a one-label shard joined with a three-label one
  pairs = _blank(n)
  pairs = preferences.PreferencePairs(**{**{f: getattr(pairs, f) for f in preferences.FIELDS},
                                         'gold_chosen': gold_c, 'gold_rejected': gold_r,
                                         'raw_annotator': who,
                                         'raw_label': np.ones((n, 3), np.int32),
                                         'raw_prob': np.ones((n, 3), np.float32),
                                         'soft_label': soft})
  out = reward_eval.label_metrics(pairs)
  hits, count = 0.0, 0
  for i in range(n):
    if gold_c[i] == gold_r[i]:
      continue
    count += 1
    hits += 0.5 if soft[i] == 0.5 else float(gold_c[i] > gold_r[i])
  assert out['prefs/aggregate_gold_agreement'] == pytest.approx(hits / count, abs=1e-12)
  assert out['prefs/labels'] == 50 + 150 * 3
  assert out['prefs/labels_per_pair'] == pytest.approx((50 + 450) / 200)
  assert out['prefs/labelling_annotators'] == len(set(who[who >= 0].tolist()))


def _blank(n, width=4):
  """n pairs of distinct one-token responses, one label each (the old fields only)."""
  two_d = ('prompts', 'chosen', 'rejected', 'chosen_mask', 'rejected_mask')
  floats = ('chosen_mask', 'rejected_mask', 'gold_chosen', 'gold_rejected', 'annotator_prob')
  pairs = preferences.PreferencePairs(**{
      f: np.zeros((n, width) if f in two_d else (n,), np.float32 if f in floats else np.int32)
      for f in preferences.FIELDS})
  pairs.prompts[:, -1] = 1
  pairs.prompt_lengths[:] = 1
  pairs.chosen[:, 0] = 5 + np.arange(n) % 20
  pairs.rejected[:, 0] = 30 + np.arange(n) % 20
  pairs.chosen_mask[:, 0] = pairs.rejected_mask[:, 0] = 1
  pairs.prompt_id[:] = np.arange(n)
  pairs.annotator[:] = np.arange(n) % 3
  pairs.annotator_prob[:] = 0.75
  return pairs


def test_old_sets_read_as_one_hard_label(labelled, tmp_path):
  """A shard without the raw-label files (written before they existed) reads as one hard
  label per pair by its annotator; joined with a three-label shard, its rows pad with -1
  and the majority of the joined set leaves them as they were."""
  old_dir, new_dir = str(tmp_path / 'old'), str(tmp_path / 'new')
  preferences.write_shard(old_dir, _blank(8), lineage={'round': 0})
  for name in preferences.LABEL_FIELDS:
    os.remove(os.path.join(old_dir, 'shard_00000', f'{name}.npy'))
  old, _ = preferences.read(old_dir)
  np.testing.assert_array_equal(old.raw_annotator, (np.arange(8) % 3)[:, None])
  np.testing.assert_array_equal(old.raw_label, np.ones((8, 1)))
  np.testing.assert_array_equal(old.raw_prob, np.full((8, 1), 0.75, np.float32))
  np.testing.assert_array_equal(old.soft_label, np.ones(8))
  batch = preference_data.pair_rows(old, np.arange(8), np.ones(8, bool))
  np.testing.assert_array_equal(batch.label, np.ones(8))
  new = by_majority = labelled[3]['majority']
  preferences.write_shard(new_dir, new.take(np.arange(5)), lineage={'round': 1})
  joined, _ = preferences.read(f'{old_dir},{new_dir}')
  assert joined.raw_annotator.shape == (13, K)
  np.testing.assert_array_equal(joined.raw_annotator[:8, 1:], -1)
  np.testing.assert_array_equal(joined.raw_annotator[8:], by_majority.raw_annotator[:5])
  again = preferences.aggregate(joined, method='majority')
  np.testing.assert_array_equal(again.chosen, joined.chosen)
  np.testing.assert_allclose(again.soft_label, joined.soft_label, rtol=1e-6)


def test_config_checks_labels_per_pair_and_aggregate():
  config = load_config('reward_model', 'tiny')
  config.init.run = 'x'
  for changes, match in (({'labels_per_pair': 3}, "aggregate='single' keeps one label"),
                         ({'labels_per_pair': 17, 'aggregate': 'majority'}, 'annotators.num=16'),
                         ({'aggregate': 'mean'}, 'is not one of')):
    bad = config.copy_and_resolve_references()
    bad.prefs.update(changes)
    with pytest.raises(UserError, match=match):
      config_lib.validate(bad)
  bad = config.copy_and_resolve_references()
  bad.annotators.unreliable_fraction = 1.5
  with pytest.raises(UserError, match='unreliable_fraction'):
    config_lib.validate(bad)


def test_reward_model_run_on_three_consistency_weighted_labels(chain, run_cli, tmp_path):
  """A short reward-model run with three labels per pair from a pool with planted
  adversaries: its set holds the consistency weights of its raw labels, the lineage says
  how it was labelled, and the static metrics count the aggregate's gold agreement."""
  workdir = tmp_path / 'rm'
  result = run_cli('--config=configs/reward_model.py:tiny', f'--workdir={workdir}',
                   f'--config.init.run={chain["sft"]}', '--config.train.progress=False',
                   '--config.train.steps=4', '--config.train.eval_every=4',
                   '--config.prefs.num_prompts=48', '--config.prefs.labels_per_pair=3',
                   "--config.prefs.aggregate=consistency",
                   '--config.annotators.unreliable_fraction=0.25',
                   '--config.annotators.unreliable_flip=True')
  assert result.returncode == 0, result.stderr[-3000:]
  pairs, lineages = preferences.read(str(workdir / 'preferences'))
  assert lineages[0]['labels_per_pair'] == 3 and lineages[0]['aggregate'] == 'consistency'
  assert lineages[0]['labels'] == 3 * len(pairs)
  assert lineages[0]['labelling_annotators'] == len(np.unique(pairs.raw_annotator))
  matrix, observed = np.zeros((len(pairs), 16)), np.zeros((len(pairs), 16))
  rows = np.repeat(np.arange(len(pairs)), 3)
  matrix[rows, pairs.raw_annotator.ravel()] = pairs.raw_label.ravel()
  observed[rows, pairs.raw_annotator.ravel()] = 1
  _, consensus = annotators.consistency_weights(matrix, observed)
  assert (consensus >= 0.5).all()  # stored oriented by it
  np.testing.assert_allclose(pairs.soft_label, consensus, rtol=1e-6)
  first = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[0])
  config = json.loads((workdir / 'config.json').read_text())
  train, _ = split_by_prompt(np.asarray(pairs.prompt_id),
                             eval_fraction=config['prefs']['eval_fraction'], seed=config['seed'])
  gap = pairs.gold_chosen[train].astype(np.float64) - pairs.gold_rejected[train]
  hit = np.where(pairs.soft_label[train] == 0.5, 0.5, gap > 0)[gap != 0]
  assert first['prefs/aggregate_gold_agreement'] == pytest.approx(hit.mean(), abs=1e-12)
  assert first['prefs/labels_per_pair'] == 3
