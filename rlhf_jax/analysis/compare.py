r"""Compare runs: group them by the config fields that differ, aggregate over seeds, plot.

  python -m rlhf_jax.analysis.compare RUN_DIR... [--manifest=PATH] \
      [--metrics=eval/true_kl,train/loss] [--higher_is_better=REGEX] [--out=compare.png] \
      [--ignore=FIELD,...]

Inputs are run directories (each holding config.json and metrics.jsonl) and sweep manifests
(launch/sweep.py's manifest.json, given by --manifest, as a positional file named
manifest.json, or as a directory holding one and no config.json). A manifest's relative
workdirs are looked for next to the manifest, then under its "root" (from the current
directory, then from the repository). Every manifest run is shown, even one that never
started, with the status the manifest gives it.

Each config.json is flattened to dotted keys. Runs whose differing fields agree are seeds of
one group; `seed` never splits groups, nor does any field matched by --ignore (default
`workdir,init.run,rm_run,init_run`: paths that differ per run). A --ignore entry matches a
key equal to it, ending in it ('lr' matches optim.lr), under it ('optim' matches optim.*),
or as a glob ('stages.*.seed'); a given --ignore replaces the default (`--ignore=` groups by
every field but seed). Ignored fields that do differ are named under the table, so a merge
of what should have been two groups is never silent.

A run is `finished` when its last logged step reaches the config's length (train.steps; for
the loops collapse.generations - 1 and rounds.num, their last step), `incomplete` below it,
`failed` when its manifest says so or a chosen metric is non-finite, `not started` without
metrics, and `unknown` when the config gives no length and no manifest says finished. Only
finished runs enter the aggregates; the others are listed below the table with their last
step. Per group and metric: `final` (the value at the run's last step logging it) and `best`
(min over steps, max for names matching --higher_is_better), as mean ± the half-width of the
95% Student-t interval over seeds. The PNG has one panel per metric, one line per group:
the mean at the steps all its seeds logged, with the 95% band.

The last stdout line is one JSON object: {"groups": [{"fields", "n", "metrics": {name:
{"final_mean", "final_ci95", "best_mean", "best_ci95", "n"}}}], "not_finished": [{"workdir",
"status", "last_step", ...}], "figure"}; ci95 is null for one seed.
"""
import argparse
import dataclasses
import fnmatch
import json
import math
import os
import re
import sys

import numpy as np
from scipy import stats

from rlhf_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_IGNORE = ('workdir', 'init.run', 'rm_run', 'init_run')
DEFAULT_HIGHER_IS_BETTER = r'reward|accuracy|acc$|win|elo'


@dataclasses.dataclass(frozen=True)
class Run:
  """One run directory as found on disk, plus what a sweep manifest says about it.

  config: the flattened config.json ({} when it is missing); rows: metrics.jsonl records
  sorted by step; overrides: the manifest's, shown for runs that never wrote a config.
  """
  workdir: str
  config: dict
  rows: tuple
  manifest_status: str | None = None
  returncode: int | None = None
  overrides: dict = dataclasses.field(default_factory=dict)

  @property
  def last_step(self) -> int | None:
    return self.rows[-1]['step'] if self.rows else None


def flatten(*, tree: dict, prefix: str = '') -> dict:
  """Dotted keys to leaves; lists become JSON text so that values compare and hash."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(flatten(tree=value, prefix=f'{name}.'))
    else:
      flat[name] = json.dumps(value) if isinstance(value, list) else value
  return flat


def _read_json(*, path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path}: {e}') from None


def read_metrics(*, path: str) -> tuple:
  """metrics.jsonl records by step (a later line for a step wins). A last line cut short
  (no newline: the run was killed mid-write) is dropped, as a resumed run drops it."""
  try:
    with open(path) as f:
      lines = f.read().split('\n')
  except OSError as e:
    raise UserError(f'cannot read {path}: {e}') from None
  by_step = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      if number == len(lines):
        continue
      raise UserError(f'{path} line {number} is not JSON') from None
    if not isinstance(record, dict) or not isinstance(record.get('step'), int):
      raise UserError(f'{path} line {number} is not an object with an integer "step"')
    by_step[record['step']] = record
  return tuple(by_step[s] for s in sorted(by_step))


def load_run(*, path: str, manifest_entry: dict | None = None) -> Run:
  """A run directory; without a manifest entry it must hold config.json."""
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path) and manifest_entry is None:
    raise UserError(f'{path} is not a run directory (no config.json)')
  config = flatten(tree=_read_json(path=config_path)) if os.path.isfile(config_path) else {}
  metrics_path = os.path.join(path, 'metrics.jsonl')
  rows = read_metrics(path=metrics_path) if os.path.isfile(metrics_path) else ()
  entry = manifest_entry or {}
  return Run(workdir=os.path.normpath(path), config=config, rows=rows,
             manifest_status=entry.get('status'), returncode=entry.get('returncode'),
             overrides=dict(entry.get('overrides') or {}))


def read_manifest(*, path: str) -> list[Run]:
  """Every run a sweep manifest lists, started or not."""
  manifest = _read_json(path=path)
  if not isinstance(manifest, dict) or not isinstance(manifest.get('runs'), list):
    raise UserError(f'{path} is not a sweep manifest (no "runs" list)')
  here = os.path.dirname(os.path.abspath(path))
  root = manifest.get('root') or here
  if not isinstance(root, str):
    raise UserError(f'{path}: "root" is not a path')
  runs = []
  for entry in manifest['runs']:
    if not isinstance(entry, dict) or not isinstance(entry.get('workdir'), str):
      raise UserError(f'{path}: a run without a "workdir": {entry!r}')
    workdir = entry['workdir']
    if not os.path.isabs(workdir):
      # launch/sweep.py writes the manifest into the root and names the root relative to
      # the repository; a copied manifest still finds its runs from the cwd or the repo.
      candidates = [os.path.join(here, workdir), os.path.join(root, workdir),
                    os.path.join(REPO, root, workdir)]
      workdir = next((c for c in candidates if os.path.isdir(c)), candidates[0])
    runs.append(load_run(path=workdir, manifest_entry=entry))
  return runs


def expected_last_step(*, config: dict) -> int | None:
  """The step a finished run logs last, or None when the config does not say: what the
  stage's module declares (a loop logs per round or generation, not per train step)."""
  from rlhf_jax.stages import dispatch  # late: stage modules import jax
  return dispatch.last_logged_step(config)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(*, run: Run, metric: str) -> tuple[np.ndarray, np.ndarray]:
  """[S] steps and [S] float64 values at the steps that logged `metric`."""
  pairs = [(r['step'], float(r[metric])) for r in run.rows if _is_number(r.get(metric))]
  steps, values = zip(*pairs) if pairs else ((), ())
  return np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64)


def step_status(*, run: Run) -> str:
  """The status from the manifest and the logged steps alone (metric values aside)."""
  if run.manifest_status == 'failed' or run.returncode not in (None, 0):
    return 'failed'
  if not run.rows:
    return 'not started'
  expected = expected_last_step(config=run.config)
  if expected is None:
    return 'finished' if run.manifest_status == 'finished' else 'unknown'
  return 'finished' if run.last_step >= expected else 'incomplete'


def run_status(*, run: Run, metrics: list[str]) -> str:
  status = step_status(run=run)
  if status in ('finished', 'incomplete', 'unknown') and any(
      not np.all(np.isfinite(series(run=run, metric=m)[1])) for m in metrics):
    return 'failed'
  return status


def choose_metrics(*, runs: list[Run], requested: list[str]) -> list[str]:
  """The requested metrics that some run logs; by default the eval/* keys every run logs,
  else the first three numeric non-perf ones (curves before one-off values)."""
  logged = [run for run in runs if run.rows]
  if not logged:
    raise UserError('no run has logged metrics yet (no metrics.jsonl)')
  finished = [run for run in logged if step_status(run=run) == 'finished'] or logged
  if requested:
    present = [m for m in requested if any(series(run=r, metric=m)[0].size for r in logged)]
    if not present:
      raise UserError(f'no run logs any of the metrics {",".join(requested)}')
    for metric in sorted(set(requested) - set(present)):
      print(f'warning: no run logs {metric}; skipped', file=sys.stderr)
    return present
  keys = {}  # first-seen order, as each file lists them
  for run in finished:
    for row in run.rows:
      keys.update((k, None) for k, v in row.items() if k != 'step' and _is_number(v))
  common = [k for k in keys if all(series(run=r, metric=k)[0].size for r in finished)]
  chosen = [k for k in common if k.startswith('eval/')]
  if not chosen:
    curves = [k for k in common if not k.startswith('perf/')]
    chosen = sorted(curves, key=lambda k: series(run=finished[0], metric=k)[0].size < 2)[:3]
  if not chosen:
    raise UserError('the runs have no numeric metric in common; name some with --metrics')
  return chosen


def _ignored(*, key: str, ignore: list[str]) -> bool:
  return key == 'seed' or any(
      key == p or key.endswith('.' + p) or key.startswith(p + '.') or
      fnmatch.fnmatchcase(key, p) for p in ignore)


def _differs(*, configs: list[dict], key: str) -> bool:
  return len({json.dumps(c.get(key)) for c in configs}) > 1  # a missing key reads as null


def differing_fields(*, runs: list[Run], ignore: list[str]) -> list[str]:
  """Sorted config keys, not matched by `ignore`, whose values are not the same in all
  the runs that have a config.

  Keys only some configs have mostly come with another stage's own block (collapse.*,
  stages.*), which a key they all have (`stage`) already tells apart; such a key is kept
  only where leaving it out would merge runs that differ in it.
  """
  configs = [run.config for run in runs if run.config]
  keys = sorted(set().union(*configs)) if configs else []
  differ = [k for k in keys if _differs(configs=configs, key=k) and
            not _ignored(key=k, ignore=ignore)]
  common = [k for k in differ if all(k in c for c in configs)]
  merged = {}
  for config in configs:
    merged.setdefault(json.dumps([config.get(k) for k in common]), []).append(config)
  partial = [k for k in differ if k not in common and
             any(_differs(configs=same, key=k) for same in merged.values())]
  return sorted(common + partial)


def ignored_fields(*, runs: list[Run], ignore: list[str]) -> list[str]:
  """The keys all configs have that differ but do not split groups (seed, --ignore)."""
  configs = [run.config for run in runs if run.config]
  keys = sorted(set.intersection(*(set(c) for c in configs))) if configs else []
  return [k for k in keys if _differs(configs=configs, key=k) and _ignored(key=k, ignore=ignore)]


def group_runs(*, runs: list[Run], ignore: list[str]) -> dict[tuple, list[Run]]:
  """Runs with a config by the values of the fields that differ among them: key is a
  tuple of (field, value) pairs, sorted by value (numbers numerically)."""
  fields = differing_fields(runs=runs, ignore=ignore)
  groups = {}
  for run in runs:
    if run.config:
      groups.setdefault(tuple((f, run.config.get(f)) for f in fields), []).append(run)

  def order(key):
    return [(0, v, '') if _is_number(v) else (1, 0, json.dumps(v)) for _, v in key]
  return {key: groups[key] for key in sorted(groups, key=order)}


def interval(*, values) -> tuple[float, float | None]:
  """Mean and the half-width of the 95% Student-t interval (None for one value)."""
  values = np.asarray(values, dtype=np.float64)
  if values.size < 2:
    return float(values.mean()), None
  t = stats.t.ppf(0.975, values.size - 1)
  return float(values.mean()), float(t * values.std(ddof=1) / math.sqrt(values.size))


def aggregate(*, runs: list[Run], metrics: list[str], higher_is_better: str) -> dict:
  """{metric: {final_mean, final_ci95, best_mean, best_ci95, n}} over the runs (seeds) that
  log the metric; means are None where none does."""
  out = {}
  for metric in metrics:
    pick = np.max if re.search(higher_is_better, metric) else np.min
    values = [series(run=run, metric=metric)[1] for run in runs]
    values = [v for v in values if v.size]
    final_mean, final_ci = interval(values=[v[-1] for v in values]) if values else (None, None)
    best_mean, best_ci = interval(values=[pick(v) for v in values]) if values else (None, None)
    out[metric] = {'final_mean': final_mean, 'final_ci95': final_ci, 'best_mean': best_mean,
                   'best_ci95': best_ci, 'n': len(values)}
  return out


def _cell(*, mean, half, n: int, group_n: int) -> str:
  if mean is None:
    return '-'
  text = f'{mean:.4g}' if half is None else f'{mean:.4g} ± {half:.2g}'
  return text if n == group_n else f'{text} (n={n})'


def _table(rows: list[list[str]]) -> str:
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def _show(value, width: int = 40) -> str:
  """A config value for a table cell or legend; long ones (mesh.rules) are cut short, the
  JSON line keeps them whole."""
  text = '-' if value is None else str(value)
  return text if len(text) <= width else text[:width - 3] + '...'


def render(*, fields: list[str], groups: list[dict], not_finished: list[dict],
           metrics: list[str], footer: list[str]) -> str:
  """The human table: one row per group, then the runs left out of the aggregates."""
  header = [*fields, 'n'] + [f'{m} {kind}' for m in metrics for kind in ('final', 'best')]
  rows = [header]
  for group in groups:
    cells = []
    for metric in metrics:
      stat = group['metrics'][metric]
      cells += [_cell(mean=stat[f'{kind}_mean'], half=stat[f'{kind}_ci95'], n=stat['n'],
                      group_n=group['n']) for kind in ('final', 'best')]
    rows.append([*(_show(group['fields'][f]) for f in fields), f'n={group["n"]}', *cells])
  text = [_table(rows)] if groups else ['no finished runs']
  if not_finished:
    rows = [[*fields, 'status', 'last step', 'workdir']]
    for run in not_finished:
      status = run['status']
      if run['manifest_status'] not in (None, status):
        status += f' (manifest: {run["manifest_status"]})'
      rows.append([*(_show(run['fields'].get(f)) for f in fields), status,
                   _show(run['last_step']), run['workdir']])
    text += ['', _table(rows)]
  return '\n'.join(text + [''] + footer)


def plot(*, groups: list[dict], members: list[list[Run]], metrics: list[str],
         out: str) -> None:
  """One panel per metric; per group the seed mean at steps all its seeds logged."""
  import matplotlib  # late: slow to import, and only the figure needs it
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False,
                           layout='constrained')
  for ax, metric in zip(axes[0], metrics):
    for group, runs in zip(groups, members):
      curves = [dict(zip(*series(run=run, metric=metric))) for run in runs]
      curves = [c for c in curves if c]
      if not curves:
        continue
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      stats_at = [interval(values=[c[s] for c in curves]) for s in steps]
      mean = np.array([m for m, _ in stats_at])
      label = ', '.join(f'{k}={_show(v, 24)}' for k, v in group['fields'].items())
      label = _show(label or 'all runs', 80)
      (line,) = ax.plot(steps, mean, label=f'{label} (n={len(curves)})')
      if len(curves) > 1:
        half = np.array([h for _, h in stats_at])
        ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.25)
    ax.set_xlabel('step')
    ax.set_title(metric)
    if ax.lines:
      ax.legend(fontsize='small')
  fig.suptitle('mean over seeds, 95% t-interval band')
  try:
    fig.savefig(out, dpi=100)
  except OSError as e:
    raise UserError(f'cannot write {out}: {e}') from None
  finally:
    plt.close(fig)


def collect_runs(*, paths: list[str], manifests: list[str]) -> list[Run]:
  """Runs from manifests first (they carry a status), then the directories named, each
  once."""
  manifests = list(manifests)
  dirs = []
  for path in paths:
    if os.path.isfile(path) and os.path.basename(path) == 'manifest.json':
      manifests.append(path)
    elif (os.path.isdir(path) and not os.path.isfile(os.path.join(path, 'config.json'))
          and os.path.isfile(os.path.join(path, 'manifest.json'))):
      manifests.append(os.path.join(path, 'manifest.json'))
    else:
      dirs.append(path)
  runs, seen = [], set()

  def add(run: Run) -> None:
    if os.path.realpath(run.workdir) not in seen:
      seen.add(os.path.realpath(run.workdir))
      runs.append(run)
  for manifest in manifests:
    for run in read_manifest(path=manifest):
      add(run)
  for path in dirs:
    if os.path.realpath(path) in seen:
      continue  # listed in a manifest, which may know it never started
    if not os.path.isdir(path):
      raise UserError(f'{path} is not a run directory (no such directory)')
    add(load_run(path=path))
  return runs


def main(argv: list[str] | None = None) -> int:
  parser = _Parser(prog='python -m rlhf_jax.analysis.compare', allow_abbrev=False,
                   description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='*', metavar='RUN_DIR')
  parser.add_argument('--manifest', action='append', default=[])
  parser.add_argument('--metrics', default='')
  parser.add_argument('--higher_is_better', default=DEFAULT_HIGHER_IS_BETTER)
  parser.add_argument('--out', default='compare.png')
  parser.add_argument('--ignore', default=','.join(DEFAULT_IGNORE))
  try:
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return _compare(args)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
  """argparse, but bad flags are one `error:` line (the project's bad-input contract)."""

  def error(self, message):
    raise UserError(message)


def _compare(args) -> int:
  if not args.runs and not args.manifest:
    raise UserError('give run directories and/or --manifest=PATH')
  try:
    re.compile(args.higher_is_better)
  except re.error as e:
    raise UserError(f'--higher_is_better is not a regex: {e}') from None
  runs = collect_runs(paths=args.runs, manifests=args.manifest)
  metrics = choose_metrics(runs=runs, requested=[m for m in args.metrics.split(',') if m])
  ignore = [p for p in args.ignore.split(',') if p]
  status = {run.workdir: run_status(run=run, metrics=metrics) for run in runs}
  fields = differing_fields(runs=runs, ignore=ignore)

  groups, members = [], []
  for key, group in group_runs(runs=runs, ignore=ignore).items():
    finished = [run for run in group if status[run.workdir] == 'finished']
    if finished:
      groups.append({'fields': dict(key), 'n': len(finished),
                     'metrics': aggregate(runs=finished, metrics=metrics,
                                          higher_is_better=args.higher_is_better)})
      members.append(finished)
  not_finished = [
      {'workdir': run.workdir, 'status': status[run.workdir], 'last_step': run.last_step,
       'manifest_status': run.manifest_status,
       'fields': {f: (run.config or run.overrides).get(f) for f in fields}}
      for run in runs if status[run.workdir] != 'finished']

  counts = {}
  for run in not_finished:
    counts[run['status']] = counts.get(run['status'], 0) + 1
  finished = sum(g['n'] for g in groups)
  others = ', '.join(f'{n} {s}' for s, n in counts.items())
  footer = [f'aggregates over {finished} finished run{"s" * (finished != 1)}' +
            (f'; {others} shown separately' if others else '') +
            '; mean ± 95% t-interval half-width over seeds']
  hidden = ignored_fields(runs=runs, ignore=ignore)
  if hidden:
    footer.append(f'ignored fields that differ between runs: {", ".join(hidden)}')
  print(render(fields=fields, groups=groups, not_finished=not_finished, metrics=metrics,
               footer=footer))
  if groups:
    plot(groups=groups, members=members, metrics=metrics, out=args.out)
    print(f'figure: {args.out}')
  print(json.dumps({'groups': groups, 'not_finished': not_finished,
                    'figure': args.out if groups else None}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
