"""Train-step throughput and MFU, against the matmul peak measured in the same run.

  python -m rlhf_jax.bench --config=configs/pretrain.py:small [--steps=10] [--config.x=...]

MFU = model FLOPs per second (ModelConfig.flops_per_token * tokens/s) divided by the FLOP/s
of a large float32 matmul timed on the same device in the same process, so the ratio holds
on a noisy or throttled machine where absolute seconds would not. Prints a table, then one
JSON line of the figures.

With PyTorch importable (never a dependency) and `--torch` (the default), the same run
also times the PyTorch eager step of the same model from the same initial weights
(rlhf_jax/bench_torch.py) on the same tokens, one of its steps after each of ours, and
reports `vs_torch_eager`: our tokens/s over its tokens/s, each framework's MFU against its
own matmul peak. Without torch the
figures say `torch: not installed`.
"""
import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from rlhf_jax import bench_torch, sharding
from rlhf_jax.cli import config_name, parse_flags_or_exit
from rlhf_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/pretrain.py:small',
                                          'Config file[:variant].', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 8, 'Timed train steps (after compilation).')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time the PyTorch eager step when torch '
                           'imports (rlhf_jax/bench_torch.py).')
_MATMUL_N = flags.DEFINE_integer('matmul_n', 2048, 'Size of the square peak-FLOP/s matmul.')


def _best_time(fn, reps: int) -> float:
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def matmul_peak(n: int, reps: int = 5) -> float:
  """FLOP/s of an n x n float32 matmul chain: the device's practical matmul peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(mm(a, b))
  return 2.0 * n ** 3 / _best_time(lambda: mm(a, b), reps)


def step_time(setup, steps: int, other=None) -> tuple[float, float, float | None]:
  """(compile + first step seconds, median seconds per step over `steps` steps, and the
  median seconds of `other()` (a step of another framework, or None), called after each of
  ours, so that both see the same machine: a load that comes and goes slows both alike)."""
  state = setup.state
  batches = [setup.put_batch(b) for b in setup.bench_batches]
  t = time.perf_counter()
  state, m = setup.step(state, batches[0])
  jax.block_until_ready(m)
  first = time.perf_counter() - t
  if other is not None:
    other()  # its warm-up
  times, other_times = [], []
  for i in range(steps):
    t = time.perf_counter()
    state, m = setup.step(state, batches[i % 2])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
    if other is not None:
      t = time.perf_counter()
      other()
      other_times.append(time.perf_counter() - t)
  return first, float(np.median(times)), (float(np.median(other_times)) if other_times
                                          else None)


def torch_skip(model) -> str:
  """'' when the PyTorch comparison runs, else why not (shown as the `torch` figure)."""
  if not _TORCH.value:
    return 'off (--notorch)'
  if not bench_torch.available():
    return 'not installed'
  if jax.process_count() > 1 or jax.device_count() > 1:
    return 'skipped: one device only'
  why = bench_torch.unsupported(model)
  return f'skipped: no PyTorch mirror of {why}' if why else ''


def main():
  parse_flags_or_exit(sys.argv)
  from rlhf_jax.stages.pretrain import Setup
  config = _CONFIG.value
  torch = {}
  try:
    with tempfile.TemporaryDirectory() as workdir:
      setup = Setup(config, workdir=workdir)
      setup.bench_batches = [setup.source.next_batch() for _ in range(2)]
      why_not = torch_skip(setup.model.cfg)
      torch_step = None
      if not why_not:
        b = setup.bench_batches[0]
        tokens = np.concatenate([b.inputs, b.targets[:, -1:]], axis=1)
        torch_step = bench_torch.train_step(setup.model.cfg, jax.device_get(setup.state.params),
                                            tokens, config.optim)
      with sharding.activate(setup.mesh, config.mesh):
        peak_before = matmul_peak(_MATMUL_N.value)
        compile_s, step_s, torch_s = step_time(setup, _STEPS.value, torch_step)
        peak_after = matmul_peak(_MATMUL_N.value)
      if torch_step is not None:
        torch = {'torch_step_s': torch_s, **bench_torch.describe(_MATMUL_N.value)}
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  peak = max(peak_before, peak_after)
  model = setup.model.cfg
  tokens = config.train.batch_size * config.train.seq_len
  tokens_per_s = tokens / step_s
  model_flops = model.flops_per_token(config.train.seq_len) * tokens_per_s
  figures = {
      'config': config_name(sys.argv),
      'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind,
      'params': model.num_params(),
      'batch_size': config.train.batch_size,
      'seq_len': config.train.seq_len,
      'dtype': model.dtype,
      'compile_s': round(compile_s, 2),
      'step_s': round(step_s, 4),
      'tokens_per_s': round(tokens_per_s, 1),
      'model_tflops_per_s': round(model_flops / 1e12, 4),
      'matmul_peak_tflops_per_s': round(peak / 1e12, 4),
      'mfu': round(model_flops / peak, 4),
  }
  if torch:
    torch_tokens = tokens / torch['torch_step_s']
    figures.update({
        'torch': torch['torch'], 'torch_threads': torch['torch_threads'],
        'torch_step_s': round(torch['torch_step_s'], 4),
        'torch_tokens_per_s': round(torch_tokens, 1),
        'torch_matmul_peak_tflops_per_s': round(torch['torch_matmul_peak'] / 1e12, 4),
        'torch_mfu': round(model.flops_per_token(config.train.seq_len) * torch_tokens
                           / torch['torch_matmul_peak'], 4),
        'vs_torch_eager': round(tokens_per_s / torch_tokens, 3)})
  else:
    figures['torch'] = why_not
  width = max(len(k) for k in figures)
  print(f'{"figure":<{width}}  value')
  for key, value in figures.items():
    print(f'{key:<{width}}  {value}')
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
