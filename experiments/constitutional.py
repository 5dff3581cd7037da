r"""AI feedback against the truth: harm rate and gold reward of the RL-CAI policy against
the fraction of its comparisons labelled by people (the rest by the judge), at a fixed
total number of labels, for judges of two sizes, over seeds.

  python experiments/constitutional.py --out=runs/constitutional --pretrain_run=DIR \
      --sft_run=DIR [--wide_run=DIR] [--seeds=3] [--fractions=0,0.1,0.5,1] \
      [--judges=tiny,wide] [--extra='--config.x=v']

For each judge size and seed, one configs/cai.py:tiny_sl loop in OUT/<judge>/seed<k>/sl
trains the judge and SL-CAI from --pretrain_run; then, for each human fraction f, one
configs/cai.py:tiny_rl loop in OUT/<judge>/seed<k>/f<f> runs RL-CAI (a reward model on
comparisons of the SL policy's samples, f of them labelled by the annotators and the rest
by that judge, then PPO) from the SL policy, with the same judge. Every stage of seed k
gets --config.stages.*.seed=k and the loop --config.seed=k, so a seed varies the judge's
data, the revisions, the labels and the RL alike; the fixed eval prompts are the world's.

Judges: `tiny` is made from --pretrain_run itself (2 layers, d_model 64); `wide` from
--wide_run (default: pretrain.py:tiny with d_model 128 and 4 layers, trained in
OUT/pretrain_wide), learning on --pretrain_run's samples. --sft_run is the other policy
whose samples measure the judge's self-preference.

Writes OUT/runs.csv (judge, seed, fraction, the RL policy's harm_rate, gold_reward,
kl_sl, response_length, the human and judge labels spent, the labels' gold agreement;
the SL policy's and init policy's harm and gold; the judge's figures), OUT/summary.csv
(per judge x fraction: each figure's mean over seeds and 95% Student-t half-width),
OUT/constitutional.png (harm rate and gold against the human fraction, one line per
judge); prints the markdown table and, last, one JSON line of the figures. Reruns resume
and reload. Bad input: one `error: ...` line, exit 2.
"""
import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rlhf_jax.analysis import compare  # noqa: E402
from rlhf_jax.errors import UserError  # noqa: E402
from model_collapse import write_csv  # noqa: E402
from verifiable_rl import run_cli  # noqa: E402

JUDGES = ('tiny', 'wide')
STAGES = ('judge', 'sft', 'reward_model', 'ppo', 'dpo')
WIDE = ('--config.model.d_model=128', '--config.model.n_layers=4', '--config.model.d_ff=512')
FIGURES = ('harm_rate', 'gold_reward', 'kl_sl', 'label_gold_agreement')
JUDGE_KEYS = ('judge/agreement', 'judge/agreement/harmless', 'judge/agreement/helpful',
              'judge/agreement/on_topic', 'judge/gold_agreement', 'judge/position_flip_rate',
              'judge/length_bias', 'judge/self_preference')


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(message)


def parse_args(argv=None):
  p = _Parser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
  p.add_argument('--out', default='runs/constitutional')
  p.add_argument('--pretrain_run', required=True)
  p.add_argument('--sft_run', required=True)
  p.add_argument('--wide_run', default='')
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--fractions', default='0,0.1,0.5,1')
  p.add_argument('--judges', default=','.join(JUDGES))
  p.add_argument('--extra', action='append', default=[])
  args = p.parse_args(argv)
  try:
    args.fractions = [float(f) for f in args.fractions.split(',') if f]
  except ValueError:
    raise UserError(f'--fractions={args.fractions!r} is not a comma-separated list of '
                    'numbers') from None
  if not args.fractions or not all(0 <= f <= 1 for f in args.fractions):
    raise UserError(f'--fractions: each must be in [0, 1], got {args.fractions}')
  args.judges = [j for j in args.judges.split(',') if j]
  if not args.judges or any(j not in JUDGES for j in args.judges):
    raise UserError(f'--judges={",".join(args.judges)}; choose from {",".join(JUDGES)}')
  if args.seeds < 1:
    raise UserError(f'--seeds={args.seeds} must be >= 1')
  args.extra = [o for text in args.extra for o in shlex.split(text)]
  for o in args.extra:
    if not o.startswith('--config.') or '=' not in o:
      raise UserError(f'--extra {o!r} is not a --config.x=v override')
  for flag in ('pretrain_run', 'sft_run'):
    path = os.path.abspath(getattr(args, flag))
    if not os.path.exists(os.path.join(path, 'config.json')):
      raise UserError(f'--{flag} {getattr(args, flag)} holds no run (no config.json)')
    setattr(args, flag, path)
  return args


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def seeded(seed: int) -> list[str]:
  return [f'--config.seed={seed}', *(f'--config.stages.{s}.seed={seed}' for s in STAGES)]


def sl_loop(args, *, judge_init: str, seed: int, workdir: str) -> dict:
  overrides = [f'--config.cai.init_run={args.pretrain_run}',
               f'--config.stages.judge.judge_data.other_run={args.sft_run}', *seeded(seed)]
  if judge_init != args.pretrain_run:
    overrides.append(f'--config.cai.judge_init={judge_init}')
  run_cli('configs/cai.py:tiny_sl', workdir, [*overrides, *args.extra], train_block=False)
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def rl_loop(args, *, sl_dir: str, fraction: float, seed: int, workdir: str) -> list[dict]:
  overrides = [f'--config.cai.init_run={os.path.join(sl_dir, "sl")}',
               f'--config.cai.judge_run={os.path.join(sl_dir, "judge")}',
               f'--config.judge.human_fraction={fraction}', *seeded(seed)]
  run_cli('configs/cai.py:tiny_rl', workdir, [*overrides, *args.extra], train_block=False)
  return _rows(workdir)


def wide_run(args, out: str) -> str:
  if args.wide_run:
    return os.path.abspath(args.wide_run)
  path = os.path.join(out, 'pretrain_wide')
  run_cli('configs/pretrain.py:tiny', path, list(WIDE))
  return path


def summarise(rows: list[dict], judges, fractions) -> list[dict]:
  out = []
  for judge in judges:
    for f in fractions:
      cell = [r for r in rows if r['judge'] == judge and r['fraction'] == f]
      if not cell:
        continue
      row = {'judge': judge, 'fraction': f, 'seeds': len(cell),
             'human_labels': float(np.mean([r['human_labels'] for r in cell])),
             'judge_labels': float(np.mean([r['judge_labels'] for r in cell]))}
      for name in (*FIGURES, 'sl_harm_rate', 'sl_gold_reward', 'init_harm_rate'):
        row[f'{name}_mean'], row[f'{name}_ci95'] = compare.interval(
            values=[r[name] for r in cell])
      out.append(row)
  return out


def markdown(summary: list[dict]) -> str:
  cell = lambda r, n: (f'{r[n + "_mean"]:.3f}' if r[n + '_ci95'] is None
                       else f'{r[n + "_mean"]:.3f} ± {r[n + "_ci95"]:.3f}')
  lines = ['| judge | human fraction | seeds | human / judge labels | harm rate | gold reward '
           '| KL to SL | labels agree with gold |', '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in summary:
    lines.append(f'| {r["judge"]} | {r["fraction"]:g} | {r["seeds"]} | '
                 f'{r["human_labels"]:.0f} / {r["judge_labels"]:.0f} | '
                 f'{cell(r, "harm_rate")} | {cell(r, "gold_reward")} | {cell(r, "kl_sl")} | '
                 f'{cell(r, "label_gold_agreement")} |')
  return '\n'.join(lines)


def plot(path: str, summary: list[dict]) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, name, title in ((axes[0], 'harm_rate', 'harm rate'),
                          (axes[1], 'gold_reward', 'gold reward')):
    for judge in sorted({r['judge'] for r in summary}):
      rs = [r for r in summary if r['judge'] == judge]
      x = [r['fraction'] for r in rs]
      y = np.array([r[f'{name}_mean'] for r in rs])
      half = np.array([r[f'{name}_ci95'] or 0.0 for r in rs])
      ax.errorbar(x, y, yerr=half, marker='o', capsize=3, label=f'{judge} judge')
    ax.set_xlabel('fraction of comparisons labelled by people')
    ax.set_title(f'RL-CAI policy: {title}')
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> None:
  start = time.time()
  try:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    rows = []
    for judge in args.judges:
      judge_init = args.pretrain_run if judge == 'tiny' else wide_run(args, out)
      for seed in range(args.seeds):
        base = os.path.join(out, judge, f'seed{seed}')
        sl_dir = os.path.join(base, 'sl')
        sl = sl_loop(args, judge_init=judge_init, seed=seed, workdir=sl_dir)
        init_row, sl_row = sl['rows']
        for f in args.fractions:
          rl = rl_loop(args, sl_dir=sl_dir, fraction=f, seed=seed,
                       workdir=os.path.join(base, f'f{f:g}'))[-1]
          rows.append({
              'judge': judge, 'seed': seed, 'fraction': f,
              'harm_rate': rl['cai/harm_rate'], 'gold_reward': rl['cai/gold_reward'],
              'kl_sl': rl['cai/kl_init'], 'response_length': rl['cai/response_length'],
              'human_labels': rl['cai/human_labels'], 'judge_labels': rl['cai/judge_labels'],
              'label_gold_agreement': rl['cai/label_gold_agreement'],
              'sl_harm_rate': sl_row['cai/harm_rate'], 'sl_gold_reward': sl_row['cai/gold_reward'],
              'init_harm_rate': init_row['cai/harm_rate'],
              'init_gold_reward': init_row['cai/gold_reward'],
              **{k: sl['judge'].get(k) for k in JUDGE_KEYS}})
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  summary = summarise(rows, args.judges, args.fractions)
  write_csv(os.path.join(out, 'runs.csv'), rows)
  write_csv(os.path.join(out, 'summary.csv'), summary)
  plot(os.path.join(out, 'constitutional.png'), summary)
  print(markdown(summary))
  print(json.dumps({'summary': summary, 'seconds': round(time.time() - start)}))


if __name__ == '__main__':
  main()
