"""The GRPO step's rollout against independent computations, on an untrained tiny model:
its rewards are a plain-Python grading of the sampled responses, its KL-in-reward score
and group advantages a float64 NumPy recomputation from its own log-probs, a float32
sampler agrees with the trainer's forward to float rounding, and a bfloat16 sampler's
mismatch is what NumPy computes from the two sets of log-probs."""
import collections
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import tasks
from rlhf_jax.models.transformer import Transformer, ModelConfig
from rlhf_jax.train import grpo_step, grpo_update
from rlhf_jax.world.language import EOS_ID

VOCAB, G, PROMPTS, NEW = 64, 4, 6, 8

pytestmark = pytest.mark.slow  # two samplers compiled (16 s): left out of the quick check


def _task():
  block = ml_collections.ConfigDict(dict(name='sum_mod', partial_credit=0.0, num_operands=3,
                                         modulus=3))
  return tasks.make_task(block, vocab_size=VOCAB)


def _python_grade(task, answer: int, response, mask) -> float:
  """sum_mod's rule by hand: the one value token after the last marker, then EOS."""
  tokens = [int(t) for t, m in zip(response, mask) if m > 0]
  if EOS_ID not in tokens:
    return 0.0
  tokens = tokens[:tokens.index(EOS_ID)]
  marks = [i for i, t in enumerate(tokens) if t == task.marker_id]
  if not marks or len(tokens) - marks[-1] != 2:
    return 0.0
  value = tokens[-1]
  return float(3 <= value < task.sep_id and value == answer)


@pytest.fixture(scope='module')
def models():
  cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, d_ff=64)
  lm = Transformer(cfg)
  dummy = jnp.ones((1, 8), jnp.int32)
  init = lambda seed: lm.init(jax.random.key(seed), dummy, segment_ids=dummy,
                              positions=dummy)['params']
  return lm, init(0), init(1)


def _rollout(models, *, sample_dtype, kl='reward', kl_coef=0.1, reward='verifier'):
  lm, params, ref = models
  task = _task()
  batch = task.make_prompts(key=jax.random.key(3), num=PROMPTS)
  prompts = grpo_step.TaskPrompts(prompts=batch.prompts, prompt_lengths=batch.prompt_lengths,
                                  answers=batch.answers, answer_lengths=batch.answer_lengths)
  config = grpo_step.StepConfig(
      group_size=G, advantage='grpo', dynamic_sampling=False, max_new_tokens=NEW,
      temperature=1.0, sample_dtype=sample_dtype, reward=reward,
      update=grpo_update.GRPOConfig(kl=kl, kl_coef=kl_coef, max_new_tokens=NEW))
  fn = jax.jit(functools.partial(grpo_step.rollout_scores, lm=lm, task=task, config=config))
  rollout, metrics = fn(params, grpo_step.Frozen(ref_params=ref), prompts, jax.random.key(5))
  return task, batch, jax.device_get(rollout), jax.device_get(metrics)


def test_rewards_kl_score_and_advantages_match_numpy(models):
  task, batch, rollout, metrics = _rollout(models, sample_dtype='float32')
  response = np.asarray(rollout.inputs[1])
  mask = np.asarray(rollout.mask, np.float64)
  answers = np.repeat(np.asarray(batch.answers)[:, 0], G)
  correct = np.array([_python_grade(task, a, r, m) for a, r, m in zip(answers, response, mask)])
  assert metrics['rl/pass_rate'] == pytest.approx(correct.mean(), abs=1e-7)
  seq_kl = ((np.asarray(rollout.logp, np.float64) - rollout.ref_logp) * mask).sum(axis=1)
  assert metrics['rl/kl'] == pytest.approx(seq_kl.mean(), rel=1e-5, abs=1e-5)
  score = (correct - 0.1 * seq_kl).reshape(PROMPTS, G)
  expected = (score - score.mean(axis=1, keepdims=True)) / (score.std(axis=1, keepdims=True)
                                                            + 1e-6)
  np.testing.assert_allclose(rollout.advantages, expected.ravel(), rtol=1e-3, atol=1e-4)
  assert np.all(rollout.valid == 1)
  # One forward: the f32 sampler's log-probs are the trainer's.
  assert metrics['mismatch/abs_diff_max'] < 1e-5
  np.testing.assert_allclose(rollout.sample_logp, rollout.logp, atol=1e-5)


def test_bfloat16_sampler_mismatch_is_the_numpy_gap(models):
  _, _, rollout, metrics = _rollout(models, sample_dtype='bfloat16', kl='loss')
  mask = np.asarray(rollout.mask, np.float64)
  d = (np.asarray(rollout.logp, np.float64) - np.asarray(rollout.sample_logp, np.float64))
  on = mask > 0
  assert metrics['mismatch/abs_diff_mean'] == pytest.approx(np.abs(d[on]).mean(), rel=1e-4)
  assert metrics['mismatch/abs_diff_max'] == pytest.approx(np.abs(d[on]).max(), rel=1e-4)
  assert metrics['mismatch/kl_k3'] == pytest.approx((np.expm1(d[on]) - d[on]).mean(),
                                                    rel=1e-3, abs=1e-9)
  # bfloat16 has 8 bits of mantissa: the gap is real, far above float32's.
  assert metrics['mismatch/abs_diff_mean'] > 1e-4


def _python_answer(task, response, mask):
  """The stated answer by hand (tasks/base.py's rule for a one-token answer), or None."""
  tokens = [int(t) for t, m in zip(response, mask) if m > 0]
  if EOS_ID not in tokens:
    return None
  tokens = tokens[:tokens.index(EOS_ID)]
  marks = [i for i, t in enumerate(tokens) if t == task.marker_id]
  if not marks or len(tokens) - marks[-1] != 2 or not 3 <= tokens[-1] < task.sep_id:
    return None
  return tokens[-1]


def test_majority_reward_is_agreement_with_the_groups_vote():
  """reward='majority' (TTRL): 1 for a response stating its group's most frequent answer
  (ties to the answer seen first), 0 otherwise and for no answer. Planted responses (an
  untrained model states no answer): value tokens, the marker and EOS drawn often."""
  task = _task()
  rng = np.random.default_rng(4)
  groups, g, width = 200, 5, 6
  alphabet = np.array([3, 4, 5, task.marker_id, EOS_ID])
  response = alphabet[rng.integers(0, len(alphabet), size=(groups * g, width))]
  tail = rng.integers(3, 6, size=groups * g)
  planted = rng.random(groups * g) < 0.6  # ... MARKER v EOS: a stated answer
  response[planted, :-3] = alphabet[rng.integers(0, 4, size=(planted.sum(), width - 3))]
  response[planted, -3:] = np.stack([np.full(planted.sum(), task.marker_id), tail[planted],
                                     np.full(planted.sum(), EOS_ID)], axis=1)
  mask = np.ones(response.shape, np.float32)
  got = np.asarray(jax.jit(functools.partial(grpo_step.majority_score, task, group_size=g))(
      response, mask))
  stated = [_python_answer(task, r, m) for r, m in zip(response, mask)]
  assert sum(a is not None for a in stated) > groups * g // 2
  want, ties = [], 0
  for lo in range(0, len(stated), g):
    group = stated[lo:lo + g]
    votes = collections.Counter(a for a in group if a is not None)
    # most_common keeps insertion order among equal counts: the answer seen first wins.
    winner, top = votes.most_common(1)[0] if votes else (None, 0)
    ties += sum(c == top for c in votes.values()) > 1
    want += [float(a is not None and a == winner) for a in group]
  assert ties > 10  # the tie rule is exercised
  np.testing.assert_array_equal(got, want)
