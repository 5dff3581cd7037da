"""Decoding speed: the KV-cached sampler against its floor and against full recomputation,
in the same run.

  python -m rlhf_jax.bench_sampling [--config=configs/pretrain.py:small] [--batch=64]
      [--prompt_len=32] [--new_tokens=128] [--cache_bucket=32] [--baseline_steps=3]

Three decoders run the same jitted loop on the same params (the config's model, freshly
initialised: speed does not depend on the weights) and world prompts: the cached one with
length buckets of `cache_bucket` steps (each step attends over the filled part of the
cache rounded up to its bucket), the cached one with a single bucket (every step reads all
prompt_len + new_tokens slots: the decoder before buckets), and full recomputation, whose
every step is a forward over the whole [batch, prompt + new_tokens] buffer and so costs
the same at every step; it runs `baseline_steps` steps. A decode step's time is (time of
new_tokens steps - time of the prefill alone) / new_tokens, each the best of two calls
after a separate compile. Its floor (rlhf_jax/decode_floor.py) is the step's matmuls
alone, timed in this run, plus the bytes of the filled cache at the read rate measured in
this run, averaged over the steps. Memory is XLA's static peak for each compiled decoder
(arguments + outputs + temporaries - aliased). Prints a table, then one JSON line.
"""
import json
import sys
import tempfile

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from rlhf_jax import decode_floor, sampling, sharding
from rlhf_jax.bench_common import measure, step_seconds, world_prompts
from rlhf_jax.cli import config_name, parse_flags_or_exit
from rlhf_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/pretrain.py:small',
                                          'Config file[:variant].', lock_config=True)
_BATCH = flags.DEFINE_integer('batch', 64, 'Prompts decoded together.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt length (tokens, BOS included).')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'New tokens per row.')
_BUCKET = flags.DEFINE_integer('cache_bucket', 32, 'Steps per length bucket (> 0).')
_BASELINE_STEPS = flags.DEFINE_integer('baseline_steps', 3,
                                       'Steps timed for the full-recompute decoder.')


def main():
  parse_flags_or_exit(sys.argv)
  from rlhf_jax.stages.pretrain import Setup
  config = _CONFIG.value
  try:
    if min(_BATCH.value, _PROMPT_LEN.value, _NEW.value, _BASELINE_STEPS.value,
           _BUCKET.value) <= 0:
      raise UserError('--batch, --prompt_len, --new_tokens, --cache_bucket and '
                      '--baseline_steps must be positive')
    if config.data.source != 'world':
      raise UserError('the sampling bench draws its prompts from the world (data.source=world)')
    with tempfile.TemporaryDirectory() as workdir:
      setup = Setup(config, workdir=workdir)
    samplers = {
        name: sampling.Sampler(
            model=setup.model, mesh=setup.mesh, mesh_config=config.mesh,
            param_shardings=setup.state_shardings.params,
            config=sampling.SampleConfig(max_new_tokens=_NEW.value, temperature=1.0,
                                         cache_bucket=bucket))
        for name, bucket in (('bucketed', _BUCKET.value), ('one_bucket', 0))}
    prompts, lengths = world_prompts(setup.source.world, _BATCH.value, _PROMPT_LEN.value)
    if _BATCH.value % samplers['bucketed'].dp:
      raise UserError(f'--batch={_BATCH.value} is not divisible by the data-parallel size '
                      f'{samplers["bucketed"].dp}')
    key = jax.random.key(0)
    params = setup.state.params
    with sharding.activate(setup.mesh, config.mesh):
      args = lambda steps: (params, prompts, lengths, key, np.int32(steps))
      runs = {name: measure(s._sample, args(_NEW.value), repeats=2)
              for name, s in samplers.items()}
      full = measure(samplers['bucketed']._sample_full, args(_BASELINE_STEPS.value))
      step_s = {name: step_seconds(m, args, _NEW.value) for name, m in runs.items()}
      matmul_s = decode_floor.matmul_step_seconds(params, setup.model.cfg, batch=_BATCH.value,
                                                  steps=_NEW.value)
      read_rate = decode_floor.read_bytes_per_second()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  steps = lambda m: int(np.asarray(m['out'].mask).any(axis=0).sum())
  if steps(runs['bucketed']) != _NEW.value:
    print(f'error: the batch stopped after {steps(runs["bucketed"])} of {_NEW.value} steps '
          '(every row emitted EOS); per-step figures need all of them', file=sys.stderr)
    sys.exit(2)
  cfg = setup.model.cfg
  mean_cache = float(np.mean([decode_floor.cache_bytes(cfg, batch=_BATCH.value,
                                                       filled=_PROMPT_LEN.value + i + 1)
                              for i in range(_NEW.value)]))
  floor_s = matmul_s + mean_cache / read_rate
  bytes_floor_s = (decode_floor.weight_bytes(params) + mean_cache) / read_rate
  # Rate = rows x decoding steps: the loop decodes every row at each step it runs.
  rate = lambda m: _BATCH.value * steps(m) / m['run_s']
  print(f'{"decoder":<16}{"steps":>7}{"compile s":>11}{"run s":>9}{"new tok/s":>11}'
        f'{"step ms":>9}{"/ floor":>9}{"peak MiB":>10}')
  for name, m in (*runs.items(), ('full_recompute', full)):
    step = step_s.get(name, m['run_s'] / steps(m))
    print(f'{name:<16}{steps(m):>7}{m["compile_s"]:>11.2f}{m["run_s"]:>9.2f}{rate(m):>11.1f}'
          f'{step * 1e3:>9.2f}{step / floor_s:>9.2f}{m["peak_bytes"] / 2**20:>10.1f}')
  print(f'floor: matmuls {matmul_s * 1e3:.2f} ms + filled cache {mean_cache / 2**20:.1f} MiB '
        f'at {read_rate / 2**30:.1f} GiB/s = {floor_s * 1e3:.2f} ms per step '
        f'(bytes alone, weights + cache: {bytes_floor_s * 1e3:.2f} ms)')
  figures = {
      'config': config_name(sys.argv),
      'devices': jax.device_count(), 'batch': _BATCH.value, 'prompt_len': _PROMPT_LEN.value,
      'new_tokens': _NEW.value, 'cache_bucket': _BUCKET.value,
      'kv_cache_tokens_per_s': round(rate(runs['bucketed']), 1),
      'kv_cache_compile_s': round(runs['bucketed']['compile_s'], 2),
      'kv_cache_peak_mib': round(runs['bucketed']['peak_bytes'] / 2**20, 1),
      'one_bucket_tokens_per_s': round(rate(runs['one_bucket']), 1),
      'one_bucket_compile_s': round(runs['one_bucket']['compile_s'], 2),
      'step_ms': round(step_s['bucketed'] * 1e3, 3),
      'one_bucket_step_ms': round(step_s['one_bucket'] * 1e3, 3),
      'floor_ms': round(floor_s * 1e3, 3), 'matmul_ms': round(matmul_s * 1e3, 3),
      'bytes_floor_ms': round(bytes_floor_s * 1e3, 3),
      'read_gib_per_s': round(read_rate / 2**30, 2),
      'step_over_floor': round(step_s['bucketed'] / floor_s, 2),
      'one_bucket_step_over_floor': round(step_s['one_bucket'] / floor_s, 2),
      'bucket_speedup': round(step_s['one_bucket'] / step_s['bucketed'], 2),
      'full_recompute_tokens_per_s': round(rate(full), 2),
      'full_recompute_compile_s': round(full['compile_s'], 2),
      'full_recompute_peak_mib': round(full['peak_bytes'] / 2**20, 1),
      'speedup': round(rate(runs['bucketed']) / rate(full), 1),
  }
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
