"""The benchmarks run from the CLI on `tiny` sizes and their JSON figures agree with an
independent count: train FLOPs per token from the layer shapes, decoded tokens from the
loop's steps, the collapse and self-play benches' ratios from their two timings (and the
self-play bench's two update schedules giving the same parameters)."""
import json
import subprocess
import sys

from conftest import REPO, cli_env


def run(module, *args):
  result = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=cli_env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) > 2  # a table, then the figures
  return json.loads(lines[-1])


def test_train_step_bench():
  f = run('rlhf_jax.bench', '--config=configs/pretrain.py:tiny', '--steps=3', '--matmul_n=512')
  # tiny: d 64, 2 layers, SwiGLU d_ff 256, world vocab 64, seq 64, batch 32.
  d, layers, ff, vocab, seq = 64, 2, 256, 64, 64
  flops_per_token = 6 * (layers * (4 * d * d + 3 * d * ff) + vocab * d) + 6 * layers * seq * d
  assert f['params'] == layers * (4 * d * d + 3 * d * ff + 2 * d) + 2 * vocab * d + d
  assert abs(f['tokens_per_s'] - 32 * seq / f['step_s']) <= 0.01 * f['tokens_per_s']
  mfu = flops_per_token * f['tokens_per_s'] / (f['matmul_peak_tflops_per_s'] * 1e12)
  assert abs(f['mfu'] - mfu) <= 0.01 * mfu + 1e-4


def test_sampling_bench():
  f = run('rlhf_jax.bench_sampling', '--config=configs/pretrain.py:tiny', '--batch=16',
          '--prompt_len=8', '--new_tokens=12', '--baseline_steps=2')
  assert abs(f['speedup'] - f['kv_cache_tokens_per_s'] / f['full_recompute_tokens_per_s']) \
      <= 0.06 + 0.01 * f['speedup']
  # The cache holds keys and values of 2 layers for 16 x (8 + 12) slots of 64 floats.
  cache_mib = 2 * 2 * 16 * 20 * 64 * 4 / 2**20
  assert f['kv_cache_peak_mib'] >= cache_mib


def test_collapse_bench():
  f = run('rlhf_jax.bench_collapse', '--seeds=2', '--generations=2', '--samples=64',
          '--repeats=1')
  assert f['seeds'] == 2 and f['generations'] == 2 and f['samples'] == 64
  assert f['one_seed_s'] > 0 and f['vmapped_s'] > 0 and f['sharded_s'] > 0
  assert abs(f['ratio'] - f['sharded_s'] / f['one_seed_s']) <= 1e-9 * f['ratio']
  assert abs(f['ratio_one_device'] - f['vmapped_s'] / f['one_seed_s']) <= 1e-9 * f['ratio']
  # One device per core of this host, as many as divide the seeds.
  import os
  assert f['devices'] == max(d for d in range(1, os.cpu_count() + 1) if 2 % d == 0)


def test_selfplay_update_bench():
  f = run('rlhf_jax.bench_selfplay', '--variant=tic_tac_toe', '--updates=3', '--repeats=1')
  assert f['variant'] == 'tic_tac_toe' and f['updates'] == 3 and f['batch_size'] == 256
  assert abs(f['ratio'] - f['scan_s'] / f['loop_s']) <= 1e-9 * f['ratio']
  # The two run the same updates on the same batches: equal parameters up to rounding.
  assert f['max_param_diff'] < 1e-5
