r"""True-KL learning curve of pretraining on the world, over seeds.

  python experiments/pretrain_true_kl.py --out=runs/true_kl --seeds=3 [--variant=tiny]

Runs `configs/pretrain.py:<variant>` once per seed through the CLI (each in its own workdir
under --out, so rerunning resumes or skips finished runs), then writes true_kl.csv and
true_kl.png (mean over seeds with a 95% t-interval band, and the world's entropy rate for
scale) and prints a table of eval/true_kl per eval step.
"""
import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def interval(values: np.ndarray) -> tuple[float, float]:
  """Mean and half-width of the 95% t-interval (0 for a single seed)."""
  mean = float(values.mean())
  if len(values) < 2:
    return mean, 0.0
  return mean, float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / len(values) ** .5)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='runs/true_kl')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--variant', default='tiny')
  parser.add_argument('overrides', nargs='*', help='extra --config.x=v flags for every run')
  args = parser.parse_args()

  curves, entropy = {}, None
  for seed in range(args.seeds):
    workdir = os.path.join(args.out, f'seed{seed}')
    cmd = [sys.executable, '-m', 'rlhf_jax.main', f'--config=configs/pretrain.py:{args.variant}',
           f'--workdir={workdir}', f'--config.seed={seed}', '--config.train.progress=False',
           *args.overrides]
    print('$', ' '.join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode:
      sys.exit(f'error: run for seed {seed} failed; see its output above')
    records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
    curves[seed] = {r['step']: r['eval/true_kl'] for r in records if 'eval/true_kl' in r}
    entropy = next(r['world/entropy_rate'] for r in records if 'world/entropy_rate' in r)

  steps = sorted(set.intersection(*(set(c) for c in curves.values())))
  table = np.array([[curves[s][step] for s in curves] for step in steps])
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'true_kl.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['step', *[f'seed{s}' for s in curves], 'mean', 'ci95'])
    for step, row in zip(steps, table):
      writer.writerow([step, *row, *interval(row)])

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  means, half = zip(*(interval(row) for row in table))
  means, half = np.array(means), np.array(half)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(steps, means, label=f'pretrain:{args.variant}, {len(curves)} seeds')
  ax.fill_between(steps, means - half, means + half, alpha=0.3, label='95% interval')
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_ylabel('eval/true_kl (nats/token)')
  ax.set_title(f'KL(true language || model); entropy rate {entropy:.3f} nats/token')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, 'true_kl.png'), dpi=120)

  print(f'\n{"step":>6}  {"true_kl mean":>12}  {"95% +-":>8}')
  for step, m, h in zip(steps, means, half):
    print(f'{step:>6}  {m:>12.4f}  {h:>8.4f}')
  print(json.dumps({'variant': args.variant, 'seeds': len(curves), 'entropy_rate': entropy,
                    'first_true_kl': means[0], 'final_true_kl': means[-1],
                    'ratio': means[-1] / means[0]}))


if __name__ == '__main__':
  main()
