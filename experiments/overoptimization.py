r"""Reward over-optimisation against the gold reward (Gao et al. 2022): PPO at several KL
penalties and best-of-n for several n, against a reward model trained on labels of
annotators who like length; gold and proxy reward against d = sqrt(KL to the SFT policy).

  python experiments/overoptimization.py --sft_run=runs/sft_tiny --out=runs/overoptimization

1. A reward model (configs/reward_model.py:tiny) from the SFT run on labels of annotators
   with a per-token liking for length (--length_bias) in a world whose gold reward
   mildly dislikes it (--gold_length per token), in OUT/rm. PPO and best-of-n take the
   gold reward from this run, so every gold figure below includes that length term.
2. PPO (configs/ppo.py:tiny, --ppo_steps iterations) against it at each --kl_coefs beta,
   in OUT/ppo_beta<beta>; every eval point (policy/kl_ref, policy/gold_reward,
   policy/proxy_reward on the fixed eval prompts) is a point of the RL curve.
3. Best-of-n against it (experiments/best_of_n.py, as a subprocess), in OUT/best_of_n;
   d = sqrt(log n - (n-1)/n).
4. Least-squares fits of the gold-reward gain over the SFT policy, Gao et al.'s forms:
   best-of-n d (a - b d), RL d (a - b log d); coefficients and R^2.

Every stage resumes where it stopped (rerun the same command). Writes OUT/points.csv,
OUT/fits.csv and OUT/overoptimization.png, prints the tables and, last, a JSON line.
Runtime on a 2-core CPU with the defaults: 4 minutes (reward model 400 steps, best-of-n,
4 PPO runs of 100 iterations). Measured with the defaults (one seed; d = sqrt(KL nats)):
  - PPO at beta 0.005: gold 0.184 (SFT) -> 0.571 at d 6.5, then down to 0.164 at d 12.1
    while the proxy keeps rising (4.07 -> 6.07); the larger betas stop near their gold
    peak (0.52 at d 1.8 for beta 0.2; 0.66-0.70 at d 4.3-7 for beta 0.05 and 0.02).
  - Gao et al.'s RL form fits each beta's gold curve with R^2 0.96-0.98 (beta 0.005:
    a 0.222, b 0.090, peak at d 4.4); all betas pooled, R^2 0.84.
  - Best-of-n up to n = 64 (d 1.8): gold 0.230 -> 0.502, still rising; proxy 0.10 -> 2.65.
With --length_bias=0.05 --gold_length=-0.02 the reward model's length preference is so
strong that best-of-n loses gold from n = 2 on (0.081 -> -0.325 at n = 64) and PPO's gold
peaks at d 3.5 (0.27) and ends below the SFT policy.
"""
import csv
import json
import math
import os
import subprocess
import sys
import time

from absl import app, flags, logging
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax.errors import UserError
from rlhf_jax.stages import dispatch
from rlhf_jax.train import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SFT = flags.DEFINE_string('sft_run', 'runs/sft_tiny', 'SFT run: policy and reference.')
_OUT = flags.DEFINE_string('out', 'runs/overoptimization', 'Output directory.')
_LENGTH = flags.DEFINE_float('length_bias', 0.02, "Annotators' per-token liking for length.")
_GOLD_LENGTH = flags.DEFINE_float('gold_length', -0.01, "The gold reward's per-token length "
                                  'term (negative: the truth dislikes padding).')
_BETAS = flags.DEFINE_list('kl_coefs', ['0.2', '0.05', '0.02', '0.005'], 'PPO KL penalties.')
_STEPS = flags.DEFINE_integer('ppo_steps', 100, 'PPO iterations per beta.')
_EVALS = flags.DEFINE_integer('evals', 5, 'Eval points per PPO run (besides step 0).')
_NS = flags.DEFINE_list('ns', ['1', '2', '4', '8', '16', '32', '64'], 'Best-of-n values of n.')


def stage_config(name: str, variant: str = 'tiny'):
  return config_lib.load_named(name, variant)


def betas() -> list[float]:
  try:
    values = [float(b) for b in _BETAS.value]
  except ValueError:
    raise UserError(f'--kl_coefs={",".join(_BETAS.value)} must be numbers') from None
  if not values or min(values) < 0:
    raise UserError('--kl_coefs must be non-negative numbers')
  return values


def train_reward_model(out: str) -> str:
  config = stage_config('reward_model')
  config.init.run = os.path.abspath(_SFT.value)
  config.annotators.length_bias = _LENGTH.value
  config.reward.length = _GOLD_LENGTH.value
  config.train.progress = False
  workdir = os.path.join(out, 'rm')
  dispatch.run(config, workdir)
  return workdir


def train_ppo(out: str, rm: str, beta: float) -> list[dict]:
  """The PPO run's eval points: (kl, gold, proxy) at step 0 and every eval."""
  config = stage_config('ppo')
  config.init.run = os.path.abspath(_SFT.value)
  config.ppo.update(rm_run=rm, kl_coef=beta)
  config.train.update(steps=_STEPS.value, eval_every=max(_STEPS.value // _EVALS.value, 1),
                      ckpt_every=max(_STEPS.value // _EVALS.value, 1), progress=False)
  workdir = os.path.join(out, f'ppo_beta{beta:g}')
  dispatch.run(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [r for r in map(json.loads, f) if 'policy/gold_reward' in r]
  return [{'method': 'ppo', 'setting': f'beta={beta:g}', 'step': r['step'],
           'kl': max(r['policy/kl_ref'], 0.0), 'gold': r['policy/gold_reward'],
           'gold_se': r['policy/gold_reward_se'], 'proxy': r['policy/proxy_reward']}
          for r in evals]


def best_of_n_points(out: str, rm: str) -> list[dict]:
  target = os.path.join(out, 'best_of_n')
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'best_of_n.py'),
       f'--sft_run={_SFT.value}', f'--rm_run={rm}', f'--out={target}',
       f'--ns={",".join(_NS.value)}'], capture_output=True, text=True)
  if result.returncode:
    raise UserError('best_of_n.py failed: ' + (result.stderr.strip().splitlines() or ['?'])[-1])
  with open(os.path.join(target, 'best_of_n.csv')) as f:
    rows = list(csv.DictReader(f))
  return [{'method': 'best_of_n', 'setting': f'n={r["n"]}', 'step': 0,
           'kl': float(r['kl_bound']), 'gold': float(r['gold_of_proxy_best']),
           'gold_se': float(r['gold_of_proxy_best_ci95']) / 1.96,
           'proxy': float(r['proxy_of_proxy_best'])} for r in rows]


FORMS = {
    # Gao et al. 2022, with d = sqrt(KL): the gold (or proxy) reward gain over the start.
    'best_of_n': (lambda d: np.stack([d, -d * d], axis=1), 'd (a - b d)'),
    'ppo': (lambda d: np.stack([d, -d * np.log(d)], axis=1), 'd (a - b log d)'),
}


def fit(method: str, points: list[dict], key: str, base: float, setting: str = 'all') -> dict:
  """Least squares of (key - base) on the method's form over points with d > 0 (of one
  setting, e.g. one PPO beta, or all)."""
  pts = [p for p in points if p['method'] == method and p['kl'] > 1e-9
         and setting in ('all', p['setting'])]
  d = np.sqrt([p['kl'] for p in pts])
  y = np.array([p[key] for p in pts]) - base
  design, form = FORMS[method]
  (a, b), *_ = np.linalg.lstsq(design(d), y, rcond=None)
  pred = design(d) @ np.array([a, b])
  r2 = 1.0 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
  peak = {'best_of_n': a / (2 * b) if b > 0 else math.inf,
          'ppo': math.exp(a / b - 1) if b > 0 else math.inf}[method]
  return {'method': method, 'setting': setting, 'reward': key, 'form': form, 'a': float(a), 'b': float(b),
          'r2': float(r2), 'points': len(pts), 'd_at_peak': float(peak)}


def plot(points: list[dict], fits: list[dict], base: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, method in zip(axes, ('best_of_n', 'ppo')):
    pts = [p for p in points if p['method'] == method]
    d = np.sqrt([p['kl'] for p in pts])
    for key, color in (('gold', 'C0'), ('proxy', 'C1')):
      ax.scatter(d, [p[key] for p in pts], color=color, s=14, label=f'{key} reward')
      f = next(f for f in fits if f['method'] == method and f['reward'] == key
               and f['setting'] == 'all')
      grid = np.linspace(1e-3, d.max() * 1.05, 200)
      design, _ = FORMS[method]
      ax.plot(grid, base[key] + design(grid) @ np.array([f['a'], f['b']]), color=color,
              lw=1, label=f'{key} fit {f["form"]}, R^2 {f["r2"]:.2f}')
    ax.set_title('best-of-n' if method == 'best_of_n' else 'PPO (all betas, every eval)')
    ax.set_xlabel('d = sqrt(KL to SFT)  [sqrt nats]')
    ax.legend(fontsize=7)
  axes[0].set_ylabel('reward (gold: truth; proxy: reward model)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  start = time.time()
  try:
    runs.read_config(os.path.abspath(_SFT.value), role='--sft_run')
    values = betas()
    if _STEPS.value < 1 or _EVALS.value < 1:
      raise UserError('--ppo_steps and --evals must be >= 1')
    out = os.path.abspath(_OUT.value)
    os.makedirs(out, exist_ok=True)
    rm = train_reward_model(out)
    points = best_of_n_points(out, rm)
    for beta in values:
      points += train_ppo(out, rm, beta)
  except (UserError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  start_point = next(p for p in points if p['method'] == 'ppo' and p['step'] == 0)
  base = {'gold': start_point['gold'], 'proxy': start_point['proxy']}
  bon_base = next(p for p in points if p['method'] == 'best_of_n' and p['kl'] == 0.0)
  fits = [fit('best_of_n', points, key, bon_base[key]) for key in ('gold', 'proxy')]
  fits += [fit('ppo', points, key, base[key]) for key in ('gold', 'proxy')]
  # Gao et al. fit RL curves along one run; the pooled fit mixes runs whose KL penalty
  # makes them trace different curves.
  fits += [fit('ppo', points, key, base[key], setting=f'beta={beta:g}')
           for beta in values for key in ('gold', 'proxy')]
  with open(os.path.join(out, 'points.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(points[0]))
    writer.writeheader()
    writer.writerows(points)
  with open(os.path.join(out, 'fits.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(fits[0]))
    writer.writeheader()
    writer.writerows(fits)
  plot(points, fits, base, os.path.join(out, 'overoptimization.png'))

  print(f'\n{"method":<10} {"setting":<11} {"step":>4} {"KL":>7} {"d":>6} {"gold":>15} {"proxy":>7}')
  for p in points:
    print(f'{p["method"]:<10} {p["setting"]:<11} {p["step"]:>4} {p["kl"]:>7.3f} '
          f'{math.sqrt(p["kl"]):>6.3f} {p["gold"]:>7.3f} ± {1.96 * p["gold_se"]:.3f} '
          f'{p["proxy"]:>7.3f}')
  print(f'\n{"method":<10} {"setting":<11} {"reward":<6} {"form":<16} {"a":>8} {"b":>8} '
        f'{"R^2":>6} {"d at peak":>9}')
  for f in fits:
    print(f'{f["method"]:<10} {f["setting"]:<11} {f["reward"]:<6} {f["form"]:<16} '
          f'{f["a"]:>8.4f} {f["b"]:>8.4f} {f["r2"]:>6.3f} {f["d_at_peak"]:>9.3f}')
  print(json.dumps({'length_bias': _LENGTH.value, 'gold_length': _GOLD_LENGTH.value,
                    'kl_coefs': values,
                    'fits': [{k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in f.items()} for f in fits],
                    'seconds': round(time.time() - start)}))


if __name__ == '__main__':
  app.run(main)
