"""Direct RLAIF (train/judge_reward.py): the judge documents laid out on the device equal
the host's (data/judge_docs.documents) token for token; the reward equals 2 p - 1 with p
the order-averaged verdict the host judge reads, is exactly antisymmetric and exactly 0
for identical responses; principles are drawn by weight; bad judge blocks are refused."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax.data import judge_docs
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.sampling import left_pad
from rlhf_jax.stages import ppo
from rlhf_jax.train import judge_reward
from rlhf_jax.world import language

V, P, R, B = 48, 6, 7, 24


def _pairs(seed: int):
  """Left-padded prompts with BOS (lengths 2..P) and two masked responses per row (prefix
  masks of 0..R tokens), as the sampler makes them."""
  rng = np.random.default_rng(seed)
  plens = rng.integers(2, P + 1, B)
  prompts, lengths = left_pad([np.concatenate([[language.BOS_ID], rng.integers(3, V, n - 1)])
                               for n in plens], length=P)
  out = {'prompts': prompts, 'prompt_lengths': lengths}
  for name in ('first', 'second'):
    tokens = rng.integers(3, V, (B, R)).astype(np.int32)
    n = rng.integers(0, R + 1, B)
    out[name] = tokens
    out[f'{name}_mask'] = (np.arange(R)[None] < n[:, None]).astype(np.float32)
  out['principle'] = rng.integers(0, 3, B).astype(np.int32)
  return out


def test_device_documents_equal_the_host_documents():
  vocab = type('Vocab', (), {'tags': np.array([40, 41, 42], np.int32)})()
  for seed in range(3):
    pairs = _pairs(seed)
    want_docs, want_lengths = judge_docs.documents(vocab, **pairs)
    docs, lengths = jax.jit(judge_reward.documents)(jnp.asarray(vocab.tags), **pairs)
    np.testing.assert_array_equal(np.asarray(docs), want_docs)
    np.testing.assert_array_equal(np.asarray(lengths), want_lengths)


@pytest.fixture(scope='module')
def judge_lm():
  cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64)
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(3), tokens, segment_ids=jnp.ones_like(tokens),
                      positions=jnp.arange(4)[None])['params']
  params = jax.tree.map(lambda x: x * 3.0, jax.tree.map(jnp.asarray, params))  # sharp verdicts
  return model, params


def _reward(model, params, pairs, weights, key):
  frozen = judge_reward.JudgeFrozen(params=params, tags=jnp.array([40, 41, 42], jnp.int32),
                                    log_weights=jnp.log(jnp.asarray(weights, jnp.float32)))
  fn = jax.jit(lambda f, k, **kw: judge_reward.direct_reward(f, k, model=model, first=44,
                                                             second=45, **kw))
  return fn(frozen, key, prompts=pairs['prompts'], prompt_lengths=pairs['prompt_lengths'],
            response=pairs['first'], mask=pairs['first_mask'], ref_response=pairs['second'],
            ref_mask=pairs['second_mask'])


def test_reward_is_the_order_averaged_host_verdict(judge_lm):
  model, params = judge_lm
  pairs = _pairs(7)
  r, principle = _reward(model, params, pairs, [0.5, 0.3, 0.2], jax.random.key(1))
  vocab = type('Vocab', (), {'tags': np.array([40, 41, 42]), 'first': 44, 'second': 45})()
  fwd, bwd = _host_readings(model, params, vocab, pairs, np.asarray(principle))
  p = (fwd + bwd) / 2
  np.testing.assert_allclose(np.asarray(r, np.float64), 2 * p - 1, atol=2e-6)
  assert np.abs(np.asarray(r)).max() > 0.05  # the verdicts are not all 1/2


def _host_readings(model, params, vocab, pairs, principle):
  """P(first better) read forward and backward from judge_docs' host documents, in float64
  from the judge's logits (an independent path to the device reward)."""
  kw = {k: pairs[k] for k in ('prompts', 'prompt_lengths')}

  def read(y1, m1, y2, m2):
    docs, lengths = judge_docs.documents(vocab, first=y1, first_mask=m1, second=y2,
                                         second_mask=m2, principle=principle, **kw)
    lo = np.asarray(jax.jit(lambda d, l: judge_reward.verdict_logprobs(
        params, d, l, model=model, first=44, second=45))(docs, lengths), np.float64)
    return 1 / (1 + np.exp(-lo))

  fwd = read(pairs['first'], pairs['first_mask'], pairs['second'], pairs['second_mask'])
  bwd = 1 - read(pairs['second'], pairs['second_mask'], pairs['first'], pairs['first_mask'])
  return fwd, bwd


def test_reward_is_antisymmetric_and_zero_at_the_reference(judge_lm):
  model, params = judge_lm
  pairs = _pairs(8)
  key = jax.random.key(2)
  r, _ = _reward(model, params, pairs, [1, 1, 1], key)
  swapped = dict(pairs, first=pairs['second'], first_mask=pairs['second_mask'],
                 second=pairs['first'], second_mask=pairs['first_mask'])
  r_swapped, _ = _reward(model, params, swapped, [1, 1, 1], key)
  np.testing.assert_array_equal(np.asarray(r_swapped), -np.asarray(r))
  same = dict(pairs, second=pairs['first'], second_mask=pairs['first_mask'])
  r_same, _ = _reward(model, params, same, [1, 1, 1], key)
  np.testing.assert_array_equal(np.asarray(r_same), np.zeros(B, np.float32))


@pytest.mark.slow  # over 5 s
def test_principles_are_drawn_by_weight(judge_lm):
  model, params = judge_lm
  pairs = _pairs(9)
  weights = np.array([0.6, 0.0, 0.4])
  counts = np.zeros(3)
  for k in range(40):
    _, principle = _reward(model, params, pairs, weights, jax.random.key(100 + k))
    counts += np.bincount(np.asarray(principle), minlength=3)
  n = counts.sum()
  assert counts[1] == 0
  se = np.sqrt(weights[0] * (1 - weights[0]) / n)
  assert abs(counts[0] / n - weights[0]) < 4 * se


def _ppo_config(judge=None, constitution=True):
  c = ml_collections.ConfigDict({'world': {'seed': 0}, 'init': {'run': 'sft'}})
  with c.unlocked():
    if judge is not None:
      c.judge = ml_collections.ConfigDict(judge)
    if constitution:
      c.constitution = ml_collections.ConfigDict(
          {'harmless': {'statement': 'no harm', 'about': 'harm', 'weight': 1.0}})
  return c


def _judge_run(tmp_path, stage='judge', world_seed=0, principles=1):
  run = tmp_path / f'{stage}_{world_seed}_{principles}'
  run.mkdir()
  constitution = {f'p{i}': {'statement': 's', 'about': 'harm', 'weight': 1.0}
                  for i in range(principles)}
  (run / 'config.json').write_text(json.dumps(
      {'stage': stage, 'world': {'seed': world_seed}, 'constitution': constitution}))
  return str(run)


@pytest.mark.parametrize('case, mentions', [
    ('no_block', ('judge block',)),
    ('rm_kind', ("judge.kind='lm'",)),
    ('missing_run', ('judge.run',)),
    ('not_a_judge', ('not a judge run',)),
    ('other_world', ('another world',)),
    ('principles', ('2 principles', 'has 1')),
])
def test_bad_judge_blocks_are_refused(tmp_path, case, mentions):
  runs = {'not_a_judge': _judge_run(tmp_path, stage='sft'),
          'other_world': _judge_run(tmp_path, world_seed=1),
          'principles': _judge_run(tmp_path, principles=2),
          'missing_run': str(tmp_path / 'nowhere')}
  judge = None if case == 'no_block' else {
      'kind': 'rm' if case == 'rm_kind' else 'lm', 'run': runs.get(case, '')}
  with pytest.raises(UserError) as err:
    ppo.resolve_judge(_ppo_config(judge))
  assert all(m in str(err.value) for m in mentions), str(err.value)
