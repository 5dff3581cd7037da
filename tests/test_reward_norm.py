"""Reward normalisation (stages/reward_norm.py, ppo_step.proxy_reward) against NumPy, on
the session's SFT and reward-model runs:

- the proxy reward is the members' mean of (reward - mean) / scale, as NumPy computes it;
- a PPO run's statistics are the NumPy mean and std of the members of the checkpoint it
  loads (ppo.rm_step, here an earlier one than the final) on the reference samples the
  stage draws, scored by hand in one forward; the final checkpoint scores them otherwise,
  and the reward model's own file (the final checkpoint's) is refused for that step;
- normalised with them ('mean_std'), the proxy of fresh samples of the reference policy
  has mean 0 and std 1 within sampling error;
- a second start of the run reads the file back; one that loads another checkpoint is
  refused.
"""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import load_config
from rlhf_jax import config as config_lib
from rlhf_jax import sampling
from rlhf_jax.data.preferences import world_prompts
from rlhf_jax.errors import UserError
from rlhf_jax.models import reward_model
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.stages import ppo, reward_norm
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.train import ppo_step, runs
from rlhf_jax.train.reward_step import response_sequences


@pytest.mark.slow
def test_proxy_reward_matches_numpy():
  cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, d_ff=64)
  model = reward_model.ensemble(cfg, 3, 'mean')
  # Init, forward and proxy jitted (as the stages run them): op by op they took seconds.
  # The init from an RBG key: compiling threefry's draws took seconds.
  params = nn.meta.unbox(jax.jit(reward_model.init_params(model))(
      jax.random.key(0, impl='rbg')))
  rng = np.random.default_rng(0)
  prompts, lengths = sampling.left_pad([[1, 5, 6], [1, 7], [1, 8, 9, 10], [1]])
  responses = rng.integers(3, 32, size=(4, 5)).astype(np.int32)
  mask = (np.arange(5)[None] < np.array([[5], [2], [3], [1]])).astype(np.float32)
  members = np.asarray(jax.jit(model.apply)({'params': params},
                                           *response_sequences(prompts, lengths, responses,
                                                               mask)), np.float64)
  proxy = jax.jit(lambda *a: ppo_step.proxy_reward(*a, rm_model=model))
  stats = {'mean': rng.normal(size=3).tolist(), 'std': rng.uniform(0.5, 2, size=3).tolist()}
  for mode, scale in (('mean', np.ones(3)), ('mean_std', np.asarray(stats['std']))):
    norm = reward_norm.to_norm(stats, mode=mode)
    ours = proxy(params, norm, prompts, lengths, responses, mask)
    expected = ((members - np.asarray(stats['mean'])[:, None]) / scale[:, None]).mean(axis=0)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match='constant reward'):
    reward_norm.to_norm({'mean': [0.0], 'std': [0.0]}, mode='mean_std')


def _hand_scored(rm, prompts, lengths, responses, mask) -> np.ndarray:
  """[K, N] float64: the members' rewards of all N rows in one (jitted) forward."""
  return np.asarray(jax.device_get(jax.jit(rm.model.apply)(
      {'params': rm.params}, *response_sequences(prompts, lengths, responses, mask))),
      np.float64)


def test_ppo_statistics_are_the_loaded_checkpoints_on_reference_samples(chain, reward_run,
                                                                        tmp_path):
  config = load_config('ppo', 'tiny')
  config.init.run, config.ppo.rm_run = chain['sft'], reward_run
  config.ppo.update(rm_step=100, reward_norm='mean_std', reward_norm_prompts=200)
  config_lib.validate(config)
  ppo.resolve(config)
  setup = FromRun(config, rows_per_step=config.train.batch_size)
  load_rm = lambda step: runs.load_reward_model(reward_run, mesh=setup.mesh,
                                                mesh_config=config.mesh, step=step)
  rm, final = load_rm(100), load_rm(None)
  assert (rm.step, final.step) == (100, 150)

  stats = reward_norm.for_ppo(config, setup, rm, workdir=str(tmp_path))
  samples = reward_norm.reference_samples(config, setup)
  members = _hand_scored(rm, *samples)
  assert members.shape == (1, 200)
  np.testing.assert_allclose(stats['mean'], members.mean(axis=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['std'], members.std(axis=1), rtol=1e-5)
  assert {k: stats[k] for k in ('rm_run', 'rm_step', 'reference_run', 'reference_step',
                                'samples')} == {
      'rm_run': reward_run, 'rm_step': 100, 'reference_run': chain['sft'],
      'reference_step': setup.init.step, 'samples': 200}
  assert json.load(open(tmp_path / 'reward_norm.json')) == stats
  # The final checkpoint scores the same samples otherwise (its mean is 0.016 higher here,
  # 2% of a std: the learning rate has decayed by step 100), so its statistics fail the
  # check above; the reward model's own file (the final checkpoint's) is refused for step
  # 100.
  final_members = _hand_scored(final, *samples)
  assert not np.allclose(final_members.mean(axis=1), stats['mean'], rtol=1e-5, atol=1e-6)
  assert not np.allclose(final_members.std(axis=1), stats['std'], rtol=1e-5)
  with pytest.raises(UserError, match='checkpoint 150, not of checkpoint 100'):
    reward_norm.read_rm(reward_run, step=100)
  assert reward_norm.read_rm(reward_run, step=150, members=1)['step'] == 150

  # Fresh reference samples (other prompts, other key): normalised by the statistics, the
  # proxy has mean 0 within 4 standard errors of the difference of two sample means of
  # unit-variance rewards, and std 1 within 4 standard errors of the ratio of two sample
  # stds (each about sqrt((kurtosis - 1) / 4n), kurtosis measured on the fresh set).
  n = 512
  fresh_prompts, fresh_lengths = world_prompts(setup.world.lang, key=jax.random.key(7), num=n,
                                               max_len=config.ppo.prompt_len)
  sampler = sampling.Sampler(model=setup.init.model,
                             config=sampling.SampleConfig(max_new_tokens=config.ppo.max_new_tokens),
                             mesh=setup.mesh, mesh_config=config.mesh,
                             param_shardings=setup.init.param_shardings)
  out = sampler.sample_in_chunks(setup.init.params, np.asarray(fresh_prompts),
                                 np.asarray(fresh_lengths), jax.random.key(8))
  proxy = np.asarray(jax.jit(lambda *a: ppo_step.proxy_reward(*a, rm_model=rm.model))(
      rm.params, reward_norm.to_norm(stats, mode='mean_std'), np.asarray(fresh_prompts),
      np.asarray(fresh_lengths), out.response, out.mask), np.float64)
  assert abs(proxy.mean()) < 4 * np.sqrt(1 / n + 1 / 200)
  kurtosis = np.mean((proxy - proxy.mean()) ** 4) / proxy.var() ** 2
  assert abs(proxy.std() - 1) < 4 * np.sqrt((kurtosis - 1) / 4 * (1 / n + 1 / 200))

  # A second start reads the file back; one that loads the final checkpoint is refused.
  assert reward_norm.for_ppo(config, setup, rm, workdir=str(tmp_path)) == stats
  with pytest.raises(UserError, match=r'rm_step 100 \(this run: 150\).*cannot go on'):
    reward_norm.for_ppo(config, setup, final, workdir=str(tmp_path))
  assert json.load(open(tmp_path / 'reward_norm.json')) == stats
  assert os.listdir(tmp_path) == ['reward_norm.json']
