"""Gold reward, simulated annotators and preference losses against plain-NumPy float64
references: the reward's formula, annotators' choice rates against the Bradley-Terry
probabilities they claim, a planted noisy annotator found from labels alone, and the
Bradley-Terry / DPO / IPO losses and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.world import annotators, language, reward


@pytest.fixture(scope='module')
def world():
  lang = language.make_language(seed=0, vocab_size=64, branching=8, zipf_a=1.1, eos_prob=0.05)
  return lang, reward.make_gold_reward(lang, seed=1, topic=0.7, length=0.01, harm=2.0)


def pairs_from_world(lang, rows, seed):
  """Prompts [BOS x1 x2] and two true continuations each, padded; masks of real tokens."""
  seqs = np.asarray(language.sample(lang, key=jax.random.key(seed), batch_size=3 * rows,
                                    seq_len=24))
  prompts = seqs[:rows, :3]
  first, second = seqs[rows:2 * rows, 1:], seqs[2 * rows:, 1:]
  return prompts, prompts > 0, first, first > 0, second, second > 0


def reference_reward(g, prompt, pmask, resp, rmask, helpfulness=None, length_bias=0.0):
  w = np.asarray(g.helpfulness if helpfulness is None else helpfulness, np.float64)
  topics = np.asarray(g.topics, np.float64)
  harmful = np.asarray(g.harmful)
  y = resp[rmask]
  e = lambda toks: topics[toks].sum(0) / max(np.linalg.norm(topics[toks].sum(0)), 1e-9)
  return (w[y].mean() + g.topic * e(prompt[pmask]) @ e(y)
          + (g.length + length_bias) * len(y) - g.harm * float(harmful[y].any()))


def test_gold_reward_matches_reference(world):
  lang, g = world
  p, pm, y, ym, _, _ = pairs_from_world(lang, 64, seed=2)
  got = np.asarray(reward.gold_reward(g, prompts=p, prompt_mask=pm, responses=y,
                                      response_mask=ym))
  want = [reference_reward(g, p[i], pm[i], y[i], ym[i]) for i in range(64)]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The harm term bites now and then: some true responses contain a forbidden token.
  harmful = np.asarray(g.harmful)[y] & ym
  assert 0 < harmful.any(axis=1).mean() < 0.9
  assert np.asarray(g.harmful).sum() == 3


def test_choice_rates_match_bradley_terry(world):
  lang, g = world
  pool = annotators.make_pool(g, seed=3, num=4, minority_fraction=0.25, length_bias=0.05,
                              temperature=0.4, temperature_spread=0.2)
  p, pm, y1, m1, y2, m2 = pairs_from_world(lang, 8, seed=4)
  reps = 4000
  tile = lambda x: np.tile(x, (reps, 1))
  who = np.tile(np.arange(8) % 4, reps)
  pair = dict(annotator=jnp.asarray(who), prompts=tile(p), prompt_mask=tile(pm),
              first=tile(y1), first_mask=tile(m1), second=tile(y2), second_mask=tile(m2))
  labels = np.asarray(annotators.label(pool, g, key=jax.random.key(5), **pair)).reshape(reps, 8)
  prob = np.asarray(annotators.preference_prob(pool, g, **pair))[:8]
  # The claimed probabilities, from the annotator's utility in float64.
  for i in range(8):
    a = i % 4
    kw = dict(helpfulness=np.asarray(pool.group_helpfulness)[int(pool.group[a])],
              length_bias=float(pool.length_bias[a]))
    diff = (reference_reward(g, p[i], pm[i], y1[i], m1[i], **kw) -
            reference_reward(g, p[i], pm[i], y2[i], m2[i], **kw))
    assert abs(prob[i] - 1 / (1 + np.exp(-diff / float(pool.temperature[a])))) < 1e-5
    rate = labels[:, i].mean()
    assert abs(rate - prob[i]) <= 4 * np.sqrt(prob[i] * (1 - prob[i]) / reps) + 1e-9


def test_consistency_weighting_finds_the_planted_noisy_annotator():
  """Six annotators label overlapping pairs; five are right 85% of the time, annotator 4
  only 55%. Agreement alone ranks it last, near its true accuracy, and the weighted
  consensus beats the majority vote against the hidden truth."""
  rng = np.random.default_rng(0)
  pairs, num = 3000, 6
  truth = rng.integers(0, 2, pairs)
  accuracy = np.array([0.85, 0.85, 0.85, 0.85, 0.55, 0.85])
  observed = (rng.random((pairs, num)) < 0.6).astype(float)
  observed[observed.sum(axis=1) == 0, 0] = 1.0
  correct = rng.random((pairs, num)) < accuracy
  labels = np.where(correct, truth[:, None], 1 - truth[:, None])
  est, consensus = annotators.consistency_weights(labels, observed)
  assert np.argmin(est) == 4
  np.testing.assert_allclose(est, accuracy, atol=0.04)
  vote = annotators.majority_vote(labels, observed)
  weighted_acc = ((consensus > 0.5) == truth).mean()
  vote_acc = np.where(vote == 0.5, 0.5, (vote > 0.5) == truth).mean()  # a tie is a coin
  assert weighted_acc > vote_acc + 0.01, (weighted_acc, vote_acc)


def test_bradley_terry_and_its_gradient_match_numpy():
  """(The DPO family's losses are in test_preference_losses.py.)"""
  rng = np.random.default_rng(1)
  pc, pr = (rng.normal(size=16) * 3 for _ in range(2))
  sig = lambda x: 1 / (1 + np.exp(-x))
  np.testing.assert_allclose(losses.bradley_terry(pc, pr), -np.log(sig(pc - pr)), rtol=1e-5)
  g = jax.grad(lambda a: losses.bradley_terry(a, pr).sum())(pc)
  np.testing.assert_allclose(g, -sig(-(pc - pr)), rtol=1e-4)
