r"""The self-improvement loop's ceiling: true pass@1 against round for every filter x data
schedule over seeds, each seed's curve fitted by p_inf - (p_inf - p_0) exp(-r / r0).

  python experiments/self_improvement.py --out=runs/self_improvement [--seeds=3] \
      [--rounds=R] [--filters=exact,learned,self_consistency,none] \
      [--schedules=replace,accumulate] [--pretrain_run=DIR | --sft_run=DIR] \
      [--extra='--config.x=v']

Each run is configs/self_improve.py:tiny (rlhf_jax/loops/self_improve.py) with
self_improve.filter, self_improve.schedule and --config.seed set, `python -m
rlhf_jax.main` in OUT/<filter>_<schedule>/seed<k>, its output appended to
OUT/<filter>_<schedule>/seed<k>.log; rerunning the same command resumes stopped runs and
only reloads finished ones (a directory holding a run of other settings stops the
experiment with an error; nothing is overwritten). One warm start serves every run, built
as experiments/verifiable_rl.py builds it (pretrain.py:tiny in OUT/pretrain or
--pretrain_run, then sft.py:task_tiny in OUT/sft; or --sft_run), and shared for the same
reason: the SFT run learns the task abruptly, so per-seed warm starts would make the
spread over seeds measure the warm start. The seeds vary the loop only (its fresh
problems, sampling and training); round 0 is the same policy in every run.

  --rounds     self_improve.rounds of every run (default: the config's, 4); >= 3, since
               the fit has three parameters and needs more points (rounds 0..R) than that
  --extra      more overrides for every run, space-separated, repeatable; those the script
               sets itself (seed, self_improve.filter/schedule/init_run/rounds) are refused

Writes OUT/curves.csv (filter, schedule, seed, round, pass@1, pass@8, maj@8, true_kl,
distinct_traces, answer_entropy, precision, recall, kept_fraction, labels: the runs'
metrics.jsonl values; the filter's columns are empty at the last round, which trains
nothing, and nan where the loop logged them undefined), OUT/ceilings.csv (per filter x
schedule: p_0, p_inf and r0 of analysis/self_improve_metrics.fit_saturating on each seed's
pass@1 curve, as the mean over seeds and the half-width of the 95% Student-t interval
(compare.interval; empty for one seed), how many of those fits converged and how many
saturate within the rounds run (r0 <= R: otherwise p_inf extrapolates), the final
round's pass@1 the same way, the filter's precision averaged over rounds then seeds, the
exact labels spent by the last round, and the fit to the seed-mean curve) and
OUT/self_improvement.png (pass@1 and distinct_traces against round, one panel per
schedule, one line per filter, the t-interval shaded, the seed-mean fit dashed); prints
the markdown ceiling table and, last, one JSON line of all figures. Bad input ends with one
`error: ...` line, exit 2.

Runtime on a 2-core CPU: the full experiment (4 filters x 2 schedules x 3 seeds, 4 rounds,
--sft_run given) took 68 minutes on a machine shared with other work; one seed's 8 runs
took 14 minutes on the idle machine (85-90 s a run, 135-140 s with the learned filter),
and a rerun reloads finished runs in seconds. Its table is in docs/self-improvement.md.
"""
import argparse
import json
import os
import shlex
import sys
import time
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the package, also where it is not installed

from rlhf_jax.analysis import compare  # noqa: E402
from rlhf_jax.errors import UserError  # noqa: E402

# Sibling scripts (experiments/ is on sys.path): one CLI runner and one warm start for all.
from model_collapse import write_csv  # noqa: E402
from verifiable_rl import prepare, run_cli  # noqa: E402

FILTERS = ('exact', 'learned', 'self_consistency', 'none')
SCHEDULES = ('replace', 'accumulate')
CONFIG = 'configs/self_improve.py:tiny'
# csv column -> metrics.jsonl key; the filter's keys are logged for rounds r < R only.
POLICY_KEYS = {'pass@1': 'eval/pass@1', 'pass@8': 'eval/pass@8', 'maj@8': 'eval/maj@8',
               'true_kl': 'self_improve/true_kl',
               'distinct_traces': 'self_improve/distinct_traces',
               'answer_entropy': 'self_improve/answer_entropy'}
FILTER_KEYS = {name: f'self_improve/{name}'
               for name in ('precision', 'recall', 'kept_fraction', 'labels')}
PLOTTED = ('pass@1', 'distinct_traces')
# Overrides this script owns: an --extra one would silently relabel a run's directory.
OWNED = ('seed', 'self_improve.filter', 'self_improve.schedule', 'self_improve.init_run',
         'self_improve.rounds')


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(message)


def _choices(flag: str, text: str, allowed: tuple) -> list[str]:
  chosen = list(dict.fromkeys(v for v in text.split(',') if v))
  unknown = [v for v in chosen if v not in allowed]
  if unknown or not chosen:
    raise UserError(f'{flag}: {",".join(unknown) or "none given"}; choose from '
                    f'{",".join(allowed)}')
  return chosen


def parse_args(argv=None):
  p = _Parser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
  p.add_argument('--out', default='runs/self_improvement')
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--rounds', type=int, default=None, help="default: the config's")
  p.add_argument('--filters', default=','.join(FILTERS))
  p.add_argument('--schedules', default=','.join(SCHEDULES))
  p.add_argument('--pretrain_run', default='', help='a pretrain.py:tiny run to start from')
  p.add_argument('--sft_run', default='', help='a sft.py:task_tiny run: the warm start')
  p.add_argument('--extra', action='append', default=[],
                 help="overrides for every run, e.g. --extra='--config.self_improve."
                 "label_budget=64'")
  args = p.parse_args(argv)
  args.filters = _choices('--filters', args.filters, FILTERS)
  args.schedules = _choices('--schedules', args.schedules, SCHEDULES)
  if args.seeds < 1:
    raise UserError(f'--seeds={args.seeds} must be >= 1')
  if args.rounds is not None and args.rounds < 3:
    raise UserError(f'--rounds={args.rounds} must be >= 3: the saturating fit has three '
                    'parameters and needs more points (rounds 0..R) than that')
  args.extra = [o for text in args.extra for o in shlex.split(text)]
  for o in args.extra:
    if not o.startswith('--config.') or '=' not in o:
      raise UserError(f'--extra {o!r} is not a --config.x=v override')
    key = o.removeprefix('--config.').split('=', 1)[0]
    if key in OWNED:
      raise UserError(f'--extra {o!r}: the script sets {key} itself (--seeds, --filters, '
                      '--schedules, --sft_run, --rounds)')
  # verifiable_rl.warm_start reads these; the warm start keeps sft.py:task_tiny's eval.
  args.eval_prompts = args.eval_samples = None
  return args


def loop_run(args, *, filter_: str, schedule: str, seed: int, sft: str,
             workdir: str) -> list[dict]:
  """Trains (or resumes, or reloads) one loop run; returns its metrics.jsonl records,
  checked to be the policies 0..R with their pass@1."""
  overrides = [f'--config.self_improve.init_run={sft}',
               f'--config.self_improve.filter={filter_}',
               f'--config.self_improve.schedule={schedule}', f'--config.seed={seed}']
  if args.rounds is not None:
    overrides.append(f'--config.self_improve.rounds={args.rounds}')
  run_cli(CONFIG, workdir, [*overrides, *args.extra], train_block=False)
  records = list(compare.read_metrics(path=os.path.join(workdir, 'metrics.jsonl')))
  steps = [r['step'] for r in records]
  if steps != list(range(len(steps))) or len(steps) < 4:
    raise UserError(f'{workdir}/metrics.jsonl logs rounds {steps}; expected 0..R, R >= 3')
  if args.rounds is not None and len(steps) != args.rounds + 1:
    raise UserError(f'{workdir}/metrics.jsonl logs rounds 0..{steps[-1]}, not '
                    f'0..{args.rounds}')
  missing = [r['step'] for r in records if POLICY_KEYS['pass@1'] not in r]
  if missing:
    raise UserError(f'{workdir}/metrics.jsonl has no {POLICY_KEYS["pass@1"]} at rounds '
                    f'{missing}')
  return records


def curve_rows(filter_: str, schedule: str, seed: int, records: list[dict]) -> list[dict]:
  """One row per round; a metric the run did not log is None (an empty cell)."""
  return [{'filter': filter_, 'schedule': schedule, 'seed': seed, 'round': r['step'],
           **{c: r.get(k) for c, k in {**POLICY_KEYS, **FILTER_KEYS}.items()}}
          for r in records]


def _float(value) -> float:
  return float('nan') if value is None else float(value)


def by_round(rows: list[dict], metric: str) -> np.ndarray:
  """[S, R + 1] values of `metric` of one filter x schedule's rows, seeds in order; NaN
  where missing."""
  seeds = sorted({r['seed'] for r in rows})
  rounds = sorted({r['round'] for r in rows})
  table = {(r['seed'], r['round']): _float(r[metric]) for r in rows}
  return np.array([[table.get((s, k), np.nan) for k in rounds] for s in seeds], np.float64)


def _nanmean(values, axis=None):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN: NaN is the answer
    return np.nanmean(np.asarray(values, np.float64), axis=axis)


def _last_finite(values: np.ndarray) -> float:
  """The cumulative count at the last round that logged one (R - 1: round R trains
  nothing); NaN if none did."""
  finite = values[np.isfinite(values)]
  return float(finite[-1]) if finite.size else float('nan')


def ceiling_row(filter_: str, schedule: str, rows: list[dict]) -> dict:
  """ceilings.csv's row for one filter x schedule (module docstring)."""
  from rlhf_jax.analysis.self_improve_metrics import fit_saturating
  pass1 = by_round(rows, 'pass@1')
  rounds = np.arange(pass1.shape[1], dtype=np.float64)
  fits = [fit_saturating(rounds=rounds, values=curve) for curve in pass1]
  row = {'filter': filter_, 'schedule': schedule, 'seeds': len(pass1),
         'rounds': pass1.shape[1] - 1}
  cells = {**{name: [getattr(f, name) for f in fits] for name in ('p_0', 'p_inf', 'r0')},
           'pass@1_round0': pass1[:, 0], 'pass@1_final': pass1[:, -1]}
  for name, values in cells.items():
    row[f'{name}_mean'], row[f'{name}_ci95'] = compare.interval(values=values)
  row['fits_converged'] = sum(f.converged for f in fits)
  row['fits_identified'] = sum(f.identified for f in fits)
  # Rounds where precision is undefined (nothing kept) carry no weight, not a 0 or a 1;
  # a seed undefined at every round carries none either.
  row['precision_mean'] = float(_nanmean(_nanmean(by_round(rows, 'precision'), axis=1)))
  labels = by_round(rows, 'labels')
  row['labels_final'] = float(_nanmean([_last_finite(seed) for seed in labels]))
  mean_fit = fit_saturating(rounds=rounds, values=pass1.mean(0))
  row.update({f'mean_fit_{name}': getattr(mean_fit, name)
              for name in ('p_0', 'p_inf', 'r0', 'rmse', 'converged', 'identified')})
  return row


def markdown(ceilings: list[dict]) -> str:
  def pm(mean, half):
    return f'{mean:.3f} (n=1)' if half is None else f'{mean:.3f} ± {half:.3f}'
  lines = ['| filter | schedule | pass@1 round 0 → final | p_inf | precision | labels |',
           '|---|---|---:|---:|---:|---:|']
  for c in ceilings:
    note = '' if c['fits_identified'] == c['seeds'] else (
        f' ({c["fits_identified"]}/{c["seeds"]} saturate within the rounds)')
    lines.append(
        f'| {c["filter"]} | {c["schedule"]} | {c["pass@1_round0_mean"]:.3f} → '
        f'{pm(c["pass@1_final_mean"], c["pass@1_final_ci95"])} | '
        f'{pm(c["p_inf_mean"], c["p_inf_ci95"])}{note} | {c["precision_mean"]:.3f} | '
        f'{c["labels_final"]:.0f} |')
  return '\n'.join(lines)


def plot(path: str, groups: dict, ceilings: list[dict]) -> None:
  """groups: {(filter, schedule): rows}. Rows: PLOTTED metrics; columns: schedules."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from rlhf_jax.analysis.self_improve_metrics import SaturatingFit
  filters = list(dict.fromkeys(f for f, _ in groups))
  schedules = list(dict.fromkeys(s for _, s in groups))
  fits = {(c['filter'], c['schedule']): c for c in ceilings}
  fig, axes = plt.subplots(len(PLOTTED), len(schedules), squeeze=False, sharex=True,
                           figsize=(4.5 * len(schedules), 3.2 * len(PLOTTED)))
  for (filter_, schedule), rows in groups.items():
    color = f'C{filters.index(filter_)}'
    for i, metric in enumerate(PLOTTED):
      ax = axes[i, schedules.index(schedule)]
      values = by_round(rows, metric)
      cells = [compare.interval(values=column) for column in values.T]
      mean = np.array([m for m, _ in cells])
      half = np.array([0.0 if h is None else h for _, h in cells])
      rounds = np.arange(mean.size)
      ax.plot(rounds, mean, '-o', ms=3, color=color, label=f'{filter_} (n={len(values)})')
      ax.fill_between(rounds, mean - half, mean + half, color=color, alpha=0.2, linewidth=0)
      c = fits[filter_, schedule]
      if metric == 'pass@1' and c['mean_fit_converged']:
        fit = SaturatingFit(p_inf=c['mean_fit_p_inf'], p_0=c['mean_fit_p_0'],
                            r0=c['mean_fit_r0'], rmse=c['mean_fit_rmse'], converged=True)
        fine = np.linspace(0, rounds[-1], 100)
        ax.plot(fine, fit(fine), '--', color=color, linewidth=0.8)
      ax.set_title(f'{metric} ({schedule})', fontsize='medium')
      ax.grid(alpha=0.3)
  for ax in axes[-1]:
    ax.set_xlabel('round')
  for ax in axes[:, 0]:
    ax.set_ylabel('mean, 95% t-interval over seeds', fontsize='small')
  axes[0, 0].legend(fontsize='small', title='filter (dashed: fit to the mean)',
                    title_fontsize='small')
  fig.tight_layout()
  try:
    fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)


def main(argv=None) -> None:
  start = time.time()
  try:
    args = parse_args(argv)
    out, sft = prepare(args)
    groups = {}
    for filter_ in args.filters:
      for schedule in args.schedules:
        rows = groups[filter_, schedule] = []
        for seed in range(args.seeds):
          workdir = os.path.join(out, f'{filter_}_{schedule}', f'seed{seed}')
          records = loop_run(args, filter_=filter_, schedule=schedule, seed=seed, sft=sft,
                             workdir=workdir)
          rows += curve_rows(filter_, schedule, seed, records)
        if len({r['round'] for r in rows}) * args.seeds != len(rows):
          raise UserError(f'the seeds of {filter_}_{schedule} logged different rounds '
                          f'(see {os.path.join(out, f"{filter_}_{schedule}")})')
    first = os.path.join(out, f'{args.filters[0]}_{args.schedules[0]}', 'seed0')
    with open(os.path.join(first, 'config.json')) as f:
      task = (json.load(f).get('task') or {}).get('name')  # what --extra may have changed
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  ceilings = [ceiling_row(f, s, rows) for (f, s), rows in groups.items()]
  write_csv(os.path.join(out, 'curves.csv'), [r for rows in groups.values() for r in rows])
  write_csv(os.path.join(out, 'ceilings.csv'), ceilings)
  plot(os.path.join(out, 'self_improvement.png'), groups, ceilings)
  print('\nSelf-improvement ceilings: true pass@1 by the exact verifier (mean ± 95% '
        't-interval over seeds; round 0 is the shared warm start), p_inf of '
        f'p_inf - (p_inf - p_0) exp(-r / r0) fitted per seed\n\n{markdown(ceilings)}')
  def sig(v):  # NaN (an undefined precision, an unconverged r0) is null: strict JSON
    if v is None or isinstance(v, (bool, int, str)):
      return v
    return float(f'{v:.4g}') if np.isfinite(v) else None
  print(json.dumps({
      'task': task, 'sft_run': sft, 'filters': args.filters, 'schedules': args.schedules,
      'seeds': args.seeds, 'ceilings': [{k: sig(v) for k, v in c.items()} for c in ceilings],
      'seconds': round(time.time() - start)}))


if __name__ == '__main__':
  main()
