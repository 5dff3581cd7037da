"""Preference pairs from a policy's samples: labels agree with the gold preference as
often as the annotators' Bradley-Terry model says, the stored set reads back exactly with
its lineage, and a killed writer leaves nothing half-written."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from rlhf_jax import sampling, sharding
from rlhf_jax.data import preferences
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.world import annotators, language
from rlhf_jax.world import reward as reward_lib

from conftest import load_config


@pytest.fixture(scope='module')
def labelled():
  lang = language.make_language(seed=0, vocab_size=64, branching=8, zipf_a=1.1, eos_prob=0.1)
  gold = reward_lib.make_gold_reward(lang, seed=1)
  pool = annotators.make_pool(gold, seed=2, num=5, minority_fraction=0.0, temperature=0.3)
  model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64))
  ids = np.ones((1, 8), np.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), ids, segment_ids=ids,
                                    positions=ids)['params'])
  config = load_config('pretrain', 'tiny')
  config.mesh.update(data=1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  sampler = sampling.Sampler(model=model, config=sampling.SampleConfig(max_new_tokens=16),
                             mesh=mesh, mesh_config=config.mesh, param_shardings=replicated)
  prompts, lengths = preferences.world_prompts(lang, key=jax.random.key(3), num=200, max_len=6)
  raw = preferences.sample_pairs(sampler, params, prompts=prompts, prompt_lengths=lengths,
                                 key=jax.random.key(4), k=3)
  pairs = preferences.label_pairs(**raw, gold=gold, pool=pool, key=jax.random.key(5), round_=0)
  return raw, pairs, pool


@pytest.mark.slow
def test_pairs_are_the_policy_samples_ordered_by_the_label(labelled):
  raw, pairs, _ = labelled
  assert len(raw['prompts']) == 600  # 200 prompts x 3 pairs (k = 3)
  assert 500 < len(pairs) <= 600  # identical response pairs dropped
  assert not ((pairs.chosen * pairs.chosen_mask) ==
              (pairs.rejected * pairs.rejected_mask)).all(axis=1).any()
  firsts = {tuple(r) for r in raw['first']} | {tuple(r) for r in raw['second']}
  assert all(tuple(r) in firsts for r in pairs.chosen)
  # Prompts are right-aligned true prefixes of several lengths, BOS first.
  assert (pairs.prompts[:, -1] != 0).all() and len(set(pairs.prompt_lengths.tolist())) > 3
  starts = pairs.prompts[np.arange(len(pairs)), pairs.prompts.shape[1] - pairs.prompt_lengths]
  assert (starts == language.BOS_ID).all()


def test_labels_agree_with_gold_as_bradley_terry_says(labelled):
  """Majority annotators without length bias have the gold reward as utility, so each
  label agrees with the gold preference with probability sigmoid(|gold gap| / tau)."""
  _, pairs, pool = labelled
  gap = pairs.gold_chosen.astype(np.float64) - pairs.gold_rejected
  tau = np.asarray(pool.temperature, np.float64)[pairs.annotator]
  p = 1 / (1 + np.exp(-np.abs(gap) / tau))
  agree = (gap > 0).sum()
  assert abs(agree - p.sum()) <= 4 * np.sqrt((p * (1 - p)).sum())
  assert 0.6 < agree / len(pairs) < 0.99


def test_write_and_read_back_with_lineage(labelled, tmp_path):
  _, pairs, _ = labelled
  directory = str(tmp_path / 'prefs')
  later = pairs.take(np.arange(10))
  later = preferences.PreferencePairs(**{**{f: getattr(later, f) for f in preferences.FIELDS},
                                         'round': np.ones(10, np.int32)})
  os.makedirs(os.path.join(directory, 'shard_00001.tmp'))  # a killed writer's leftovers
  preferences.write_shard(directory, pairs, lineage={'round': 0, 'checkpoint': 'sft/300'})
  preferences.write_shard(directory, later, lineage={'round': 1, 'checkpoint': 'ppo/50'})
  assert sorted(os.listdir(directory)) == ['shard_00000', 'shard_00001']
  both, lineages = preferences.read(directory)
  assert [l['checkpoint'] for l in lineages] == ['sft/300', 'ppo/50']
  assert [l['pairs'] for l in lineages] == [len(pairs), 10]
  for name in preferences.FIELDS:
    np.testing.assert_array_equal(getattr(both, name)[:len(pairs)], getattr(pairs, name))
  np.testing.assert_array_equal(both.round, [0] * len(pairs) + [1] * 10)
  only_1, _ = preferences.read(directory, rounds={1})
  np.testing.assert_array_equal(only_1.chosen, pairs.chosen[:10])
  info = json.loads(open(os.path.join(directory, 'shard_00000', 'lineage.json')).read())
  assert info == {'round': 0, 'checkpoint': 'sft/300', 'pairs': len(pairs)}


def test_missing_or_empty_sets_are_user_errors(tmp_path, labelled):
  _, pairs, _ = labelled
  with pytest.raises(UserError, match='no preference pairs'):
    preferences.read(str(tmp_path / 'nothing'))
  with pytest.raises(UserError, match='no preference pairs'):
    preferences.write_shard(str(tmp_path / 'x'), pairs.take(np.arange(0)), lineage={})
