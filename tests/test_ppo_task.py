"""PPO against a verifier (ppo.reward='task'):

- inside the jitted PPO step on an untrained tiny model, each rollout's score is a
  plain-Python grading of its own response against its own problem's answer, plus the
  no-EOS penalty where the response has no EOS; rl/pass_rate is their mean;
- a config with ppo.reward='task' but no task block ends with one error line.

An untrained model almost never states a right answer, so the sampler is wrapped to
overwrite some rows (which rows, fixed here) with the task's solved traces and some with
solved traces whose answer is off by one: the grading then has right, wrong and
unanswered rows to get right, each against its own row's problem.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rlhf_jax import sampling, tasks
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.train import ppo_step, ppo_update
from rlhf_jax.world import language
from rlhf_jax.world import reward as reward_lib
from rlhf_jax.world.language import EOS_ID

from test_grpo_step import _python_grade
from test_ppo import LM, tiny_learner

ROWS, NEW, PENALTY = 12, 8, -0.5
SOLVED, OFF_BY_ONE = (0, 3, 4, 9), (1, 5, 10)  # the other rows keep the model's samples


def _task():
  block = ml_collections.ConfigDict(dict(name='sum_mod', partial_credit=0.0, num_operands=3,
                                         modulus=5))
  return tasks.make_task(block, vocab_size=LM['vocab_size'])


@pytest.mark.slow  # compiles a whole PPO step (23 s): left out of the quick check
def test_step_score_is_the_python_grading_of_its_responses(monkeypatch):
  task = _task()
  problems = task.make_prompts(key=jax.random.key(7), num=ROWS)
  traces, trace_mask = task.solutions(problems, key=jax.random.key(0), response_len=NEW)
  wrong = traces.copy()
  ends = trace_mask.sum(axis=1).astype(int)  # the answer sits just before EOS
  for i in range(ROWS):
    v = wrong[i, ends[i] - 2] - 3
    wrong[i, ends[i] - 2] = 3 + (v + 1) % 5
  scripted = np.full((ROWS,), -1)
  scripted[list(SOLVED)], scripted[list(OFF_BY_ONE)] = 0, 1
  real_sample, real_update = sampling.sample, ppo_update.update
  seen = {}

  def sample(*args, **kwargs):
    out = real_sample(*args, **kwargs)
    pick = jnp.asarray(scripted)[:, None]
    response = jnp.where(pick == 0, traces, jnp.where(pick == 1, wrong, out.response))
    mask = jnp.where(pick >= 0, trace_mask, out.mask)
    return out.replace(response=response, mask=mask)

  def update(params, opt_state, rollout, key, **kwargs):
    params, opt_state, metrics = real_update(params, opt_state, rollout, key, **kwargs)
    seen.update(score=rollout.score, response=rollout.inputs[1], mask=rollout.mask)
    return params, opt_state, {**metrics, **{f'test/{k}': v for k, v in seen.items()}}

  monkeypatch.setattr(sampling, 'sample', sample)
  monkeypatch.setattr(ppo_update, 'update', update)

  model, params = tiny_learner(2)
  lang = language.make_language(seed=0, vocab_size=LM['vocab_size'], branching=8,
                                zipf_a=1.1, eos_prob=0.05)
  tx = optax.adam(1e-3)
  config = ppo_step.StepConfig(reward='task', no_eos_penalty=PENALTY, kl_control='fixed',
                               kl_target=4.0, kl_horizon=1e4, max_new_tokens=NEW,
                               ppo=ppo_update.PPOConfig(epochs=1, minibatches=1))
  step = jax.jit(functools.partial(ppo_step.train_step, model=model,
                                   lm=Transformer(ModelConfig(**LM)), rm_model=None, tx=tx,
                                   schedule=optax.constant_schedule(1e-3), config=config,
                                   task=task))
  state = ppo_step.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.key(3)),
                            kl_coef=jnp.float32(0.05))
  frozen = ppo_step.Frozen(ref_params=params['policy'], rm_params=None,
                           rm_norm=ppo_step.RewardNorm(mean=jnp.zeros(1), scale=jnp.ones(1)),
                           gold=reward_lib.make_gold_reward(lang, seed=1))
  batch = ppo_step.PromptBatch(prompts=problems.prompts,
                               prompt_lengths=problems.prompt_lengths,
                               answers=problems.answers, answer_lengths=problems.answer_lengths)
  _, metrics = step(state, frozen, batch)
  m = jax.device_get(metrics)

  response, mask = np.asarray(m['test/response']), np.asarray(m['test/mask'])
  answers = np.asarray(problems.answers)[:, 0]
  grades = np.array([_python_grade(task, a, r, k) for a, r, k in zip(answers, response, mask)])
  no_eos = np.array([EOS_ID not in [int(t) for t, k in zip(r, w) if k > 0]
                     for r, w in zip(response, mask)])
  # The grading has something to get right: every scripted row is graded as scripted.
  np.testing.assert_array_equal(grades[list(SOLVED)], 1.0)
  np.testing.assert_array_equal(grades[list(OFF_BY_ONE)], 0.0)
  np.testing.assert_allclose(m['test/score'], grades + PENALTY * no_eos, atol=1e-7)
  assert float(m['rl/pass_rate']) == pytest.approx(grades.mean(), abs=1e-7)
  assert float(m['rl/proxy_reward']) == pytest.approx(grades.mean(), abs=1e-7)
  assert float(m['rl/score']) == pytest.approx((grades + PENALTY * no_eos).mean(), abs=1e-6)


def test_task_reward_without_a_task_block_is_one_error_line(run_cli, tmp_path):
  workdir = tmp_path / 'ppo'
  result = run_cli('--config=configs/ppo.py:tiny', '--config.ppo.reward=task',
                   f'--workdir={workdir}')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'task block' in lines[0]
  assert not workdir.exists()


def test_task_tiny_trains_on_grpo_tiny_problems_and_rollout_count():
  """configs/ppo.py:task_tiny draws GRPO tiny's training pool (the same problems in the
  same order, none of them a held-out eval problem) with as many rollouts per step."""
  from conftest import load_config
  from rlhf_jax.stages import grpo, task_eval
  pools = {}
  for name, variant in (('ppo', 'task_tiny'), ('grpo', 'tiny')):
    config = load_config(name, variant)
    block = config[name]
    task = tasks.make_task(config.task, vocab_size=config.world.vocab_size)
    held_out = task_eval.held_out_problems(task, seed=config.world.seed,
                                           num_prompts=block.eval_prompts, dp=1)
    pools[name] = (grpo.prompt_pool(config, task, held_out=held_out, dp=1), held_out, config)
  (ppo_pool, held_out, ppo), (grpo_pool, _, g) = pools['ppo'], pools['grpo']
  for a, b in zip(jax.tree.leaves(ppo_pool), jax.tree.leaves(grpo_pool)):
    np.testing.assert_array_equal(a, b)
  seen = {tuple(row) for row in np.asarray(held_out.prompts)}
  assert not any(tuple(row) in seen for row in np.asarray(ppo_pool.prompts))
  assert ppo.train.batch_size == g.train.batch_size * g.grpo.group_size
  assert ppo.ppo.reward == 'task' and ppo.ppo.value == 'critic'
