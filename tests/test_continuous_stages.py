"""The stages that take a continuous_slots field (preference making, the collapse loop's
samples, PPO's rollout, best-of-n's candidates) against the static sampler with row keys:
with the field on, each stage writes or trains on exactly the tokens the same stage gives
when its sampler is the static one with SampleConfig.row_keys (every Sampler, or
sampling.sample inside the PPO step, patched to it), on a small random model whose EOS
logit is scaled up so that rows end at many different lengths (continuous batching then
refills rows mid-decode). And a bad field is refused in one line."""
import dataclasses
import functools
import os
import subprocess
import sys
import textwrap
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import sampling, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.world import annotators, language
from rlhf_jax.world import reward as reward_lib

from conftest import REPO, cli_env, load_config

EOS_SCALE = 4.0  # the EOS column of the output kernel: ragged lengths from a random model


def ragged_lm(seed: int = 0):
  """A random 2-layer Transformer (vocab 64) and its params, EOS made likely in some
  contexts and not others."""
  model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64))
  ids = np.ones((1, 8), np.int32)
  # Jitted, from an RBG key: threefry's draws outside a jit took seconds.
  init = jax.jit(lambda rng: model.init(rng, ids, segment_ids=ids, positions=ids)['params'])
  params = nn.meta.unbox(init(jax.random.key(seed, impl='rbg')))
  kernel = np.array(params['logits']['kernel'])
  kernel[:, language.EOS_ID] *= EOS_SCALE
  return model, {**params, 'logits': {'kernel': jnp.asarray(kernel)}}


def mesh_and_shardings(params, data: int):
  mesh_config = load_config('pretrain', 'tiny').mesh
  mesh_config.update(data=data, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:data])
  return mesh, mesh_config, jax.tree.map(lambda _: sharding.replicated(mesh), params)


class RowKeyed(sampling.Sampler):
  """The static sampler with row keys, whatever continuous_slots the stage asks for."""

  def __init__(self, *, config, continuous_slots=0, **kwargs):
    del continuous_slots
    super().__init__(config=dataclasses.replace(config, row_keys=True), **kwargs)


def assert_ragged(lengths, at_least=4):
  assert len(set(np.asarray(lengths).reshape(-1).tolist())) >= at_least, lengths


@pytest.mark.slow  # over 10 s here: left out of the quick check
def test_sample_in_chunks_continuous_equals_static_with_row_keys():
  """15 prompts in chunks of 8 on a 2-way data-parallel mesh (the last chunk of 7 padded
  to 8 rows, one compiled shape): continuous through 4 slots per chunk gives each prompt
  the static row-keyed sampler's response, mask and log-probs."""
  model, params = ragged_lm()
  mesh, mesh_config, shardings = mesh_and_shardings(params, 2)
  config = sampling.SampleConfig(max_new_tokens=12, temperature=0.9)
  rng = np.random.default_rng(0)
  prompts, lengths = sampling.left_pad(
      [[1] + rng.integers(3, 64, rng.integers(0, 5)).tolist() for _ in range(15)])
  make = lambda cls, **kw: cls(model=model, config=config, mesh=mesh, mesh_config=mesh_config,
                               param_shardings=shardings, **kw)
  key = jax.random.key(4)
  static = make(RowKeyed).sample_in_chunks(params, prompts, lengths, key, chunk=8)
  cont = make(sampling.Sampler, continuous_slots=4).sample_in_chunks(params, prompts, lengths,
                                                                     key, chunk=8)
  assert_ragged(static.lengths)
  np.testing.assert_array_equal(cont.response, static.response)
  np.testing.assert_array_equal(cont.mask, static.mask)
  np.testing.assert_array_equal(cont.lengths, static.lengths)
  np.testing.assert_allclose(cont.raw_logprobs, static.raw_logprobs, atol=1e-5, rtol=0)
  np.testing.assert_allclose(cont.logprobs, static.logprobs, atol=1e-5, rtol=0)


@pytest.mark.slow  # over 10 s here: left out of the quick check
def test_preference_pairs_continuous_equal_static_with_row_keys(tmp_path, monkeypatch):
  """preference_data.make_shard (12 prompts x 3 responses, labelled by the annotators)
  writes the same pairs, labels and gold rewards through 4 continuous slots as with the
  static row-keyed sampler, and records the slots in the lineage."""
  from rlhf_jax.data import preferences
  from rlhf_jax.stages import preference_data
  config = load_config('dpo', 'tiny')
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.prefs.update(num_prompts=12, responses_per_prompt=3, prompt_len=6,
                      max_new_tokens=10, continuous_slots=4)
  lang = language.make_language(seed=0, vocab_size=64, branching=8, zipf_a=1.1, eos_prob=0.1)
  gold = reward_lib.make_gold_reward(lang, seed=1)
  pool = annotators.make_pool(gold, seed=2, num=5, minority_fraction=0.0, temperature=0.3)
  model, params = ragged_lm(1)
  mesh, _, shardings = mesh_and_shardings(params, 1)
  setup = types.SimpleNamespace(
      init=types.SimpleNamespace(model=model, params=params, param_shardings=shardings),
      world=types.SimpleNamespace(lang=lang, gold=gold, pool=pool), mesh=mesh, dp=1,
      lineage=lambda: {})
  preference_data.make_shard(config, setup, directory=str(tmp_path / 'cont'))
  with monkeypatch.context() as m:
    m.setattr(sampling, 'Sampler', RowKeyed)
    preference_data.make_shard(config, setup, directory=str(tmp_path / 'static'))
  (cont, [lineage]), (static, _) = (preferences.read(str(tmp_path / d))
                                    for d in ('cont', 'static'))
  assert lineage['continuous_slots'] == 4 and len(static) > 12
  assert_ragged(static.chosen_mask.sum(axis=1))
  for name in ('prompts', 'prompt_id', 'chosen', 'rejected', 'chosen_mask', 'soft_label',
               'gold_chosen', 'gold_rejected', 'raw_annotator'):
    np.testing.assert_array_equal(getattr(cont, name), getattr(static, name), err_msg=name)


@pytest.mark.slow  # over 10 s here: left out of the quick check
def test_collapse_samples_continuous_equal_static_with_row_keys(tmp_path, monkeypatch):
  """The collapse loop's generation sample (40 rows from BOS on the 8-device mesh, chunks
  of the loop's own size) is the same through 8 continuous slots as with the static
  row-keyed sampler."""
  from rlhf_jax.data import array_store
  from rlhf_jax.loops import collapse
  config = load_config('collapse', 'tiny')
  config.collapse.update(samples=40, continuous_slots=8)
  config.train.seq_len = 12
  model, params = ragged_lm(2)
  mesh = sharding.make_mesh(config.mesh)
  loaded = types.SimpleNamespace(model=model, params=params, step=0, param_shardings=jax.tree.map(
      lambda _: sharding.replicated(mesh), params))
  rows = {}
  for name in ('cont', 'static'):
    with monkeypatch.context() as m:
      if name == 'static':
        m.setattr(sampling, 'Sampler', RowKeyed)
      paths = collapse.Paths(str(tmp_path / name))
      collapse._sample(config, paths, 1, loaded)
      rows[name] = np.asarray(array_store.read(paths.samples(1), ['rows'])[0]['rows'])
  assert rows['cont'].shape == (40, 13)
  assert_ragged((rows['static'] > 0).sum(axis=1))
  np.testing.assert_array_equal(rows['cont'], rows['static'])


@pytest.mark.slow  # over 10 s here: left out of the quick check
def test_ppo_step_rollout_continuous_equals_static_with_row_keys(monkeypatch):
  """The jitted PPO step (reward gold) with ppo.continuous_slots=2 over a batch of 6
  prompts trains on the responses the step with the static row-keyed sampler draws, and
  gives the same metrics and parameters."""
  import optax
  from rlhf_jax.models import policy_value
  from rlhf_jax.train import ppo_step, ppo_update
  lm_config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
  model = policy_value.PolicyValue(lm_config, 'head')
  params = nn.meta.unbox(jax.jit(policy_value.init_params(model))(
      jax.random.key(0, impl='rbg')))
  kernel = np.array(params['policy']['logits']['kernel'])
  kernel[:, language.EOS_ID] *= EOS_SCALE
  params['policy']['logits']['kernel'] = jnp.asarray(kernel)
  lang = language.make_language(seed=0, vocab_size=64, branching=8, zipf_a=1.1, eos_prob=0.05)
  gold = reward_lib.make_gold_reward(lang, seed=1)
  real_update, real_sample = ppo_update.update, sampling.sample

  def update(params, opt_state, rollout, key, **kwargs):  # hands out what it trains on
    params, opt_state, metrics = real_update(params, opt_state, rollout, key, **kwargs)
    return params, opt_state, {**metrics, 'test/response': rollout.inputs[1],
                               'test/mask': rollout.mask, 'test/logp': rollout.logp}

  monkeypatch.setattr(ppo_update, 'update', update)
  tx = optax.adam(1e-3)
  state = ppo_step.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.key(3)),
                            kl_coef=jnp.float32(0.05))
  frozen = ppo_step.Frozen(ref_params=params['policy'], rm_params=None,
                           rm_norm=ppo_step.RewardNorm(mean=jnp.zeros(1), scale=jnp.ones(1)),
                           gold=gold)
  prompts, plen = sampling.left_pad([[1, 5, 9], [1, 7], [1, 3, 4, 6, 8], [1, 10, 11, 12],
                                     [1], [1, 20, 30]])
  batch = ppo_step.PromptBatch(prompts=prompts, prompt_lengths=plen)
  out = {}
  for slots in (2, 0):
    with monkeypatch.context() as m:
      if not slots:  # the reference: the static sampler with row keys
        m.setattr(sampling, 'sample', lambda *a, config, **kw: real_sample(
            *a, config=dataclasses.replace(config, row_keys=True), **kw))
      config = ppo_step.StepConfig(reward='gold', no_eos_penalty=-1.0, kl_control='fixed',
                                   kl_target=4.0, kl_horizon=1e4, max_new_tokens=10,
                                   ppo=ppo_update.PPOConfig(epochs=1, minibatches=1),
                                   continuous_slots=slots)
      step = jax.jit(functools.partial(
          ppo_step.train_step, model=model, lm=Transformer(lm_config), rm_model=None, tx=tx,
          schedule=optax.constant_schedule(1e-3), config=config))
      out[slots] = jax.device_get(step(state, frozen, batch))
  (p_cont, m_cont), (p_static, m_static) = out[2], out[0]
  assert_ragged(m_static['test/mask'].sum(axis=1), at_least=3)
  np.testing.assert_array_equal(m_cont['test/response'], m_static['test/response'])
  np.testing.assert_array_equal(m_cont['test/mask'], m_static['test/mask'])
  for name in ('test/logp', 'rl/gold_reward', 'rl/kl', 'train/loss'):
    np.testing.assert_allclose(m_cont[name], m_static[name], atol=1e-5, rtol=0, err_msg=name)
  for a, b in zip(jax.tree.leaves(p_cont.params), jax.tree.leaves(p_static.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


BEST_OF_N = textwrap.dedent('''
  import dataclasses, sys, types
  sys.path[:0] = [{tests!r}, {experiments!r}]
  import jax, numpy as np
  import best_of_n, test_continuous_stages as t
  from rlhf_jax import sampling
  model, params = t.ragged_lm(3)
  mesh, mesh_config, shardings = t.mesh_and_shardings(params, 1)
  sft = types.SimpleNamespace(model=model, params=params, param_shardings=shardings)
  prompts, lengths = sampling.left_pad([[1, 4], [1], [1, 9, 8, 7], [1, 30, 31]])
  run = lambda slots: best_of_n.sample_candidates(
      sft, prompts, lengths, per=5, mesh=mesh, mesh_config=mesh_config, seed=0,
      continuous_slots=slots)
  cont = run(4)
  sampling.Sampler = t.RowKeyed
  static = run(0)
  t.assert_ragged(static.lengths)
  np.testing.assert_array_equal(cont.response, static.response)
  np.testing.assert_array_equal(cont.mask, static.mask)
  print('same', len(cont.response))
''')


@pytest.mark.slow  # over 10 s here: left out of the quick check
def test_best_of_n_candidates_continuous_equal_static_with_row_keys():
  """experiments/best_of_n.py's candidates (4 prompts x 5 samples) through 4 continuous
  slots equal those of the static row-keyed sampler (in a subprocess: the script defines
  absl flags that other experiments imported into the test process define too)."""
  code = BEST_OF_N.format(tests=os.path.join(REPO, 'tests'),
                          experiments=os.path.join(REPO, 'experiments'))
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=cli_env(1),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ['same', '20']


@pytest.mark.parametrize('block, value', [('prefs', -4), ('collapse', -1), ('ppo', 128)])
def test_bad_continuous_slots_are_refused(block, value):
  """A negative field (any stage) and PPO slots beyond its batch are UserErrors naming the
  field, from the config's validation (no devices, no data); slots not divisible by the
  data-parallel size are refused when the Sampler is built."""
  config = load_config({'prefs': 'dpo'}.get(block, block), 'tiny')
  config[block].continuous_slots = value
  with pytest.raises(UserError, match=f'{block}.continuous_slots={value}'):
    config_lib.validate(config)


def test_slots_not_divisible_by_the_data_parallel_size_are_refused():
  model, params = ragged_lm()
  mesh, mesh_config, shardings = mesh_and_shardings(params, 2)
  with pytest.raises(UserError, match='continuous_slots=3 .*data-parallel size 2'):
    sampling.Sampler(model=model, config=sampling.SampleConfig(max_new_tokens=4), mesh=mesh,
                     mesh_config=mesh_config, param_shardings=shardings, continuous_slots=3)


def test_bad_slots_on_the_command_line_are_one_error_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'rlhf_jax.main', '--config=configs/dpo.py:tiny',
       f'--workdir={tmp_path / "run"}', '--config.prefs.continuous_slots=-2'],
      cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: prefs.continuous_slots=-2'), lines
  assert not (tmp_path / 'run').exists()
