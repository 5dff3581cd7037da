r"""Compare runs: group them by the config fields that differ, aggregate over seeds, plot.

  python -m rlhf_jax.analysis.compare RUN_DIR... [--manifest=PATH] \
      [--metrics=eval/true_kl,train/loss] [--higher_is_better=REGEX] \
      [--lower_is_better=REGEX] [--out=compare.png] [--ignore=FIELD,...]

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
step. Per group and metric: `final` (the value at the run's last step logging it) and, for
a metric with a direction, `best`: max over steps for names matching --higher_is_better,
min for names matching --lower_is_better (loss, perplexity, error, a kl); a metric matching
neither (or an empty regex) has no best. Both as mean ± the half-width of the 95% Student-t
interval over seeds. A `*_se` key (policy/gold_reward_se) is never a metric of its own: it
is the band of its mean's curve.

The PNG has one panel per metric (each 4.2 x 2.8 inches, three to a row), one line per group:
the seed mean at the steps all its seeds logged, with a band: mean ± 1.96·se where the runs
log the metric's `*_se` (the se of the seed mean, sqrt(sum se_i^2) / n), else the 95%
t-interval over seeds; each panel's y label says which. One legend, right of the panels
(the figure grows to hold it), labels each group by what tells it apart (`stage=dpo,
lr=3e-3`: short keys, long values cut); the table's `label` column and the JSON's "label"
map a label to all of its group's fields.

The last stdout line is one JSON object: {"groups": [{"fields", "label", "n", "metrics":
{name: {"final_mean", "final_ci95", "best_mean", "best_ci95", "n", "direction"}}}],
"not_finished": [{"workdir", "status", "last_step", ...}], "figure"}; ci95 is null for
one seed, best_* for a metric without a direction ("direction": null, else "higher" or
"lower").
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
# A kl only as a divergence (eval/true_kl, policy/kl_ref, ppo/approx_kl), not rl/kl_coef.
DEFAULT_LOWER_IS_BETTER = r'loss|perplexity|error|(^|/)(true_|approx_)?kl(_ref)?$'
SE_SUFFIX = '_se'  # policy/gold_reward_se: the standard error of policy/gold_reward
Z95 = 1.96  # a logged se becomes the normal 95% band mean ± Z95 * se


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


def se_of(metric: str) -> str:
  """The key a stage logs the standard error of `metric` under."""
  return metric + SE_SUFFIX


def is_se(metric: str) -> bool:
  return metric.endswith(SE_SUFFIX) and len(metric) > len(SE_SUFFIX)


def direction(*, metric: str, higher_is_better: str = DEFAULT_HIGHER_IS_BETTER,
              lower_is_better: str = DEFAULT_LOWER_IS_BETTER) -> str | None:
  """'higher', 'lower' or None (no best): higher wins where both regexes match, an empty
  regex matches nothing, and a standard error has no better side."""
  if is_se(metric):
    return None
  if higher_is_better and re.search(higher_is_better, metric):
    return 'higher'
  if lower_is_better and re.search(lower_is_better, metric):
    return 'lower'
  return None


def choose_metrics(*, runs: list[Run], requested: list[str]) -> list[str]:
  """The requested metrics that some run logs; by default the eval/* keys every run logs,
  else the first three numeric non-perf ones (curves before one-off values). A `*_se` key
  is never a metric of its own: asked for, it stands for its mean (drawn as that one's
  band)."""
  logged = [run for run in runs if run.rows]
  if not logged:
    raise UserError('no run has logged metrics yet (no metrics.jsonl)')
  finished = [run for run in logged if step_status(run=run) == 'finished'] or logged
  if requested:
    means = []
    for metric in requested:
      if is_se(metric):
        print(f'warning: {metric} is drawn as the band of '
              f'{metric[:-len(SE_SUFFIX)]}, not on its own', file=sys.stderr)
        metric = metric[:-len(SE_SUFFIX)]
      if metric not in means:
        means.append(metric)
    present = [m for m in means if any(series(run=r, metric=m)[0].size for r in logged)]
    if not present:
      raise UserError(f'no run logs any of the metrics {",".join(requested)}')
    for metric in sorted(set(means) - set(present)):
      print(f'warning: no run logs {metric}; skipped', file=sys.stderr)
    return present
  keys = {}  # first-seen order, as each file lists them
  for run in finished:
    for row in run.rows:
      keys.update((k, None) for k, v in row.items()
                  if k != 'step' and _is_number(v) and not is_se(k))
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


def aggregate(*, runs: list[Run], metrics: list[str], higher_is_better: str,
              lower_is_better: str = DEFAULT_LOWER_IS_BETTER) -> dict:
  """{metric: {final_mean, final_ci95, best_mean, best_ci95, n, direction}} over the runs
  (seeds) that log the metric; means are None where none does, best ones where the metric
  has no direction (a best of a value that is neither good high nor low means nothing)."""
  out = {}
  for metric in metrics:
    better = direction(metric=metric, higher_is_better=higher_is_better,
                       lower_is_better=lower_is_better)
    values = [series(run=run, metric=metric)[1] for run in runs]
    values = [v for v in values if v.size]
    final_mean, final_ci = interval(values=[v[-1] for v in values]) if values else (None, None)
    best_mean, best_ci = None, None
    if values and better:
      pick = np.max if better == 'higher' else np.min
      best_mean, best_ci = interval(values=[pick(v) for v in values])
    out[metric] = {'final_mean': final_mean, 'final_ci95': final_ci, 'best_mean': best_mean,
                   'best_ci95': best_ci, 'n': len(values), 'direction': better}
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
  """A config value for a table cell; long ones (mesh.rules, paths) are cut in the middle,
  the JSON line keeps them whole."""
  return _cut('-' if value is None else str(value), width)


def _header(*, metric: str, kind: str, better: str | None) -> str:
  if kind == 'best':
    return f'{metric} best ({"max" if better == "higher" else "min"})'
  return f'{metric} {kind}'


def render(*, fields: list[str], groups: list[dict], not_finished: list[dict],
           metrics: list[str], footer: list[str]) -> str:
  """The human table: one row per group, then the runs left out of the aggregates. A
  group's figure label leads its row where the label leaves fields out or cuts them."""
  better = {m: next((g['metrics'][m]['direction'] for g in groups), None) for m in metrics}
  kinds = {m: ('final', 'best') if better[m] else ('final',) for m in metrics}
  spelled = [', '.join(f'{k}={v}' for k, v in g['fields'].items()) for g in groups]
  labelled = any(g['fields'] and g.get('label') not in (None, text)
                 for g, text in zip(groups, spelled))
  header = [*(['label'] if labelled else []), *fields, 'n'] + [
      _header(metric=m, kind=kind, better=better[m]) for m in metrics for kind in kinds[m]]
  rows = [header]
  for group in groups:
    cells = []
    for metric in metrics:
      stat = group['metrics'][metric]
      cells += [_cell(mean=stat[f'{kind}_mean'], half=stat[f'{kind}_ci95'], n=stat['n'],
                      group_n=group['n']) for kind in kinds[metric]]
    rows.append([*([group['label']] if labelled else []),
                 *(_show(group['fields'][f]) for f in fields), f'n={group["n"]}', *cells])
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


# Labels name what tells groups apart, then up to LABEL_FIELDS fields in all, in this order
# of interest; the table and the JSON line keep every field whole.
LABEL_FIRST = ('stage', 'optim.lr', 'train.steps', 'train.batch_size')
LABEL_FIELDS = 3
LABEL_WIDTH = 16  # characters of a value before it is cut in the middle


@dataclasses.dataclass(frozen=True)
class Labels:
  """Short legend labels, one per group, and which differing fields they show (by their
  full keys) or leave to the table."""
  text: tuple
  shown: tuple
  omitted: tuple


def _cut(text: str, width: int | None) -> str:
  """Middle ellipsis: paths and names differ at their ends as often as at their starts."""
  if width is None or len(text) <= width:
    return text
  head = (width - 1) // 2
  return text[:head] + '…' + text[len(text) - (width - 1 - head):]


def _short_value(value, width: int | None) -> str:
  """3e-3 rather than 0.003, as a sweep is written; whole (repr) once width is None."""
  if isinstance(value, float) and width is not None:
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
      mantissa, exponent = f'{value:.3e}'.split('e')
      return f'{mantissa.rstrip("0").rstrip(".")}e{int(exponent)}'
    return f'{value:.4g}'
  return _cut(str(value), width)


def _short_keys(keys: list[str]) -> dict:
  """Each key's shortest dotted tail that no other key ends in (optim.lr -> lr unless
  another *.lr differs too)."""
  short = {}
  for key in keys:
    parts = key.split('.')
    for i in range(len(parts) - 1, -1, -1):
      tail = '.'.join(parts[i:])
      if not any(k != key and (k == tail or k.endswith('.' + tail)) for k in keys):
        break
    short[key] = tail
  return short


def short_labels(*, fields: list[dict]) -> Labels:
  """Legend labels for groups given by their {field: value}: only fields whose values
  differ among these groups; first those needed to tell the groups apart (stage first),
  then others up to LABEL_FIELDS; keys by their shortest unambiguous tail, long values cut
  (cut less, then not at all, while two labels would read the same); a field a group's
  config lacks (another stage's block) left out of that group's label."""
  if len(fields) < 2:
    return Labels(text=('all runs',) * len(fields), shown=(), omitted=())
  every = sorted(set().union(*fields))
  differ = [k for k in every if len({json.dumps(f.get(k)) for f in fields}) > 1]
  ordered = [k for k in LABEL_FIRST if k in differ] + [k for k in differ
                                                       if k not in LABEL_FIRST]

  def classes(keys):
    return len({json.dumps([f.get(k) for k in keys]) for f in fields})
  shown = []
  for key in ordered:
    if classes(shown + [key]) > classes(shown):
      shown.append(key)
  shown += [k for k in ordered if k not in shown][:max(0, LABEL_FIELDS - len(shown))]
  shown = [k for k in ordered if k in shown]
  names = _short_keys(differ)
  for width in (LABEL_WIDTH, 2 * LABEL_WIDTH, None):
    text = [', '.join(f'{names[k]}={_short_value(f[k], width)}' for k in shown
                      if f.get(k) is not None) or 'all runs' for f in fields]
    if len(set(text)) == len(text):
      break
  else:  # values that read alike even whole (1 and "1"): number them
    text = [f'{t} #{i}' for i, t in enumerate(text)]
  return Labels(text=tuple(text), shown=tuple(shown),
                omitted=tuple(k for k in ordered if k not in shown))


@dataclasses.dataclass(frozen=True)
class Band:
  """One group's curve of one metric, as drawn: [S] steps every seed logged, the seed
  mean there and the band's [S] lower and upper edges. kind: 'se' (mean ± Z95 * se, the se
  of the seed mean from each run's logged `*_se`: sqrt(sum se_i^2) / n), 't95' (the 95%
  Student-t interval over the n seeds) or None (one seed and no se: no band)."""
  steps: np.ndarray
  mean: np.ndarray
  lower: np.ndarray
  upper: np.ndarray
  kind: str | None
  n: int


def bands(*, runs: list[Run], metric: str) -> Band | None:
  """The curve and band `figure` draws for these runs (seeds of one group); None when
  none logs the metric."""
  curves, errors = [], []
  for run in runs:
    curve = dict(zip(*series(run=run, metric=metric)))
    if curve:
      curves.append(curve)
      errors.append(dict(zip(*series(run=run, metric=se_of(metric)))))
  if not curves:
    return None
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  with_se = sorted(set(steps).intersection(*(set(e) for e in errors)))
  use_se = bool(with_se) and not is_se(metric)
  if use_se:
    steps = with_se
  values = np.array([[c[s] for s in steps] for c in curves], dtype=np.float64)  # [n, S]
  n = len(curves)
  mean = values.mean(axis=0)
  if use_se:
    se = np.array([[e[s] for s in steps] for e in errors], dtype=np.float64)
    half, kind = Z95 * np.sqrt(np.sum(se ** 2, axis=0)) / n, 'se'
  elif n > 1:
    half = stats.t.ppf(0.975, n - 1) * values.std(axis=0, ddof=1) / math.sqrt(n)
    kind = 't95'
  else:
    half, kind = np.zeros_like(mean), None
  return Band(steps=np.array(steps, dtype=np.int64), mean=mean, lower=mean - half,
              upper=mean + half, kind=kind, n=n)


# The figure in inches: every panel PANEL wide and high whatever it holds; the legend gets
# its own column to the right, as wide and high as its labels need.
PANEL = (4.2, 2.8)
MAX_COLUMNS = 3
MARGIN = {'left': 0.9, 'right': 0.2, 'top': 0.85, 'bottom': 0.6, 'wspace': 1.0,
          'hspace': 0.95, 'legend': 0.35}
LEGEND_ROWS = 24  # entries per legend column
BAND_TEXT = {'se': f'band: mean ± {Z95}·se', 't95': 'band: 95% t-interval over seeds',
             None: 'one seed: no band'}


def _layout(*, count: int) -> tuple[int, int]:
  columns = min(count, MAX_COLUMNS)
  return columns, -(-count // columns)


def figure(*, curves: dict, labels: Labels, directions: dict):
  """The matplotlib Figure: one panel per metric (curves: {metric: [Band | None per
  group]}), line i for group i in every panel, one legend outside the panels."""
  import matplotlib  # late: slow to import, and only the figure needs it
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  metrics = list(curves)
  columns, rows = _layout(count=len(metrics))
  grid_w = (MARGIN['left'] + columns * PANEL[0] + (columns - 1) * MARGIN['wspace'])
  grid_h = (MARGIN['top'] + rows * PANEL[1] + (rows - 1) * MARGIN['hspace'] +
            MARGIN['bottom'])
  fig = plt.figure(figsize=(grid_w, grid_h), dpi=100)
  axes = [fig.add_axes((0, 0, 1, 1)) for _ in metrics]
  handles = {}
  styles = ('-', '--', ':', '-.')
  for ax, metric in zip(axes, metrics):
    kinds = []
    for i, band in enumerate(curves[metric]):
      if band is None:
        continue
      color, style = f'C{i % 10}', styles[i // 10 % len(styles)]
      (line,) = ax.plot(band.steps, band.mean, color=color, linestyle=style,
                        marker='o' if band.steps.size == 1 else None,
                        label=f'{labels.text[i]} (n={band.n})')
      handles.setdefault(i, line)
      if band.kind:
        ax.fill_between(band.steps, band.lower, band.upper, color=color, alpha=0.2,
                        linewidth=0)
      kinds.append(band.kind)
    arrow = {'higher': ' (↑ better)', 'lower': ' (↓ better)'}.get(directions.get(metric), '')
    ax.set_title(metric + arrow, fontsize='medium')
    ax.set_xlabel('step')
    ax.set_ylabel('; '.join(BAND_TEXT[k] for k in dict.fromkeys(kinds)), fontsize='small')
    ax.grid(alpha=0.3)
  title = 'groups (n = seeds)'
  if labels.omitted:
    title += f'\n{len(labels.omitted)} more differing field' + (
        's' * (len(labels.omitted) != 1)) + ': see the table'
  legend = fig.legend([handles[i] for i in sorted(handles)],
                      [handles[i].get_label() for i in sorted(handles)], loc='upper left',
                      title=title, fontsize='small', title_fontsize='small', frameon=False,
                      alignment='left',
                      ncols=max(1, -(-len(handles) // LEGEND_ROWS)))
  # Text sizes are in points, so the legend's size in inches does not change when the
  # figure grows to hold it: measure once, then place everything.
  fig.canvas.draw()
  box = legend.get_window_extent()
  legend_w, legend_h = box.width / fig.dpi, box.height / fig.dpi
  width = grid_w + MARGIN['legend'] + legend_w + MARGIN['right']
  height = max(grid_h, MARGIN['top'] + legend_h + MARGIN['bottom'])
  fig.set_size_inches(width, height)
  for k, ax in enumerate(axes):
    row, column = divmod(k, columns)
    left = MARGIN['left'] + column * (PANEL[0] + MARGIN['wspace'])
    top = MARGIN['top'] + row * (PANEL[1] + MARGIN['hspace'])
    ax.set_position((left / width, 1 - (top + PANEL[1]) / height, PANEL[0] / width,
                     PANEL[1] / height))
  legend.set_bbox_to_anchor(((grid_w + MARGIN['legend']) / width,
                             1 - MARGIN['top'] / height), transform=fig.transFigure)
  fig.suptitle('mean over seeds at the steps all seeds logged', fontsize='medium',
               y=1 - 0.15 / height, va='top')
  return fig


def plot(*, groups: list[dict], members: list[list[Run]], metrics: list[str], out: str,
         labels: Labels | None = None) -> None:
  """figure() for these groups, written to `out`."""
  labels = labels or short_labels(fields=[g['fields'] for g in groups])
  curves = {m: [bands(runs=runs, metric=m) for runs in members] for m in metrics}
  directions = {m: next((g['metrics'][m].get('direction') for g in groups), None)
                for m in metrics}
  fig = figure(curves=curves, labels=labels, directions=directions)
  import matplotlib.pyplot as plt  # after figure() chose the Agg backend
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
  parser.add_argument('--lower_is_better', default=DEFAULT_LOWER_IS_BETTER)
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
  for flag in ('higher_is_better', 'lower_is_better'):
    try:
      re.compile(getattr(args, flag))
    except re.error as e:
      raise UserError(f'--{flag} is not a regex: {e}') from None
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
                                          higher_is_better=args.higher_is_better,
                                          lower_is_better=args.lower_is_better)})
      members.append(finished)
  labels = short_labels(fields=[g['fields'] for g in groups])
  for group, label in zip(groups, labels.text):
    group['label'] = label
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
    plot(groups=groups, members=members, metrics=metrics, out=args.out, labels=labels)
    print(f'figure: {args.out}')
  print(json.dumps({'groups': groups, 'not_finished': not_finished,
                    'figure': args.out if groups else None}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
