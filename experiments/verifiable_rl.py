r"""RL against a verifier: held-out pass@1 and pass@8 against steps for GRPO, Dr.GRPO,
RLOO, REINFORCE++ and PPO (with its critic) on one world task, over seeds; and the
sampler/trainer log-prob mismatch of GRPO with a float32 and a bfloat16 sampler.

  python experiments/verifiable_rl.py --out=runs/verifiable_rl [--seeds=3] [--steps=100] \
      [--methods=grpo,dr_grpo,rloo,reinforce_pp,ppo] [--pretrain_run=DIR | --sft_run=DIR] \
      [--eval_prompts=N] [--eval_samples=N] [--mismatch_steps=10] [--extra='--config.x=v']

The task is sum_mod at the sizes of configs/grpo.py:tiny. One warm start serves every
method and seed: pretrain.py:tiny (OUT/pretrain, or --pretrain_run) then sft.py:task_tiny
from it (OUT/sft, or --sft_run). It is shared on purpose: the warm start learns the task
abruptly (held-out pass@1 at chance until about step 275 of its 300, then rising fast), so
warm starts of different seeds would hand RL very different policies and the spread over
seeds would measure the warm start, not the method. The seeds vary the RL run only
(--config.seed: the problem pool's order, the sampling and, for PPO, the critic's head);
the held-out problems and the eval's sampling key depend on the world seed only, so step 0
is the same policy measured the same way in every run (its interval is 0).

Methods: grpo, dr_grpo, rloo and reinforce_pp are configs/grpo.py:tiny with grpo.advantage
set (dr_grpo also with grpo.loss_agg=constant: no length normalisation, as published);
ppo is configs/ppo.py:task_tiny (the same task, pool, held-out problems, new tokens
and rollouts per step). Each run is `python -m rlhf_jax.main` in OUT/<method>/seed<k>, its
output appended to OUT/<method>/seed<k>.log, so rerunning the same command resumes stopped
runs and only reloads finished ones (a directory holding a run of other settings stops the
experiment with an error; nothing is overwritten).

  --steps          train.steps of every RL run (default: the configs', 100)
  --eval_prompts, --eval_samples   the held-out eval of every run this script starts,
                   set in its own block (sft.*, grpo.* or ppo.*); eval_samples >= 8
  --extra          more overrides for the RL runs, space-separated, repeatable: one under
                   --config.grpo. goes to the grpo-family runs, one under --config.ppo. to
                   the ppo runs, any other to all (ppo.py:task_tiny reads grpo.py:tiny when
                   it is built, so a grpo.* override does not reach PPO)
  --mismatch_steps GRPO runs (advantage grpo, seed 0) of this many steps logging every step:
                   OUT/mismatch/float32 and OUT/mismatch/bfloat16 (grpo.sample_dtype=
                   bfloat16, grpo.tis_cap=2); mismatch/abs_diff_mean, abs_diff_max and kl_k3
                   are means over their steps. 0 skips them.

Writes OUT/curves.csv (method, seed, step, pass@1, pass@8, greedy_pass, maj@8: the runs'
eval/* values at their eval steps), OUT/summary.csv (per method, at step 0 and at the last
step: pass@1 and pass@8 as the mean over seeds and the half-width of the 95% Student-t
interval, empty for one seed) and OUT/verifiable_rl.png (mean over seeds at the steps all
seeds logged, the interval shaded); prints the markdown table and the mismatch figures and,
last, one JSON line of all figures. Bad input ends with one `error: ...` line, exit 2.

Runtime on a 2-core CPU: the full experiment (3 seeds x 5 methods x 100 steps) is not
measured here (a GRPO tiny run alone is about 2 minutes); the tiny-scale check (--sft_run=
an sft.py:task_tiny run, --seeds=1 --steps=4 --eval_prompts=32 --eval_samples=8
--mismatch_steps=2) took 4 min 39 s, 35-44 s a run, nearly all start-up and compilation,
and a rerun reloads a finished run in 5 s. Measured: nothing at full size. The check shows
the pipeline only, not a result (4 steps, 32 problems); in it the f32 sampler's mismatch
was abs_diff_mean 2.8e-7, max 4.5e-6, kl_k3 1.1e-13, and the bf16 one's 4.1e-4, 1.7e-2,
1.1e-6 (2 steps).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from rlhf_jax.analysis import compare
from rlhf_jax.errors import UserError

from model_collapse import write_csv  # a sibling script (experiments/ is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_FAMILY = ('grpo', 'dr_grpo', 'rloo', 'reinforce_pp')  # grpo.advantage values
METHODS = (*GRPO_FAMILY, 'ppo')
CURVE_METRICS = ('pass@1', 'pass@8', 'greedy_pass', 'maj@8')  # eval/<name>
SUMMARY_METRICS = ('pass@1', 'pass@8')
MISMATCH = ('abs_diff_mean', 'abs_diff_max', 'kl_k3')  # mismatch/<name>
MISMATCH_RUNS = {'float32': ('--config.grpo.sample_dtype=float32',),
                 'bfloat16': ('--config.grpo.sample_dtype=bfloat16', '--config.grpo.tis_cap=2')}


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(message)


def parse_args(argv=None):
  p = _Parser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
  p.add_argument('--out', default='runs/verifiable_rl')
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--steps', type=int, default=None, help="RL steps (default: the configs')")
  p.add_argument('--pretrain_run', default='', help='a pretrain.py:tiny run to start from')
  p.add_argument('--sft_run', default='', help='a sft.py:task_tiny run: the warm start')
  p.add_argument('--eval_prompts', type=int, default=None)
  p.add_argument('--eval_samples', type=int, default=None)
  p.add_argument('--mismatch_steps', type=int, default=10)
  p.add_argument('--extra', action='append', default=[],
                 help="overrides for the RL runs, e.g. --extra='--config.optim.lr=3e-4'")
  args = p.parse_args(argv)
  args.methods = [m for m in args.methods.split(',') if m]
  unknown = sorted(set(args.methods) - set(METHODS))
  if unknown or not args.methods:
    raise UserError(f'--methods: {",".join(unknown) or "none given"}; choose from '
                    f'{",".join(METHODS)}')
  args.methods = list(dict.fromkeys(args.methods))
  if args.seeds < 1 or (args.steps is not None and args.steps < 1) or args.mismatch_steps < 0:
    raise UserError(f'--seeds={args.seeds} and --steps={args.steps} must be >= 1 and '
                    f'--mismatch_steps={args.mismatch_steps} >= 0')
  if args.eval_prompts is not None and args.eval_prompts < 1:
    raise UserError(f'--eval_prompts={args.eval_prompts} must be >= 1')
  if args.eval_samples is not None and args.eval_samples < 8:
    raise UserError(f'--eval_samples={args.eval_samples}: pass@8 and maj@8 need >= 8')
  args.extra = [o for text in args.extra for o in shlex.split(text)]
  bad = [o for o in args.extra if not o.startswith('--config.') or '=' not in o]
  if bad:
    raise UserError(f'--extra {bad[0]!r} is not a --config.x=v override')
  return args


def eval_overrides(args, block: str) -> list[str]:
  sizes = (('eval_prompts', args.eval_prompts), ('eval_samples', args.eval_samples))
  return [f'--config.{block}.{name}={value}' for name, value in sizes if value is not None]


def routed_extra(args, block: str) -> list[str]:
  """The --extra overrides for a run whose method block is `block` (grpo or ppo)."""
  other = {'grpo': 'ppo', 'ppo': 'grpo'}[block]
  return [o for o in args.extra if not o.startswith(f'--config.{other}.')]


def run_cli(config: str, workdir: str, overrides: list[str], *,
            train_block: bool = True) -> None:
  """One run through the CLI; raises UserError with the run's own error line.
  train_block: the config has a train block, whose progress bar is turned off (a loop's
  stages have theirs off already)."""
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  cmd = [sys.executable, '-m', 'rlhf_jax.main', f'--config={config}', f'--workdir={workdir}',
         *(['--config.train.progress=False'] if train_block else []), *overrides]
  t0 = time.time()
  with open(workdir + '.log', 'a') as log:
    log.write(f'$ {shlex.join(cmd)}\n')
    log.flush()
    result = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.PIPE, text=True)
    log.write(result.stderr)
  if result.returncode:
    lines = [l.strip() for l in result.stderr.splitlines() if l.strip()]
    last = next((l for l in reversed(lines) if l.startswith('error: ')),
                lines[-1] if lines else f'exit status {result.returncode}')
    raise UserError(f'run {workdir} failed: {last.removeprefix("error: ")} (its output: '
                    f'{workdir}.log)')
  print(f'{workdir}: {time.time() - t0:.0f}s', flush=True)


def warm_start(args, out: str) -> str:
  """The SFT run every RL run starts from: --sft_run, or pretrain -> SFT in OUT."""
  from rlhf_jax.train import runs  # late: imports jax
  if args.sft_run:
    sft = os.path.abspath(args.sft_run)
    config = runs.read_config(sft, role='--sft_run')
    if config.get('stage') != 'sft' or 'task' not in config:
      raise UserError(f'--sft_run {args.sft_run} is not an SFT run on a task '
                      '(configs/sft.py:task_tiny)')
    return sft
  if args.pretrain_run:
    pretrain = os.path.abspath(args.pretrain_run)
    if runs.read_config(pretrain, role='--pretrain_run').get('stage') != 'pretrain':
      raise UserError(f'--pretrain_run {args.pretrain_run} is not a pretrain run')
  else:
    pretrain = os.path.join(out, 'pretrain')
    run_cli('configs/pretrain.py:tiny', pretrain, [])
  sft = os.path.join(out, 'sft')
  run_cli('configs/sft.py:task_tiny', sft,
          [f'--config.init.run={pretrain}', *eval_overrides(args, 'sft')])
  return sft


def rl_run(args, *, method: str, seed: int, sft: str, workdir: str,
           last: tuple = ()) -> list[dict]:
  """Trains (or resumes, or reloads) one RL run; returns its metrics.jsonl records.
  `last`: overrides applied after all others."""
  block = 'ppo' if method == 'ppo' else 'grpo'
  config = 'configs/ppo.py:task_tiny' if method == 'ppo' else 'configs/grpo.py:tiny'
  overrides = [f'--config.init.run={sft}', f'--config.seed={seed}']
  if method != 'ppo':
    overrides.append(f'--config.grpo.advantage={method}')
  if method == 'dr_grpo':  # Dr.GRPO drops the length normalisation too, not only the std
    overrides.append('--config.grpo.loss_agg=constant')
  if args.steps is not None:
    overrides.append(f'--config.train.steps={args.steps}')
  overrides += [*eval_overrides(args, block), *routed_extra(args, block), *last]
  run_cli(config, workdir, overrides)
  return list(compare.read_metrics(path=os.path.join(workdir, 'metrics.jsonl')))


def curve_rows(method: str, seed: int, records: list[dict]) -> list[dict]:
  return [{'method': method, 'seed': seed, 'step': r['step'],
           **{m: r[f'eval/{m}'] for m in CURVE_METRICS}}
          for r in records if 'eval/pass@1' in r]


def aggregate(rows: list[dict], methods: list[str]) -> dict:
  """{method: {'steps': [S], 'n': seeds, metric: ([S] mean, [S] half-width or None)}} at
  the steps every seed of the method logged; the interval is compare.interval's."""
  out = {}
  for method in methods:
    by_seed = {}
    for r in rows:
      if r['method'] == method:
        by_seed.setdefault(r['seed'], {})[r['step']] = r
    steps = sorted(set.intersection(*(set(c) for c in by_seed.values())))
    agg = {'steps': steps, 'n': len(by_seed)}
    for metric in SUMMARY_METRICS:
      cells = [compare.interval(values=[c[s][metric] for c in by_seed.values()]) for s in steps]
      mean = np.array([m for m, _ in cells])
      agg[metric] = (mean, None if len(by_seed) < 2 else np.array([h for _, h in cells]))
    out[method] = agg
  return out


def summary_rows(agg: dict) -> list[dict]:
  rows = []
  for method, a in agg.items():
    for i in sorted({0, len(a['steps']) - 1}):
      row = {'method': method, 'seeds': a['n'], 'step': a['steps'][i]}
      for metric in SUMMARY_METRICS:
        mean, half = a[metric]
        row[f'{metric}_mean'] = float(mean[i])
        row[f'{metric}_ci95'] = None if half is None else float(half[i])
      rows.append(row)
  return rows


def markdown(rows: list[dict]) -> str:
  def cell(row, metric):
    mean, half = row[f'{metric}_mean'], row[f'{metric}_ci95']
    return f'{mean:.3f} (n=1)' if half is None else f'{mean:.3f} ± {half:.3f}'
  lines = ['| method | seeds | step | pass@1 | pass@8 |', '|---|---:|---:|---:|---:|']
  lines += [f'| {r["method"]} | {r["seeds"]} | {r["step"]} | {cell(r, "pass@1")} | '
            f'{cell(r, "pass@8")} |' for r in rows]
  return '\n'.join(lines)


def plot(path: str, agg: dict) -> None:
  """compare.figure's panels, with this script's t-interval bands (pass@1's logged se is a
  band over problems, not over seeds)."""
  curves = {}
  for metric in SUMMARY_METRICS:
    curves[f'eval/{metric}'] = []
    for a in agg.values():
      mean, half = a[metric]
      width = np.zeros_like(mean) if half is None else half
      curves[f'eval/{metric}'].append(compare.Band(
          steps=np.array(a['steps'], dtype=np.int64), mean=mean, lower=mean - width,
          upper=mean + width, kind=None if half is None else 't95', n=a['n']))
  labels = compare.Labels(text=tuple(agg), shown=(), omitted=())
  fig = compare.figure(curves=curves, labels=labels,
                       directions={m: 'higher' for m in curves})
  import matplotlib.pyplot as plt  # after figure() chose the Agg backend
  try:
    fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)


def mismatch(args, *, sft: str, out: str) -> dict:
  """{dtype: {name: mean over the run's steps of mismatch/<name>}}."""
  figures = {}
  for dtype, settings in MISMATCH_RUNS.items():
    records = rl_run(args, method='grpo', seed=0, sft=sft,
                     workdir=os.path.join(out, 'mismatch', dtype),
                     last=(f'--config.train.steps={args.mismatch_steps}',
                           '--config.train.log_every=1', *settings))
    logged = [r for r in records if 'mismatch/kl_k3' in r]
    figures[dtype] = {k: float(np.mean([r[f'mismatch/{k}'] for r in logged]))
                      for k in MISMATCH}
    figures[dtype]['steps'] = len(logged)
  return figures


def prepare(args) -> tuple[str, str]:
  """(OUT made absolute and created, the warm start's run): what every experiment on the
  shared warm start does first."""
  out = os.path.abspath(args.out)
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise UserError(f'--out {args.out} cannot be created ({e})') from None
  return out, warm_start(args, out)


def main(argv=None) -> None:
  start = time.time()
  try:
    args = parse_args(argv)
    out, sft = prepare(args)
    rows = []
    for method in args.methods:
      for seed in range(args.seeds):
        records = rl_run(args, method=method, seed=seed, sft=sft,
                         workdir=os.path.join(out, method, f'seed{seed}'))
        rows += curve_rows(method, seed, records)
    mis = mismatch(args, sft=sft, out=out) if args.mismatch_steps else {}
    with open(os.path.join(out, args.methods[0], 'seed0', 'config.json')) as f:
      task = json.load(f)['task']['name']  # what --extra may have changed
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  agg = aggregate(rows, args.methods)
  summary = summary_rows(agg)
  write_csv(os.path.join(out, 'curves.csv'), rows)
  write_csv(os.path.join(out, 'summary.csv'), summary)
  plot(os.path.join(out, 'verifiable_rl.png'), agg)
  print('\nHeld-out pass@k (mean ± 95% t-interval over seeds; step 0 is the shared warm '
        f'start)\n\n{markdown(summary)}')
  if mis:
    print(f'\n{"sampler (grpo)":<22} {"steps":>5}' + ''.join(f' {k:>13}' for k in MISMATCH))
    for dtype, f in mis.items():
      name = dtype + (', tis_cap=2' if dtype == 'bfloat16' else '')
      print(f'{name:<22} {f["steps"]:>5}' + ''.join(f' {f[k]:>13.4g}' for k in MISMATCH))
  sig = lambda v: v if v is None or isinstance(v, (int, str)) else float(f'{v:.4g}')
  print(json.dumps({
      'task': task, 'sft_run': sft, 'methods': args.methods, 'seeds': args.seeds,
      'summary': [{k: sig(v) for k, v in r.items()} for r in summary],
      'mismatch': {d: {k: sig(v) for k, v in f.items()} for d, f in mis.items()},
      'seconds': round(time.time() - start)}))


if __name__ == '__main__':
  main()
