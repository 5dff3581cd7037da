"""PPO from the CLI on the tiny world, chained from the session's SFT and reward-model runs:

- against the gold reward (the oracle), PPO raises the policy's gold reward by many
  standard errors, every step's score is the reward plus the no-EOS penalty, and a run
  resumed from a middle checkpoint ends with the same metrics and params;
- against a reward model, the centred proxy is 0 on the SFT policy's own samples (within
  sampling error, from the run's own statistics on samples of its reference, which name
  the reward-model checkpoint they belong to) and rises under PPO;
  the run adopts the reward model's gold reward and annotators;
- a separate critic learns values that explain the returns;
- bad input ends with one error line and exit status 2.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import checkpoint_steps, read_state


def records(workdir) -> list[dict]:
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def with_key(workdir, key: str) -> list[dict]:
  return [r for r in records(workdir) if key in r]


FAST = ['--config=configs/ppo.py:tiny', '--config.train.progress=False',
        '--config.optim.lr=3e-4', '--config.train.log_every=5']


def test_ppo_on_gold_raises_gold_reward_and_resumes(chain, run_cli, tmp_path):
  workdir = tmp_path / 'ppo'
  args = [*FAST, f'--config.init.run={chain["sft"]}', '--config.ppo.reward=gold',
          '--config.train.steps=30', '--config.train.ckpt_every=25',
          '--config.train.eval_every=30']  # evaluated at steps 0 and 30, the two read here
  result = run_cli(*args, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  policy = with_key(workdir, 'policy/gold_reward')
  first, last = policy[0], policy[-1]
  assert first['step'] == 0 and last['step'] == 30
  assert abs(first['policy/kl_ref']) < 1e-4  # step 0 is the reference itself
  se = np.hypot(first['policy/gold_reward_se'], last['policy/gold_reward_se'])
  assert last['policy/gold_reward'] > first['policy/gold_reward'] + 4 * se
  assert 0 < last['policy/kl_ref'] < 30
  for r in with_key(workdir, 'rl/score'):
    # The score is the reward (here gold itself) plus -1 for each response without EOS.
    assert r['rl/proxy_reward'] == pytest.approx(r['rl/gold_reward'], abs=1e-6)
    assert r['rl/score'] == pytest.approx(r['rl/proxy_reward'] - (1 - r['rl/eos_rate']),
                                          abs=1e-5)
    assert r['rl/kl_coef'] == pytest.approx(0.05)  # fixed controller
  # ppo/approx_kl, ppo/clip_fraction and the loss terms are checked against NumPy on a tiny
  # LM in tests/test_ppo.py (test_update_metrics_and_entropy_bonus_match_numpy).

  # Resumed from step 25, the middle checkpoint (a short rerun that restores one).
  resumed = tmp_path / 'ppo_resumed'
  shutil.copytree(workdir, resumed)
  assert checkpoint_steps(resumed) == [25, 30]
  for step in checkpoint_steps(resumed):
    if step > 25:
      shutil.rmtree(resumed / 'checkpoints' / str(step))
  result = run_cli(*args, f'--workdir={resumed}')
  assert result.returncode == 0, result.stderr[-3000:]
  strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith('perf/')} for r in rs]
  assert strip(records(resumed)) == strip(records(workdir))
  a, b = (read_state(d / 'checkpoints' / '30') for d in (workdir, resumed))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_ppo_on_reward_model(chain, reward_run, run_cli, tmp_path):
  workdir = tmp_path / 'ppo_rm'
  result = run_cli(*FAST, f'--workdir={workdir}', f'--config.init.run={chain["sft"]}',
                   f'--config.ppo.rm_run={reward_run}', '--config.train.steps=30',
                   '--config.train.eval_every=30', '--config.ppo.kl_control=adaptive',
                   '--config.ppo.kl_horizon=1000', '--config.train.log_every=1')
  assert result.returncode == 0, result.stderr[-3000:]
  policy = with_key(workdir, 'policy/proxy_reward')
  first, last = policy[0], policy[-1]
  # Rewards are centred on samples of the reference (the SFT policy), drawn by the run
  # itself with the newest reward-model checkpoint: at step 0 (that policy) the mean proxy
  # over the 256 eval prompts is 0 up to sampling error (std from the run's reference
  # statistics) and the reference samples' own finite size.
  norm = json.load(open(workdir / 'reward_norm.json'))
  assert (norm['rm_run'], norm['rm_step']) == (reward_run, checkpoint_steps(reward_run)[-1])
  assert (norm['reference_run'], norm['samples']) == (chain['sft'], 1024)
  tolerance = 4 * norm['std'][0] * np.sqrt(1 / 256 + 1 / norm['samples'])
  assert abs(first['policy/proxy_reward']) < tolerance
  assert last['policy/proxy_reward'] > first['policy/proxy_reward'] + 2 * norm['std'][0] / 4
  # configs/ppo.py:tiny against a reward model raises the gold reward over SFT's.
  se = np.hypot(first['policy/gold_reward_se'], last['policy/gold_reward_se'])
  assert last['policy/gold_reward'] > first['policy/gold_reward'] + 3 * se
  config = json.load(open(workdir / 'config.json'))
  rm_config = json.load(open(os.path.join(reward_run, 'config.json')))
  assert config['reward'] == rm_config['reward']
  assert config['annotators'] == rm_config['annotators']
  # Every step logged: beta of step s+1 follows Ziegler et al.'s rule from step s's KL
  # (target 4 nats, 64 rollouts per step, horizon 1000).
  steps = with_key(workdir, 'rl/kl_coef')
  assert [r['step'] for r in steps] == list(range(1, 31))
  # The first iteration's rollouts come from the reference itself: the learner's log-probs
  # of its samples equal the reference's, so the sequence KL is 0 up to float32 rounding.
  assert abs(steps[0]['rl/kl']) < 1e-4
  assert steps[0]['rl/kl_coef'] == pytest.approx(0.05)
  for before, after in zip(steps, steps[1:]):
    e = np.clip(before['rl/kl'] / 4.0 - 1, -0.2, 0.2)
    assert after['rl/kl_coef'] == pytest.approx(before['rl/kl_coef'] * (1 + e * 64 / 1000),
                                                rel=1e-5)
  assert len({round(r['rl/kl_coef'], 6) for r in steps}) > 10  # it did adapt


def test_separate_critic_learns_values(chain, run_cli, tmp_path):
  workdir = tmp_path / 'critic'
  result = run_cli(*FAST, f'--workdir={workdir}', f'--config.init.run={chain["sft"]}',
                   '--config.ppo.reward=gold', '--config.ppo.value=critic',
                   '--config.train.steps=25', '--config.train.eval_every=25')
  assert result.returncode == 0, result.stderr[-3000:]
  logged = with_key(workdir, 'ppo/explained_variance')
  # The value head starts at 0 (explained variance about 0 on the first rollouts).
  assert logged[-1]['ppo/explained_variance'] > 0.3
  assert logged[-1]['ppo/explained_variance'] > logged[0]['ppo/explained_variance'] + 0.2
  state = read_state(workdir / 'checkpoints' / '25')
  assert set(state['params']) == {'policy', 'critic', 'value_head'}


@pytest.mark.parametrize('case', ['rm_is_sft', 'rm_missing', 'rm_unfinished', 'minibatches',
                                  'bad_value', 'bad_reward_norm'])
def test_bad_input_is_one_error_line(case, chain, reward_run, run_cli, tmp_path):
  workdir = tmp_path / 'run'
  args = ['--config=configs/ppo.py:tiny', f'--workdir={workdir}',
          f'--config.init.run={chain["sft"]}', f'--config.ppo.rm_run={reward_run}']
  if case == 'rm_is_sft':
    args[3] = f'--config.ppo.rm_run={chain["sft"]}'
    expected = 'not a reward_model run'
  elif case == 'rm_missing':
    args[3] = f'--config.ppo.rm_run={tmp_path / "nothing"}'
    expected = 'holds no run'
  elif case == 'rm_unfinished':
    unfinished = tmp_path / 'rm_unfinished'
    shutil.copytree(reward_run, unfinished)
    os.remove(unfinished / 'reward_norm.json')
    args[3] = f'--config.ppo.rm_run={unfinished}'
    expected = 'has not finished'
  elif case == 'minibatches':
    args.append('--config.ppo.minibatches=5')
    expected = 'not divisible into ppo.minibatches=5'
  elif case == 'bad_value':
    args.append('--config.ppo.value=shared')
    expected = "ppo.value='shared' is not one of"
  else:
    args.append('--config.ppo.reward_norm=std')
    expected = "ppo.reward_norm='std' is not one of"
  result = run_cli(*args)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], lines
  assert not os.path.exists(workdir / 'checkpoints')
