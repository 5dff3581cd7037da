"""The session's chain runs (pretrain:tiny and sft:tiny with defaults, reward_model:tiny for
150 steps) against independent numbers and against what configs/*.py say `tiny` gives:

- the pretraining run's logged eval/true_kl and eval/loss equal a NumPy float64
  recomputation on the same fresh true rows: log p_true by a walk through the world's
  transition table, log q by log-softmax of the final checkpoint's logits;
- the logged figures lie in the ranges the config docstrings state (no new training run:
  only what the fixtures already produce; claims about other runs are not checked here).
"""
import json
import os

import ml_collections
import numpy as np
import pytest

from conftest import checkpoint_steps, read_state


def records(workdir) -> list[dict]:
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def evals(workdir, key: str) -> list[dict]:
  return [r for r in records(workdir) if key in r]


def run_config(workdir) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.load(open(os.path.join(workdir, 'config.json'))))


def test_true_kl_matches_numpy_on_the_eval_rows(chain):
  import jax
  import jax.numpy as jnp
  from rlhf_jax.data.world_source import WorldSource
  from rlhf_jax.models.transformer import ModelConfig, Transformer
  from rlhf_jax.world import language
  workdir = chain['pretrain']
  config = run_config(workdir)
  step = checkpoint_steps(workdir)[-1]
  assert step == config.train.steps
  logged = [r for r in evals(workdir, 'eval/true_kl') if r['step'] == step][0]

  lang = language.from_block(config.world)
  succ, logp = np.asarray(lang.succ), np.asarray(lang.logp, np.float64)
  table = np.zeros((lang.vocab_size, lang.vocab_size))  # P[prev, next], float64
  for s in range(lang.vocab_size):
    for k in range(succ.shape[1]):
      table[s, succ[s, k]] += np.exp(logp[s, k])
  params = read_state(os.path.join(workdir, 'checkpoints', str(step)))['params']
  model = Transformer(ModelConfig.from_config(config.model))
  forward = jax.jit(lambda tokens: model.apply(
      {'params': params}, tokens, segment_ids=jnp.ones_like(tokens),
      positions=jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  ).logits)

  source = WorldSource(world=config.world, seed=config.seed,
                       batch_size=config.train.batch_size, seq_len=config.train.seq_len)
  true_sum = model_sum = tokens = 0.0
  for batch in source.eval_batches(max_batches=config.train.eval_batches):
    rows = np.concatenate([batch.inputs[:, :1], batch.targets], axis=1)
    assert rows[:, 0].tolist() == [language.BOS_ID] * len(rows)
    prev, nxt = rows[:, :-1], rows[:, 1:]
    # A row's tokens after BOS up to its EOS (or the cut) are scored; PAD after EOS is not.
    # Every row is a prefix BOS x1 ... (EOS PAD ...), so the causal forward of each scored
    # column sees only real tokens, whatever the padding's segment.
    scored = nxt != language.PAD_ID
    with np.errstate(divide='ignore'):
      true_sum += np.log(table[prev, nxt])[scored].sum()
    z = np.asarray(forward(prev.astype(np.int32)), np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    lsm = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    model_sum += np.take_along_axis(lsm, nxt[..., None], axis=-1)[..., 0][scored].sum()
    tokens += scored.sum()
  assert np.isfinite(true_sum) and tokens > 1000
  assert logged['eval/true_kl'] == pytest.approx((true_sum - model_sum) / tokens, abs=1e-6)
  assert logged['eval/loss'] == pytest.approx(-model_sum / tokens, abs=1e-6)


def test_pretrain_tiny_as_documented(chain):
  """configs/pretrain.py: eval/true_kl ~2.8 nats/token at step 0, ~0.04 at step 300; the
  world's entropy rate 1.773 nats/token."""
  kl = evals(chain['pretrain'], 'eval/true_kl')
  assert (kl[0]['step'], kl[-1]['step']) == (0, 300)
  assert 2.5 < kl[0]['eval/true_kl'] < 3.1, kl[0]
  assert 0.03 < kl[-1]['eval/true_kl'] < 0.055, kl[-1]
  assert records(chain['pretrain'])[0]['world/entropy_rate'] == pytest.approx(1.773, abs=5e-4)


def test_sft_tiny_as_documented(chain):
  """configs/sft.py: policy/gold_reward from about -0.47 (the pretrained policy, step 0) to
  about 0.34 at step 300, below sft/demo_gold_reward (about 0.70), at a policy/kl_ref
  under 1 nat."""
  policy = evals(chain['sft'], 'policy/gold_reward')
  first, last = policy[0], policy[-1]
  assert (first['step'], last['step']) == (0, 300)
  assert abs(first['policy/kl_ref']) < 1e-4  # step 0 is the pretrained policy itself
  demo = evals(chain['sft'], 'sft/demo_gold_reward')[0]['sft/demo_gold_reward']
  assert -0.6 < first['policy/gold_reward'] < -0.35, first
  assert 0.25 < last['policy/gold_reward'] < 0.45, last
  assert 0.6 < demo < 0.8 and last['policy/gold_reward'] < demo
  assert 0.4 < last['policy/kl_ref'] < 1.0, last


def test_reward_model_tiny_noise_ceiling_as_documented(reward_run):
  """configs/reward_model.py: a noise ceiling near 0.93 (annotator temperature 0.1, a
  quarter of them in the minority group). The ceiling is a property of the held-out pairs
  and the annotators, not of training, so the fixture's 150-step run shows it; its
  rm/gold_accuracy (the docstring's is for 400 steps) is not checked here."""
  config = run_config(reward_run)
  assert config.annotators.temperature == 0.1
  assert config.annotators.minority_fraction == 0.25
  ceilings = {r['rm/noise_ceiling'] for r in evals(reward_run, 'rm/noise_ceiling')}
  assert len(ceilings) == 1  # the same held-out pairs at every eval
  assert 0.91 < ceilings.pop() < 0.95
