"""Decoding speed: the KV-cached sampler against full recomputation, in the same run.

  python -m rlhf_jax.bench_sampling [--config=configs/pretrain.py:small] [--batch=64]
      [--prompt_len=32] [--new_tokens=128] [--baseline_steps=3]

Both decoders run the same jitted loop on the same params (the config's model, freshly
initialised: speed does not depend on the weights) and world prompts. The cached one
decodes all `new_tokens` steps; the full-recompute one, whose every step is a forward over
the whole [batch, prompt + new_tokens] buffer and so costs the same at every step, runs
`baseline_steps` steps. Rates are new tokens (rows x steps) per second of steady-state
time, after a separate compile. Memory is XLA's static peak for each compiled decoder
(arguments + outputs + temporaries - aliased). Prints a table, then one JSON line.
"""
import json
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from rlhf_jax import sampling, sharding
from rlhf_jax.cli import config_name, parse_flags_or_exit
from rlhf_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/pretrain.py:small',
                                          'Config file[:variant].', lock_config=True)
_BATCH = flags.DEFINE_integer('batch', 64, 'Prompts decoded together.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt length (tokens, BOS included).')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'New tokens per row.')
_BASELINE_STEPS = flags.DEFINE_integer('baseline_steps', 3,
                                       'Steps timed for the full-recompute decoder.')


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def measure(fn, args) -> dict:
  """Compile once (timed apart), then time one steady-state call."""
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(*args))  # warm: first-call allocations
  t = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return {'compile_s': compile_s, 'run_s': time.perf_counter() - t, 'out': out,
          'peak_bytes': peak_bytes(compiled)}


def world_prompts(setup, rows: int, length: int):
  """Prefixes of true sequences, BOS included, at most `length` tokens."""
  from rlhf_jax.world import language
  seqs = np.asarray(language.sample(setup.source.world, key=jax.random.key(1),
                                    batch_size=rows, seq_len=length))
  return sampling.left_pad([[int(t) for t in row if t > 2 or t == 1][:length] for row in seqs],
                           length=length)


def main():
  parse_flags_or_exit(sys.argv)
  from rlhf_jax.stages.pretrain import Setup
  config = _CONFIG.value
  try:
    if min(_BATCH.value, _PROMPT_LEN.value, _NEW.value, _BASELINE_STEPS.value) <= 0:
      raise UserError('--batch, --prompt_len, --new_tokens and --baseline_steps must be positive')
    if config.data.source != 'world':
      raise UserError('the sampling bench draws its prompts from the world (data.source=world)')
    with tempfile.TemporaryDirectory() as workdir:
      setup = Setup(config, workdir=workdir)
    sample_config = sampling.SampleConfig(max_new_tokens=_NEW.value, temperature=1.0)
    sampler = sampling.Sampler(model=setup.model, config=sample_config, mesh=setup.mesh,
                               mesh_config=config.mesh,
                               param_shardings=setup.state_shardings.params)
    prompts, lengths = world_prompts(setup, _BATCH.value, _PROMPT_LEN.value)
    if _BATCH.value % sampler.dp:
      raise UserError(f'--batch={_BATCH.value} is not divisible by the data-parallel size '
                      f'{sampler.dp}')
    key = jax.random.key(0)
    with sharding.activate(setup.mesh, config.mesh):
      args = lambda steps: (setup.state.params, prompts, lengths, key, np.int32(steps))
      cached = measure(sampler._sample, args(_NEW.value))
      full = measure(sampler._sample_full, args(_BASELINE_STEPS.value))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  # Rate = rows x decoding steps: the loop decodes every row at each step it runs.
  steps = lambda m: int(np.asarray(m['out'].mask).any(axis=0).sum())
  cached_rate = _BATCH.value * steps(cached) / cached['run_s']
  full_rate = _BATCH.value * steps(full) / full['run_s']
  print(f'{"decoder":<16}{"steps":>7}{"compile s":>11}{"run s":>9}{"new tok/s":>11}'
        f'{"peak MiB":>10}')
  for name, m, rate in (('kv_cache', cached, cached_rate), ('full_recompute', full, full_rate)):
    print(f'{name:<16}{steps(m):>7}{m["compile_s"]:>11.2f}{m["run_s"]:>9.2f}{rate:>11.1f}'
          f'{m["peak_bytes"] / 2**20:>10.1f}')
  figures = {
      'config': config_name(sys.argv),
      'devices': jax.device_count(), 'batch': _BATCH.value, 'prompt_len': _PROMPT_LEN.value,
      'new_tokens': _NEW.value,
      'kv_cache_tokens_per_s': round(cached_rate, 1),
      'kv_cache_compile_s': round(cached['compile_s'], 2),
      'kv_cache_peak_mib': round(cached['peak_bytes'] / 2**20, 1),
      'full_recompute_tokens_per_s': round(full_rate, 2),
      'full_recompute_compile_s': round(full['compile_s'], 2),
      'full_recompute_peak_mib': round(full['peak_bytes'] / 2**20, 1),
      'speedup': round(cached_rate / full_rate, 1),
  }
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
