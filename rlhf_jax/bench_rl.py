"""Where a PPO iteration goes: rollout, scoring, reference log-probs and updates, timed
apart and as the one compiled step, with XLA's peak memory of each, in the same run.

  python -m rlhf_jax.bench_rl [--config=configs/ppo.py:tiny] [--size=configs/pretrain.py:small]
      [--batch=64] [--prompt_len=32] [--new_tokens=128] [--continuous_slots=16]
      [--mean_fraction=0]

The PPO settings (epochs, minibatches, value: head | critic, optimiser) are --config's;
the model and world are --size's. Policy, reference, reward model (one member, the
'last' pooling) and critic (with ppo.value='critic') are that model freshly initialised:
speed does not depend on the weights, and a fresh model emits EOS about once in V tokens,
so nearly every rollout runs all new_tokens steps (the worst case of a real one);
--mean_fraction > 0 gives the policy bench_ragged's known stopping rate instead (geometric
lengths with that mean fraction of new_tokens). The phases, each its own jitted program on
the same inputs, as train/ppo_step.py runs them:

  rollout      the policy's cached sampler, length buckets on (cache_bucket 32), and the
               same with one bucket (every step reads the whole cache: the sampler before
               issue 25's buckets), and through --continuous_slots cache rows by
               continuous batching (ppo.continuous_slots; ppo_step.sample_rollouts);
  learner      the policy (+ value) forward that gives log pi_old and V_old;
  reference    the reference's teacher-forced log-probs (sampling.score);
  reward       the reward model's score of each response;
  update       epochs x minibatches PPO updates (ppo_update.update).

`step` is the whole ppo_step.train_step compiled as the stage compiles it. Each time is the
best of two calls after a separate compile; memory is XLA's static peak (arguments +
outputs + temporaries - aliased). `step` samples as the stage does by default (static,
buckets). Prints a table, then one JSON line.
"""
import dataclasses
import functools
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from rlhf_jax import sampling
from rlhf_jax.bench_common import measure, stop_probability, with_stopping_rate, world_prompts
from rlhf_jax.cli import config_name, parse_flags_or_exit
from rlhf_jax.errors import UserError
from rlhf_jax.models import policy_value, reward_model
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.train import ppo_step, ppo_update
from rlhf_jax.train.state import make_optimizer, make_schedule
from rlhf_jax.world import setup as world_setup

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/ppo.py:tiny',
                                          'PPO config file[:variant].', lock_config=True)
_SIZE = config_flags.DEFINE_config_file('size', 'configs/pretrain.py:small',
                                        'Config whose model and world blocks are used.',
                                        lock_config=True)
_BATCH = flags.DEFINE_integer('batch', 64, 'Prompts per PPO step.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt length (tokens, BOS included).')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'New tokens per rollout.')
_SLOTS = flags.DEFINE_integer('continuous_slots', 16, 'Cache rows of the continuous rollout.')
_FRACTION = flags.DEFINE_float('mean_fraction', 0.0, 'Mean response length / new_tokens of '
                               'the policy (0: a fresh model, nearly no EOS).')


def main():
  parse_flags_or_exit(sys.argv)
  config, size = _CONFIG.value, _SIZE.value
  try:
    if min(_BATCH.value, _PROMPT_LEN.value, _NEW.value) <= 0:
      raise UserError('--batch, --prompt_len and --new_tokens must be positive')
    if not 0 < _SLOTS.value <= _BATCH.value or not 0 <= _FRACTION.value < 1:
      raise UserError('--continuous_slots must be in [1, --batch] and --mean_fraction in '
                      '[0, 1)')
    if config.get('stage') != 'ppo':
      raise UserError(f'--config must be a PPO config; it is a {config.get("stage")!r} one')
    p = config.ppo
    if _BATCH.value % p.minibatches:
      raise UserError(f'--batch={_BATCH.value} is not divisible by ppo.minibatches='
                      f'{p.minibatches}')
    if size.data.source != 'world':
      raise UserError('--size must be a config on the world (data.source=world)')
    with config.unlocked(), size.unlocked():
      config.world = size.world
      size.model.vocab_size = size.world.vocab_size  # as the pretrain stage resolves it
    figures, table = run(config, ModelConfig.from_config(size.model))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'{"phase":<22}{"compile s":>11}{"run s":>9}{"share":>8}{"peak MiB":>10}')
  for name, m, share in table:
    print(f'{name:<22}{m["compile_s"]:>11.2f}{m["run_s"]:>9.3f}{share:>8.2f}'
          f'{m["peak_bytes"] / 2**20:>10.1f}')
  figures.update(config=config_name(sys.argv, 'configs/ppo.py:tiny'),
                 size=_size_name(sys.argv))
  print(json.dumps(figures))


def _size_name(argv) -> str:
  for a in argv:
    if a.startswith('--size='):
      return a.split('=', 1)[1]
  return 'configs/pretrain.py:small'


def run(config, cfg: ModelConfig):
  p = config.ppo
  b, plen, n = _BATCH.value, _PROMPT_LEN.value, _NEW.value
  lm = Transformer(cfg)
  learner = policy_value.PolicyValue(cfg, p.value)
  rm = reward_model.ensemble(cfg, 1, 'last')
  key = jax.random.key(config.seed)
  dummy = np.ones((1, 8), np.int32)
  lm_params = nn.meta.unbox(lm.init(key, dummy, segment_ids=dummy, positions=dummy)['params'])
  if _FRACTION.value:
    lm_params = with_stopping_rate(lm_params, cfg, p=stop_probability(_FRACTION.value, n),
                                   eos_id=sampling.SampleConfig(max_new_tokens=n).eos_id)
  params = nn.meta.unbox(policy_value.init_params(learner)(jax.random.fold_in(key, 1)))
  params['policy'] = lm_params
  if 'critic' in params:
    params['critic'] = lm_params
  rm_params = nn.meta.unbox(reward_model.init_params(rm)(jax.random.fold_in(key, 2)))
  updates = p.epochs * p.minibatches
  tx, schedule = make_optimizer(config.optim, updates), make_schedule(config.optim, updates)
  world = world_setup.from_config(config)
  prompts, lengths = world_prompts(world.lang, b, plen)
  rm_norm = ppo_step.RewardNorm(mean=jnp.zeros((1,)), scale=jnp.ones((1,)))
  step_config = ppo_step.StepConfig(
      reward='rm', no_eos_penalty=p.no_eos_penalty, kl_control=p.kl_control,
      kl_target=p.kl_target, kl_horizon=p.kl_horizon, max_new_tokens=n,
      ppo=ppo_update.PPOConfig.from_config(p))
  state = ppo_step.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.fold_in(key, 3)),
                            kl_coef=jnp.float32(p.kl_coef))
  frozen = ppo_step.Frozen(ref_params=lm_params, rm_params=rm_params, rm_norm=rm_norm,
                           gold=world.gold)
  batch = ppo_step.PromptBatch(prompts=jnp.asarray(prompts),
                               prompt_lengths=jnp.asarray(lengths))

  phases = {}
  for name, bucket in (('rollout', 32), ('rollout, one bucket', 0)):
    sample = jax.jit(functools.partial(sampling.sample, model=lm, config=sampling.SampleConfig(
        max_new_tokens=n, cache_bucket=bucket)))
    phases[name] = measure(sample, (lm_params, batch.prompts, batch.prompt_lengths, key),
                           repeats=2)
  continuous = jax.jit(functools.partial(ppo_step.sample_rollouts, model=lm, config=(
      dataclasses.replace(step_config, continuous_slots=_SLOTS.value))))
  phases['rollout, continuous'] = measure(
      continuous, (lm_params, batch.prompts, batch.prompt_lengths, key), repeats=2)
  out = phases['rollout']['out']
  response, mask = out.response, out.mask
  inputs = (ppo_step.sequence_inputs(batch.prompts, batch.prompt_lengths, response), response)
  apply_fn = ppo_step.make_apply(learner, prompt_len=plen)
  phases['learner forward'] = measure(jax.jit(apply_fn), (params, inputs), repeats=2)
  logp, values, _ = phases['learner forward']['out']
  score = jax.jit(functools.partial(sampling.score, model=lm))
  phases['reference log-probs'] = measure(
      score, (lm_params, batch.prompts, batch.prompt_lengths, response), repeats=2)
  reward = jax.jit(functools.partial(ppo_step.proxy_reward, rm_model=rm))
  phases['reward model'] = measure(
      reward, (rm_params, rm_norm, batch.prompts, batch.prompt_lengths, response, mask),
      repeats=2)
  rollout = ppo_update.Rollout(inputs=inputs, mask=mask, logp=logp * mask,
                               ref_logp=phases['reference log-probs']['out'] * mask,
                               values=values * mask, score=phases['reward model']['out'])
  update = jax.jit(lambda params, opt_state, rollout, key, kl_coef: ppo_update.update(
      params, opt_state, rollout, key, apply_fn=apply_fn, tx=tx, config=step_config.ppo,
      kl_coef=kl_coef))
  phases['updates'] = measure(update, (params, state.opt_state, rollout, key,
                                       jnp.float32(p.kl_coef)), repeats=2)
  step = jax.jit(functools.partial(ppo_step.train_step, model=learner, lm=lm, rm_model=rm,
                                   tx=tx, schedule=schedule, config=step_config))
  whole = measure(step, (state, frozen, batch), repeats=2)

  parts = ('rollout', 'learner forward', 'reference log-probs', 'reward model', 'updates')
  total = sum(phases[k]['run_s'] for k in parts)
  table = [(k, phases[k], phases[k]['run_s'] / total) for k in parts]
  table.append(('rollout, one bucket', phases['rollout, one bucket'],
                phases['rollout, one bucket']['run_s'] / total))
  table.append(('rollout, continuous', phases['rollout, continuous'],
                phases['rollout, continuous']['run_s'] / total))
  table.append(('step (one program)', whole, whole['run_s'] / total))
  key_of = lambda k: k.split(',')[0].replace(' ', '_').replace('-', '_')
  figures = {'batch': b, 'prompt_len': plen, 'new_tokens': n, 'value': p.value,
             'epochs': p.epochs, 'minibatches': p.minibatches,
             'response_tokens': int(np.asarray(mask).sum()),
             **{f'{key_of(k)}_s': round(phases[k]['run_s'], 4) for k in parts},
             **{f'{key_of(k)}_share': round(phases[k]['run_s'] / total, 3) for k in parts},
             'rollout_one_bucket_s': round(phases['rollout, one bucket']['run_s'], 4),
             'rollout_bucket_speedup': round(phases['rollout, one bucket']['run_s']
                                             / phases['rollout']['run_s'], 2),
             'continuous_slots': _SLOTS.value, 'mean_fraction': _FRACTION.value,
             'rollout_continuous_s': round(phases['rollout, continuous']['run_s'], 4),
             'rollout_continuous_speedup': round(phases['rollout']['run_s']
                                                 / phases['rollout, continuous']['run_s'], 2),
             'phases_s': round(total, 4), 'step_s': round(whole['run_s'], 4),
             'step_compile_s': round(whole['compile_s'], 2),
             'step_peak_mib': round(whole['peak_bytes'] / 2**20, 1),
             'rollout_peak_mib': round(phases['rollout']['peak_bytes'] / 2**20, 1),
             'updates_peak_mib': round(phases['updates']['peak_bytes'] / 2**20, 1)}
  return figures, table


if __name__ == '__main__':
  main()
