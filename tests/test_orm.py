"""The outcome reward model (a learned verifier) against independent computations: its BCE
loss and gradient against float64 NumPy, its held-out rates and best-of-k against plain-
Python counts, its data's labels against a plain-Python grading, GRPO's ORM score against
a NumPy recomputation through the RM's apply, and bad configs as one error line."""
import functools
import json
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_config
from rlhf_jax import tasks
from rlhf_jax.analysis import orm_metrics
from rlhf_jax.errors import UserError
from rlhf_jax.models import reward_model
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.stages import dispatch, outcome_data
from rlhf_jax.train import grpo_step, grpo_update, reward_step
from test_cli_errors import assert_one_error_line
from test_grpo_step import _python_grade

VOCAB, G, PROMPTS, NEW = 64, 4, 6, 8


def _task():
  block = ml_collections.ConfigDict(dict(name='sum_mod', partial_credit=0.0, num_operands=3,
                                         modulus=3))
  return tasks.make_task(block, vocab_size=VOCAB)


def test_outcome_bce_loss_and_gradient_match_numpy():
  rng = np.random.default_rng(0)
  scores = rng.normal(scale=3.0, size=(2, 7)).astype(np.float32)
  label = np.array([1, 0, 1, 1, 0, 0.3, 1], np.float32)  # a soft label too
  weight = np.array([[1, 1, 0, 2, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0]], np.float32)
  loss, grad = jax.value_and_grad(
      lambda s: reward_step.outcome_loss(s, label, weight).sum())(jnp.asarray(scores))
  s, y, w = scores.astype(np.float64), label.astype(np.float64), weight.astype(np.float64)
  per = y * np.log1p(np.exp(-s)) + (1 - y) * np.log1p(np.exp(s))
  expected = ((per * w).sum(axis=1) / w.sum(axis=1)).sum()
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  sigmoid = 1 / (1 + np.exp(-s))
  np.testing.assert_allclose(grad, (sigmoid - y) * w / w.sum(axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-7)


def test_rates_auc_and_best_of_k_match_a_python_count():
  prob = [0.9, 0.2, 0.6, 0.6, 0.4, 0.8, 0.1, 0.5]
  label = [1, 0, 0, 1, 1, 0, 0, 1]
  out = orm_metrics.classification(prob, label)
  said = [p > 0.5 for p in prob]
  wrong = [i for i, y in enumerate(label) if y == 0]
  right = [i for i, y in enumerate(label) if y == 1]
  assert out['orm/false_positive_rate'] == sum(said[i] for i in wrong) / len(wrong)  # 2/4
  assert out['orm/false_negative_rate'] == sum(not said[i] for i in right) / len(right)  # 2/4
  assert out['orm/accuracy'] == sum(s == (y == 1) for s, y in zip(said, label)) / 8
  assert out['orm/base_rate'] == 0.5
  # Accepting the 4 highest (0.9, 0.8 and the tied 0.6s: ties at the cut go in): of the
  # wrong ones (0.2, 0.6, 0.8, 0.1) the 0.6 and 0.8 are accepted.
  cut = sorted(prob, reverse=True)[3]
  accepted = [p >= cut for p in prob]
  assert out['orm/false_positive_rate_at_base_rate'] == sum(accepted[i] for i in wrong) / 4
  assert out['orm/false_positive_rate_at_base_rate'] == 0.5
  pairs = [(prob[i] > prob[j]) + 0.5 * (prob[i] == prob[j]) for i in right for j in wrong]
  assert out['orm/auc'] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
  expected_loss = -sum(math.log(p) if y else math.log(1 - p) for p, y in zip(prob, label)) / 8
  assert out['orm/loss'] == pytest.approx(expected_loss, rel=1e-12)
  scores = [[0.3, 0.7, 0.7, 0.1], [0.5, 0.5, 0.5, 0.9], [0.2, 0.1, 0.4, 0.4]]
  correct = [[0, 0, 1, 1], [1, 0, 0, 0], [1, 1, 0, 1]]
  for k in (1, 2, 3, 4):
    picked = []
    for s, c in zip(scores, correct):
      best = 0
      for j in range(1, k):
        if s[j] > s[best]:  # strictly greater: ties go to the first
          best = j
      picked.append(c[best])
    np.testing.assert_array_equal(orm_metrics.best_of_k(scores, correct, k), picked)


class _StubSampler:
  """sample_in_chunks stand-in: row i answers its problem with a solved trace, a trace with
  its answer changed, or random tokens (i mod 3), so that labels of both kinds occur."""

  def __init__(self, task, problems):
    self.task = task
    self.solved = {row.tobytes(): i for i, row in enumerate(np.asarray(problems.prompts))}
    self.traces, self.masks = task.solutions(problems, key=jax.random.key(1),
                                             response_len=NEW)

  def sample_in_chunks(self, params, prompts, lengths, key):
    del params, lengths, key
    rng = np.random.default_rng(2)
    response, mask = [], []
    for i, row in enumerate(np.asarray(prompts)):
      trace = self.traces[self.solved[row.tobytes()]].copy()
      m = self.masks[self.solved[row.tobytes()]].copy()
      if i % 3 == 1:
        end = int(m.sum()) - 1  # EOS; the answer token before it
        trace[end - 1] = 3 + (int(trace[end - 1]) - 3 + 1) % 3
      elif i % 3 == 2:
        trace = rng.integers(1, VOCAB, NEW).astype(np.int32)
        m = np.ones(NEW, np.float32)
      response.append(trace)
      mask.append(m)
    return types.SimpleNamespace(response=np.stack(response), mask=np.stack(mask))


def test_outcome_labels_equal_a_python_grading_of_the_responses():
  task = _task()
  problems = task.make_prompts(key=jax.random.key(3), num=5)
  data = outcome_data.sample_and_label(_StubSampler(task, problems), None, problems,
                                       samples=3, key=jax.random.key(4),
                                       verify=jax.jit(task.verify))
  answers = np.repeat(np.asarray(problems.answers)[:, 0], 3)
  np.testing.assert_array_equal(data.prompts, np.repeat(problems.prompts, 3, axis=0))
  expected = [_python_grade(task, a, r, m) for a, r, m in zip(answers, data.response,
                                                              data.mask)]
  np.testing.assert_array_equal(data.label, expected)
  assert 0 < np.mean(expected) < 1


@pytest.mark.slow  # a sampler compiled (about 15 s)
def test_grpo_orm_score_is_the_orms_sigmoid_and_pass_rate_the_verifiers():
  cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, d_ff=64)
  lm = Transformer(cfg)
  dummy = jnp.ones((1, 8), jnp.int32)
  init = lambda seed: lm.init(jax.random.key(seed), dummy, segment_ids=dummy,
                              positions=dummy)['params']
  params, ref = init(0), init(1)
  rm = reward_model.ensemble(cfg, 2, 'mean')
  rm_params = nn.meta.unbox(reward_model.init_params(rm)(jax.random.key(2)))
  rm_params['head'] = jax.tree.map(lambda x: x * 8.0, rm_params['head'])  # spread sigmoids
  task = _task()
  batch = task.make_prompts(key=jax.random.key(3), num=PROMPTS)
  prompts = grpo_step.TaskPrompts(prompts=batch.prompts, prompt_lengths=batch.prompt_lengths,
                                  answers=batch.answers, answer_lengths=batch.answer_lengths)
  config = grpo_step.StepConfig(
      group_size=G, advantage='grpo', dynamic_sampling=False, max_new_tokens=NEW,
      temperature=1.0, sample_dtype='float32', reward='orm',
      update=grpo_update.GRPOConfig(kl='reward', kl_coef=0.1, max_new_tokens=NEW))
  fn = jax.jit(functools.partial(grpo_step.rollout_scores, lm=lm, task=task, config=config,
                                 rm_model=rm))
  rollout, metrics = jax.device_get(fn(params, grpo_step.Frozen(ref_params=ref,
                                                                rm_params=rm_params),
                                       prompts, jax.random.key(5)))
  response, mask = np.asarray(rollout.inputs[1]), np.asarray(rollout.mask, np.float32)
  rep = lambda x: np.repeat(np.asarray(x), G, axis=0)
  logits = rm.apply({'params': rm_params}, *reward_step.response_sequences(
      rep(batch.prompts), rep(batch.prompt_lengths), response, mask))
  prob = (1 / (1 + np.exp(-np.asarray(logits, np.float64)))).mean(axis=0)
  assert prob.std() > 0.01  # the check below would be weak on a constant score
  assert metrics['rl/orm_score'] == pytest.approx(prob.mean(), abs=1e-6)
  answers = rep(batch.answers)[:, 0]
  correct = [_python_grade(task, a, r, m) for a, r, m in zip(answers, response, mask)]
  assert metrics['rl/pass_rate'] == pytest.approx(np.mean(correct), abs=1e-7)
  seq_kl = ((np.asarray(rollout.logp, np.float64) - rollout.ref_logp) * mask).sum(axis=1)
  score = (prob - 0.1 * seq_kl).reshape(PROMPTS, G)
  assert metrics['rl/score'] == pytest.approx(score.mean(), abs=1e-5)
  expected = (score - score.mean(axis=1, keepdims=True)) / (score.std(axis=1, keepdims=True)
                                                            + 1e-6)
  np.testing.assert_allclose(rollout.advantages, expected.ravel(), rtol=1e-3, atol=1e-4)


def _refused(config, workdir, *mentions):
  with pytest.raises(UserError) as e:
    dispatch.run(config, str(workdir))
  message = str(e.value)
  assert '\n' not in message and all(m in message for m in mentions), message
  assert not workdir.exists()


def test_bad_orm_configs_are_one_error_line(run_cli, tmp_path):
  result = run_cli('--config=configs/reward_model.py:tiny', f'--workdir={tmp_path / "a"}',
                   '--config.rm.objective=outcome')
  assert_one_error_line(result, mentions=("rm.objective='outcome' needs a task block",))
  config = load_config('reward_model', 'tiny')
  config.rm.objective = 'listwise'
  _refused(config, tmp_path / 'b', "rm.objective='listwise'")
  config = load_config('grpo', 'tiny_orm')
  config.grpo.rm_run = ''
  _refused(config, tmp_path / 'c', "grpo.reward='orm' needs grpo.rm_run")
  pairs = tmp_path / 'pairs_rm'  # a Bradley-Terry run's config.json (written before the
  pairs.mkdir()                  # objective field existed: it has none)
  recorded = load_config('reward_model', 'tiny').to_dict()
  del recorded['rm']['objective']
  (pairs / 'config.json').write_text(json.dumps(recorded))
  config = load_config('grpo', 'tiny_orm')
  config.grpo.rm_run = str(pairs)
  _refused(config, tmp_path / 'd', 'is a Bradley-Terry reward model')
