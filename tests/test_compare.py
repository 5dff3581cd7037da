"""rlhf_jax.analysis.compare on synthetic run directories with known metrics: group means
and t-interval half-widths against NumPy/SciPy computed here, best as min for a loss, max
for a reward and none for a metric without a direction, a `*_se` metric as the band of its
mean (edges against NumPy), unfinished runs listed and kept out of the aggregates, sweep
manifests, grouping that ignores seeds and per-run paths, short legend labels, panels of one
size with the legend outside them, and bad input."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import REPO, cli_env
from rlhf_jax.analysis import compare

STEPS = (0, 10, 20, 30)
LRS = (1e-3, 3e-3)
SEEDS = (0, 1, 2)
METRICS = '--metrics=train/loss,policy/gold_reward'


def curves_for(*, lr: float, seed: int) -> dict:
  """Per-metric values at STEPS, not monotone, so best and final differ."""
  rng = np.random.default_rng([int(lr * 1e4), seed])
  return {'train/loss': rng.uniform(1.0, 3.0, len(STEPS)),
          'policy/gold_reward': rng.uniform(-1.0, 1.0, len(STEPS)),
          'eval/true_kl': rng.uniform(0.1, 0.5, len(STEPS))}


def write_run(workdir, *, lr: float, seed: int, last_step: int = 30, nan_at=None,
              stage: str = 'pretrain', extra: dict | None = None) -> dict:
  """A run directory (config.json, metrics.jsonl up to last_step); returns its curves
  (curves_for's, plus `extra`: {metric: values at STEPS})."""
  os.makedirs(workdir, exist_ok=True)
  config = {'stage': stage, 'seed': seed, 'optim': {'lr': lr}, 'train': {'steps': 30},
            # A per-run path, as a stage started from another run would have.
            'init': {'run': os.path.join(str(workdir), 'parent')}}
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  curves = {**curves_for(lr=lr, seed=seed), **(extra or {})}
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i, step in enumerate(STEPS):
      if step > last_step:
        break
      row = {'step': step, 'perf/step_s': 0.01, **{k: float(v[i]) for k, v in curves.items()}}
      if step == nan_at:
        row['train/loss'] = math.nan
      f.write(json.dumps(row) + '\n')
  return curves


def write_grid(root) -> dict:
  """2 learning rates x 3 seeds, all finished; {lr: [curves per seed]}."""
  return {lr: [write_run(root / f'lr{lr}_s{seed}', lr=lr, seed=seed) for seed in SEEDS]
          for lr in LRS}


def run_main(capsys, *argv) -> tuple[int, str, dict | None]:
  code = compare.main(list(argv))
  out = capsys.readouterr().out
  last = out.strip().splitlines()[-1] if code == 0 else None
  return code, out, json.loads(last) if last else None


def expected_interval(values) -> tuple[float, float]:
  values = np.asarray(values, dtype=np.float64)
  half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
  return float(np.mean(values)), float(half)


def check_grid_numbers(figures: dict, grid: dict) -> None:
  assert [g['fields'] for g in figures['groups']] == [{'optim.lr': lr} for lr in LRS]
  for group, lr in zip(figures['groups'], LRS):
    assert group['n'] == 3
    for metric, best in (('train/loss', np.min), ('policy/gold_reward', np.max)):
      got = group['metrics'][metric]
      final_mean, final_half = expected_interval([c[metric][-1] for c in grid[lr]])
      best_mean, best_half = expected_interval([best(c[metric]) for c in grid[lr]])
      np.testing.assert_allclose(
          [got['final_mean'], got['final_ci95'], got['best_mean'], got['best_ci95']],
          [final_mean, final_half, best_mean, best_half], rtol=1e-12)
      assert got['best_mean'] != got['final_mean']  # the curves are not monotone


def test_groups_aggregate_over_seeds_with_t_intervals(tmp_path, capsys):
  grid = write_grid(tmp_path)
  out_png = tmp_path / 'fig.png'
  code, out, figures = run_main(capsys, *(str(p) for p in sorted(tmp_path.iterdir())),
                                METRICS, f'--out={out_png}')
  assert code == 0
  check_grid_numbers(figures, grid)
  assert figures['not_finished'] == []
  assert 'optim.lr' in out and 'n=3' in out and '±' in out
  with open(out_png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_best_direction_follows_the_regexes(tmp_path, capsys):
  grid = write_grid(tmp_path)
  dirs = [str(p) for p in sorted(tmp_path.iterdir())]
  out = f'--out={tmp_path / "f.png"}'
  code, table, figures = run_main(capsys, *dirs, '--metrics=policy/gold_reward',
                                  '--higher_is_better=^nothing$', out)
  assert code == 0  # matching neither regex now: no best at all
  got = figures['groups'][0]['metrics']['policy/gold_reward']
  assert (got['best_mean'], got['best_ci95'], got['direction']) == (None, None, None)
  assert 'best' not in table.split('\n')[0]
  code, _, figures = run_main(capsys, *dirs, '--metrics=policy/gold_reward',
                              '--higher_is_better=^nothing$', '--lower_is_better=reward', out)
  assert code == 0
  got = figures['groups'][0]['metrics']['policy/gold_reward']
  assert got['direction'] == 'lower'
  assert got['best_mean'] == pytest.approx(
      np.mean([np.min(c['policy/gold_reward']) for c in grid[LRS[0]]]))


def se_grid(root) -> dict:
  """2 learning rates x 2 seeds logging policy/gold_reward_se (not monotone either) and
  train/grad_norm (a metric without a direction); {lr: [curves per seed]}."""
  grid = {}
  for lr in LRS:
    for seed in SEEDS[:2]:
      rng = np.random.default_rng([int(lr * 1e4), seed, 7])
      extra = {'policy/gold_reward_se': rng.uniform(0.01, 0.2, len(STEPS)),
               'train/grad_norm': rng.uniform(0.5, 5.0, len(STEPS))}
      grid.setdefault(lr, []).append(write_run(root / f'lr{lr}_s{seed}', lr=lr, seed=seed,
                                               extra=extra))
  return grid


def test_se_is_the_band_of_its_mean_never_a_metric(tmp_path, capsys):
  grid = se_grid(tmp_path)
  runs = [compare.load_run(path=str(p)) for p in sorted(tmp_path.iterdir())]
  # Without eval/* keys the default is the first three curves, gold_reward_se not one.
  no_eval = [dataclasses.replace(r, rows=tuple(
      {k: v for k, v in row.items() if not k.startswith('eval/')} for row in r.rows))
      for r in runs]
  assert compare.choose_metrics(runs=no_eval, requested=[]) == [
      'train/loss', 'policy/gold_reward', 'train/grad_norm']
  assert compare.choose_metrics(
      runs=runs, requested=['policy/gold_reward_se', 'train/loss']) == [
          'policy/gold_reward', 'train/loss']
  for lr in LRS:
    members = [r for r in runs if r.config['optim.lr'] == lr]
    band = compare.bands(runs=members, metric='policy/gold_reward')
    gold = np.array([c['policy/gold_reward'] for c in grid[lr]])  # [seeds, steps]
    se = np.array([c['policy/gold_reward_se'] for c in grid[lr]])
    mean = gold.mean(axis=0)
    se_mean = np.sqrt((se ** 2).sum(axis=0)) / len(se)  # se of a mean of 2 estimates
    assert band.kind == 'se' and band.n == 2
    np.testing.assert_array_equal(band.steps, STEPS)
    np.testing.assert_allclose(band.lower, mean - 1.96 * se_mean, rtol=1e-12)
    np.testing.assert_allclose(band.upper, mean + 1.96 * se_mean, rtol=1e-12)
    loss = compare.bands(runs=members, metric='train/loss')  # no se logged: t over seeds
    values = np.array([c['train/loss'] for c in grid[lr]])
    half = stats.t.ppf(0.975, 1) * values.std(axis=0, ddof=1) / np.sqrt(2)
    assert loss.kind == 't95'
    np.testing.assert_allclose(loss.upper, values.mean(axis=0) + half, rtol=1e-12)
  # What the figure draws is that band: the shaded polygon spans lower..upper at each step.
  code, table, figures = run_main(capsys, *(r.workdir for r in runs),
                                  '--metrics=policy/gold_reward,policy/gold_reward_se',
                                  f'--out={tmp_path / "f.png"}')
  assert code == 0 and list(figures['groups'][0]['metrics']) == ['policy/gold_reward']
  assert 'gold_reward_se' not in table
  members = [[r for r in runs if r.config['optim.lr'] == lr] for lr in LRS]
  curves = {'policy/gold_reward': [compare.bands(runs=m, metric='policy/gold_reward')
                                   for m in members]}
  fig = compare.figure(curves=curves, labels=compare.short_labels(
      fields=[{'optim.lr': lr} for lr in LRS]), directions={})
  (ax,) = fig.axes
  assert ax.get_ylabel() == 'band: mean ± 1.96·se' and len(ax.collections) == len(LRS)
  for band, polygon in zip(curves['policy/gold_reward'], ax.collections):
    vertices = polygon.get_paths()[0].vertices
    for step, low, high in zip(band.steps, band.lower, band.upper):
      ys = vertices[vertices[:, 0] == step, 1]
      np.testing.assert_allclose([ys.min(), ys.max()], [low, high], rtol=1e-12)


def test_a_metric_without_direction_has_no_best(tmp_path, capsys):
  grid = se_grid(tmp_path)
  code, table, figures = run_main(capsys, *(str(p) for p in sorted(tmp_path.iterdir())),
                                  '--metrics=train/grad_norm,train/loss',
                                  f'--out={tmp_path / "f.png"}')
  assert code == 0
  header = table.split('\n')[0]
  assert 'train/grad_norm final' in header and 'train/grad_norm best' not in header
  assert 'train/loss best (min)' in header
  for group, lr in zip(figures['groups'], LRS):
    norm = group['metrics']['train/grad_norm']
    assert (norm['best_mean'], norm['best_ci95'], norm['direction']) == (None, None, None)
    final_mean, final_half = expected_interval([c['train/grad_norm'][-1] for c in grid[lr]])
    np.testing.assert_allclose([norm['final_mean'], norm['final_ci95']],
                               [final_mean, final_half], rtol=1e-12)
    assert group['metrics']['train/loss']['best_mean'] == pytest.approx(
        np.mean([np.min(c['train/loss']) for c in grid[lr]]), rel=1e-12)
  cases = {'eval/true_kl': 'lower', 'policy/kl_ref': 'lower', 'ppo/approx_kl': 'lower',
           'ppo/value_loss': 'lower', 'collapse/perplexity': 'lower', 'rl/kl_coef': None,
           'rm/calibration_error': 'lower', 'rm/gold_accuracy': 'higher',
           'policy/gold_reward': 'higher', 'policy/gold_reward_se': None,
           'train/grad_norm': None}
  assert {m: compare.direction(metric=m) for m in cases} == cases


def test_labels_name_only_what_tells_groups_apart():
  wiki = 'text:/data/corpora/english_wikipedia_2024_v{}.txt'
  fields = [{'stage': 'sft', 'optim.lr': 1e-3, 'data.source': wiki.format(1), 'seed': 0},
            {'stage': 'dpo', 'optim.lr': 3e-3, 'data.source': wiki.format(1), 'seed': 0},
            {'stage': 'dpo', 'optim.lr': 1e-3, 'data.source': wiki.format(2), 'seed': 0}]
  labels = compare.short_labels(fields=fields)
  assert labels.text == ('stage=sft, lr=1e-3, source=text:/d…4_v1.txt',
                         'stage=dpo, lr=3e-3, source=text:/d…4_v1.txt',
                         'stage=dpo, lr=1e-3, source=text:/d…4_v2.txt')
  assert labels.omitted == ()
  # Stage settles it; lr and steps come next by interest, the rest goes to the table; a
  # key another differing key also ends in keeps its block; a block only DPO has is
  # left out of the others' labels.
  fields = [{'stage': s, 'optim.lr': lr, 'train.steps': n, 'optim.warmup_steps': w,
             'sched.warmup_steps': w + 1} for s, lr, n, w in
            (('sft', 1e-3, 300, 20), ('dpo', 3e-4, 300, 20), ('ppo', 1e-4, 100, 10))]
  labels = compare.short_labels(fields=fields)
  assert labels.text == ('stage=sft, lr=1e-3, steps=300', 'stage=dpo, lr=3e-4, steps=300',
                         'stage=ppo, lr=1e-4, steps=100')
  assert labels.omitted == ('optim.warmup_steps', 'sched.warmup_steps')
  assert compare.short_labels(fields=[{**f, 'stage': 'sft'} for f in fields]).text[0] == (
      'lr=1e-3, steps=300, optim.warmup_steps=20')
  labels = compare.short_labels(fields=[{'stage': 'sft'}, {'stage': 'dpo', 'dpo.beta': 0.1}])
  assert labels.text == ('stage=sft', 'stage=dpo, beta=0.1')
  # Values alike where the cut leaves them are cut less.
  same = ['p' * 10 + c + 'q' * 30 for c in 'AB']
  assert compare.short_labels(fields=[{'data.source': v} for v in same]).text == tuple(
      'source=pppppppppp' + c + 'qqqq…' + 'q' * 16 for c in 'AB')
  assert compare.short_labels(fields=[{'stage': 'sft'}]).text == ('all runs',)


@pytest.mark.slow  # over 8 s: left out of the quick check
def test_panels_keep_their_size_and_the_legend_stays_outside():
  import matplotlib.pyplot as plt
  steps = np.arange(0, 50, 10)
  band = compare.Band(steps=steps, mean=steps * 1.0, lower=steps - 1.0, upper=steps + 1.0,
                      kind='t95', n=2)
  long = [{'stage': s, 'optim.lr': 10.0 ** -k, 'data.source': f'text:/a/long/path/{k}.txt'}
          for s in ('sft', 'dpo') for k in range(2, 9)]  # 14 groups, long labels
  sizes = set()
  for count in (1, 3, 7):
    for fields in ([{}], long[:3], long):
      curves = {f'm/metric_{k}': [band] * len(fields) for k in range(count)}
      fig = compare.figure(curves=curves, labels=compare.short_labels(fields=fields),
                           directions={})
      fig.canvas.draw()
      width, height = fig.get_size_inches()
      (legend,) = fig.legends
      box = legend.get_window_extent()
      assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
      assert len(fig.axes) == count
      for ax in fig.axes:
        position = ax.get_position()
        sizes.add((round(position.width * width, 9), round(position.height * height, 9)))
        for extent in (ax.get_window_extent(), ax.get_tightbbox()):
          assert not box.overlaps(extent), (count, len(fields))
      plt.close(fig)
  assert sizes == {compare.PANEL}


def test_unfinished_runs_are_listed_not_aggregated(tmp_path, capsys):
  grid = write_grid(tmp_path)
  write_run(tmp_path / 'short', lr=LRS[0], seed=3, last_step=20)
  write_run(tmp_path / 'nan', lr=LRS[1], seed=4, nan_at=20)
  code, out, figures = run_main(capsys, *(str(p) for p in sorted(tmp_path.iterdir())),
                                METRICS, f'--out={tmp_path / "f.png"}')
  assert code == 0
  check_grid_numbers(figures, grid)  # n stays 3, means unchanged
  listed = {os.path.basename(r['workdir']): (r['status'], r['last_step'], r['fields'])
            for r in figures['not_finished']}
  assert listed == {'nan': ('failed', 30, {'optim.lr': LRS[1]}),
                    'short': ('incomplete', 20, {'optim.lr': LRS[0]})}
  table = out.split('\n{')[0]
  assert 'incomplete' in table and 'failed' in table
  assert str(tmp_path / 'short') in table and str(tmp_path / 'nan') in table
  assert 'aggregates over 6 finished runs; 1 failed, 1 incomplete shown separately' in table


def test_manifest_with_failed_and_unstarted_runs(tmp_path, capsys):
  sweep = tmp_path / 'sweep'
  grid = write_grid(sweep)
  write_run(sweep / 'crashed', lr=LRS[0], seed=5)  # full metrics, but the sweep saw it fail
  runs = [{'name': p.name, 'workdir': p.name, 'overrides': {}, 'status': 'finished',
           'returncode': 0} for p in sorted(sweep.iterdir())]
  for run in runs:
    if run['name'] == 'crashed':
      run.update(status='failed', returncode=1)
  runs.append({'name': 'later', 'workdir': 'later', 'overrides': {'optim.lr': 0.01, 'seed': 0},
               'status': 'pending', 'returncode': None})
  manifest = sweep / 'manifest.json'
  (tmp_path / 'copy').mkdir()
  # In its root (whose recorded name no longer leads there: a moved sweep), given as a
  # positional file; and a copy elsewhere that finds the runs through its root.
  cases = (('moved/sweep', manifest, [str(manifest)]),
           (str(sweep), tmp_path / 'copy' / 'manifest.json',
            [f'--manifest={tmp_path / "copy" / "manifest.json"}']))
  for root, path, argv in cases:
    path.write_text(json.dumps({'config': 'configs/pretrain.py:tiny', 'root': root,
                                'runs': runs}))
    code, out, figures = run_main(capsys, *argv, METRICS, f'--out={tmp_path / "f.png"}')
    assert code == 0
    check_grid_numbers(figures, grid)
    listed = {os.path.basename(r['workdir']): (r['status'], r['last_step'], r['manifest_status'],
                                               r['fields'])
              for r in figures['not_finished']}
    assert listed == {'crashed': ('failed', 30, 'failed', {'optim.lr': LRS[0]}),
                      'later': ('not started', None, 'pending', {'optim.lr': 0.01})}
    assert 'not started (manifest: pending)' in out
  # A not-started directory named on the command line is fine when a manifest lists it.
  code, _, figures = run_main(capsys, f'--manifest={manifest}', str(sweep / 'later'), METRICS,
                              f'--out={tmp_path / "f.png"}')
  assert code == 0 and len(figures['not_finished']) == 2


def test_grouping_ignores_seed_and_per_run_paths(tmp_path):
  for seed in SEEDS:
    write_run(tmp_path / f'a{seed}', lr=1e-3, seed=seed)
  write_run(tmp_path / 'b', lr=3e-3, seed=0)
  runs = [compare.load_run(path=str(p)) for p in sorted(tmp_path.iterdir())]
  groups = compare.group_runs(runs=runs, ignore=list(compare.DEFAULT_IGNORE))
  assert {key: len(members) for key, members in groups.items()} == {
      (('optim.lr', 1e-3),): 3, (('optim.lr', 3e-3),): 1}
  assert compare.ignored_fields(runs=runs, ignore=list(compare.DEFAULT_IGNORE)) == [
      'init.run', 'seed']
  # Without the default, every run's own init.run splits it off.
  assert len(compare.group_runs(runs=runs, ignore=[])) == 4
  assert list(compare.group_runs(runs=runs, ignore=['optim', 'init.run'])) == [()]


def test_default_metrics_and_loop_lengths(tmp_path, capsys):
  write_grid(tmp_path)
  code, _, figures = run_main(capsys, *(str(p) for p in sorted(tmp_path.iterdir())),
                              f'--out={tmp_path / "f.png"}')
  assert code == 0 and list(figures['groups'][0]['metrics']) == ['eval/true_kl']
  collapse = {'stage': 'collapse', 'collapse.generations': 5, 'train.steps': 150}
  rounds = {'stage': 'rlhf_rounds', 'rounds.num': 3}
  assert compare.expected_last_step(config=collapse) == 4  # steps are generations 0..4
  assert compare.expected_last_step(config=rounds) == 3  # step 0 is the base, then 1..3
  assert compare.expected_last_step(config={'stage': 'pipeline'}) is None
  rows = ({'step': 0}, {'step': 2})
  unknown = compare.Run(workdir='x', config={'stage': 'pipeline'}, rows=rows)
  assert compare.step_status(run=unknown) == 'unknown'
  told = compare.Run(workdir='x', config={'stage': 'pipeline'}, rows=rows,
                     manifest_status='finished')
  assert compare.step_status(run=told) == 'finished'


def test_a_finished_selfplay_run_is_finished(tmp_path):
  """Self-play logs its evaluated iterations 0, every, ..., iterations (the last always),
  not train.steps (its updates per iteration): the rows a finished run writes are finished,
  one evaluation short is incomplete."""
  from conftest import load_config
  from rlhf_jax.config import to_dict
  from rlhf_jax.loops.selfplay import evaluated
  config = load_config('selfplay', 'tic_tac_toe')
  flat = compare.flatten(tree=to_dict(config))
  n = config.selfplay.iterations
  assert n != config.train.steps  # else the old table's default would pass by luck
  logged = [{'step': i} for i in range(n + 1) if evaluated(config, i)]
  assert logged[-1]['step'] == n
  finished = compare.Run(workdir='x', config=flat, rows=tuple(logged))
  assert compare.expected_last_step(config=flat) == n
  assert compare.step_status(run=finished) == 'finished'
  short = compare.Run(workdir='x', config=flat, rows=tuple(logged[:-1]))
  assert compare.step_status(run=short) == 'incomplete'


def test_a_line_cut_short_at_the_end_is_dropped(tmp_path):
  write_run(tmp_path / 'r', lr=1e-3, seed=0, last_step=20)
  with open(tmp_path / 'r' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 30, "train/lo')
  run = compare.load_run(path=str(tmp_path / 'r'))
  assert run.last_step == 20 and compare.step_status(run=run) == 'incomplete'


def test_bad_input_is_one_error_line(tmp_path, capsys):
  write_run(tmp_path / 'ok', lr=1e-3, seed=0)
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'config.json').write_text('{"stage": ')
  cases = {'no run logs any of the metrics': [str(tmp_path / 'ok'), '--metrics=nope/x'],
           'cannot read': [str(tmp_path / 'broken')],
           'not a regex': [str(tmp_path / 'ok'), '--higher_is_better=(']}
  for message, argv in cases.items():
    assert compare.main([*argv, f'--out={tmp_path / "f.png"}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err


def test_cli_rejects_a_directory_that_is_not_a_run(tmp_path):
  (tmp_path / 'empty').mkdir()
  env = {**cli_env(), 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-m', 'rlhf_jax.analysis.compare',
                           str(tmp_path / 'empty')], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f'error: {tmp_path / "empty"} is not a run directory (no config.json)']
  assert not os.path.exists(os.path.join(REPO, 'compare.png'))
