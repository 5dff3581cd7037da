"""The benchmarks run from the CLI on `tiny` sizes, print a table and then one JSON object
of their figures, and the figures that have an independent reference agree with it:
parameters and train FLOPs per token from the layer shapes, the sampling bench's decoding
steps from its flags and its KV cache from the cache's shape, the collapse bench's device
count from the host, the self-play bench's two update schedules giving the same
parameters. Timings and their ratios have none (benchmarks are not timed tests): only
their presence and sign are checked."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env

pytestmark = pytest.mark.slow  # each test runs a benchmark end to end


def run(module, *args):
  result = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=cli_env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) > 2  # a table, then the figures
  return json.loads(lines[-1])


def run_with_table(module, *args):
  """(figures, the table's rows as lists of whitespace-separated cells)."""
  result = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=cli_env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  return json.loads(lines[-1]), [line.split() for line in lines[:-1]]


def positive_timings(figures, names):
  for name in names:
    assert isinstance(figures[name], float) and figures[name] > 0, name


def test_train_step_bench():
  f = run('rlhf_jax.bench', '--config=configs/pretrain.py:tiny', '--steps=3', '--matmul_n=512')
  # tiny: d 64, 2 layers, SwiGLU d_ff 256, world vocab 64, seq 64, batch 32.
  d, layers, ff, vocab, seq = 64, 2, 256, 64, 64
  flops_per_token = 6 * (layers * (4 * d * d + 3 * d * ff) + vocab * d) + 6 * layers * seq * d
  assert f['params'] == layers * (4 * d * d + 3 * d * ff + 2 * d) + 2 * vocab * d + d
  assert abs(f['tokens_per_s'] - 32 * seq / f['step_s']) <= 0.01 * f['tokens_per_s']
  mfu = flops_per_token * f['tokens_per_s'] / (f['matmul_peak_tflops_per_s'] * 1e12)
  assert abs(f['mfu'] - mfu) <= 0.01 * mfu + 1e-4
  if f['torch'] == 'not installed':
    assert 'vs_torch_eager' not in f
  else:  # the PyTorch eager step of the same model, timed in the same run
    assert f['torch'].endswith('eager')
    ratio = f['tokens_per_s'] / f['torch_tokens_per_s']
    assert abs(f['vs_torch_eager'] - ratio) <= 0.01 * ratio
    assert abs(f['torch_tokens_per_s'] - 32 * seq / f['torch_step_s']) <= 0.01 * f[
        'torch_tokens_per_s']


def test_sampling_bench():
  f, table = run_with_table('rlhf_jax.bench_sampling', '--config=configs/pretrain.py:tiny',
                            '--batch=16', '--prompt_len=8', '--new_tokens=12',
                            '--cache_bucket=4', '--baseline_steps=2')
  assert (f['batch'], f['prompt_len'], f['new_tokens'], f['cache_bucket']) == (16, 8, 12, 4)
  positive_timings(f, ('kv_cache_tokens_per_s', 'full_recompute_tokens_per_s',
                       'kv_cache_compile_s', 'full_recompute_compile_s', 'speedup',
                       'one_bucket_tokens_per_s', 'matmul_ms', 'read_gib_per_s'))
  # Decoding steps run: the full-recompute baseline stops after --baseline_steps=2; both
  # cached decoders run all --new_tokens=12 (the bench refuses a batch that stopped early).
  steps = {row[0]: int(row[1]) for row in table
           if row and row[0] in ('bucketed', 'one_bucket', 'full_recompute')}
  assert steps == {'bucketed': 12, 'one_bucket': 12, 'full_recompute': 2}
  # The cache holds keys and values of 2 layers for 16 x (8 + 12) slots of 64 floats.
  cache_mib = 2 * 2 * 16 * 20 * 64 * 4 / 2**20
  assert f['kv_cache_peak_mib'] >= cache_mib
  # The floor: matmuls plus the mean filled cache (8 + i + 1 slots at step i) at the
  # measured read rate, recomputed from the figures.
  mean_bytes = np.mean([2 * 2 * 16 * (8 + i + 1) * 64 * 4 for i in range(12)])
  want = f['matmul_ms'] + mean_bytes / (f['read_gib_per_s'] * 2**30) * 1e3
  assert abs(f['floor_ms'] - want) <= 0.01 * want + 1e-3
  assert f['step_over_floor'] == pytest.approx(f['step_ms'] / f['floor_ms'], rel=0.02)


def test_ragged_bench():
  f, table = run_with_table('rlhf_jax.bench_ragged', '--config=configs/pretrain.py:tiny',
                            '--prompts=64', '--slots=16', '--refill=4', '--prompt_len=8',
                            '--new_tokens=32')
  assert (f['prompts'], f['slots'], f['refill'], f['new_tokens']) == (64, 16, 4, 32)
  positive_timings(f, ('static_tokens_per_s', 'continuous_tokens_per_s', 'speedup'))
  # The stopping rate solves E[min(L, 32)] = 8 for geometric L, here in closed form.
  p = f['stop_probability']
  assert (1 - (1 - p) ** 32) / p == pytest.approx(8.0, rel=1e-6)
  # The model emits EOS at that rate: 64 capped geometric lengths (sd about 7) average
  # 8 within 4 standard errors.
  assert abs(f['mean_length'] - 8.0) < 4 * 7 / 8
  rows = {row[0]: row for row in table if row and row[0] in ('static', 'continuous')}
  assert float(rows['continuous'][4]) == pytest.approx(f['mean_length'], abs=0.05)
  assert int(rows['continuous'][2]) == round(f['mean_length'] * 64)
  assert f['speedup'] == pytest.approx(
      f['continuous_tokens_per_s'] / f['static_tokens_per_s'], rel=0.02)


def test_collapse_bench():
  f = run('rlhf_jax.bench_collapse', '--seeds=2', '--generations=2', '--samples=64',
          '--repeats=1')
  assert f['seeds'] == 2 and f['generations'] == 2 and f['samples'] == 64
  positive_timings(f, ('one_seed_s', 'vmapped_s', 'sharded_s', 'ratio', 'ratio_one_device'))
  # One device per core of this host, as many as divide the seeds.
  import os
  assert f['devices'] == max(d for d in range(1, os.cpu_count() + 1) if 2 % d == 0)


def test_selfplay_update_bench():
  f = run('rlhf_jax.bench_selfplay', '--variant=tic_tac_toe', '--updates=3', '--repeats=1')
  assert f['variant'] == 'tic_tac_toe' and f['updates'] == 3 and f['batch_size'] == 256
  positive_timings(f, ('scan_s', 'loop_s', 'ratio'))
  # The two run the same updates on the same batches: equal parameters up to rounding.
  assert f['max_param_diff'] < 1e-5


def test_rl_iteration_bench():
  f, table = run_with_table('rlhf_jax.bench_rl', '--size=configs/pretrain.py:tiny',
                            '--batch=16', '--prompt_len=8', '--new_tokens=16',
                            '--continuous_slots=4', '--mean_fraction=0.25')
  assert (f['batch'], f['prompt_len'], f['new_tokens'], f['value']) == (16, 8, 16, 'head')
  assert (f['continuous_slots'], f['mean_fraction']) == (4, 0.25)
  positive_timings(f, ('rollout_continuous_s',))
  ratio = f['rollout_s'] / f['rollout_continuous_s']
  assert f['rollout_continuous_speedup'] == pytest.approx(ratio, rel=0.01, abs=0.01)
  parts = ('rollout', 'learner_forward', 'reference_log_probs', 'reward_model', 'updates')
  positive_timings(f, tuple(f'{k}_s' for k in parts) + ('step_s', 'rollout_one_bucket_s'))
  # The shares are each phase over their sum.
  assert sum(f[f'{k}_share'] for k in parts) == pytest.approx(1.0, abs=0.005)
  assert f['phases_s'] == pytest.approx(sum(f[f'{k}_s'] for k in parts), abs=5e-4)
  # 16 rollouts of at most 16 tokens, a quarter of them on average (geometric lengths).
  assert 16 <= f['response_tokens'] <= 16 * 16 * 0.6
  # The compiled step holds at least the learner's AdamW state: params and two moments of
  # the tiny policy (139,584 parameters: test_train_step_bench's count) and its value head.
  assert f['step_peak_mib'] >= 3 * 139_584 * 4 / 2**20
  rows = [row[0] for row in table if row]
  assert 'rollout' in rows and 'updates' in rows
