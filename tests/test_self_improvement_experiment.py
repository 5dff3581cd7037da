"""experiments/self_improvement.py's bookkeeping, with the loop's CLI runs replaced by run
directories of known metrics: curves.csv holds the runs' metrics.jsonl values (empty where
a round logs no filter figures, nan where they are undefined), ceilings.csv's means and
95% half-widths are NumPy's with scipy's t quantile, the ceiling p_inf of runs whose pass@1
follows an exact saturating curve is the planted one, and bad input is one error line."""
import csv
import importlib.util
import json
import math
import os
import zlib

import numpy as np
import pytest
from scipy import stats

from conftest import REPO

SEEDS, ROUNDS = 3, 5
FILTERS, SCHEDULES = ('exact', 'none'), ('replace', 'accumulate')
# exact_replace's pass@1 is p_inf - (p_inf - P_0) exp(-r / R0), p_inf planted per seed; the
# seed mean of such curves is the same curve with the mean p_inf.
P_0, R0, P_INF = 0.2, 1.5, (0.55, 0.62, 0.7)
POLICY = ('pass@1', 'pass@8', 'maj@8', 'true_kl', 'distinct_traces', 'answer_entropy')
FILTER = ('precision', 'recall', 'kept_fraction', 'labels')
KEYS = {**{m: f'eval/{m}' for m in POLICY[:3]}, **{m: f'self_improve/{m}' for m in
                                                   (*POLICY[3:], *FILTER)}}


@pytest.fixture
def script(monkeypatch):
  # experiments/ on sys.path, as running the script puts it: it imports sibling scripts.
  monkeypatch.syspath_prepend(os.path.join(REPO, 'experiments'))
  spec = importlib.util.spec_from_file_location(
      'self_improvement', os.path.join(REPO, 'experiments', 'self_improvement.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def fake_metrics(workdir: str, rounds: int) -> list[dict]:
  """The loop's metrics.jsonl rows for one run, drawn per workdir (module docstring)."""
  group, seed = os.path.basename(os.path.dirname(workdir)), int(workdir[-1])
  rng = np.random.default_rng(zlib.crc32(workdir.encode()))
  rows = []
  for r in range(rounds + 1):
    row = {'step': r, **{KEYS[m]: int(rng.integers(0, 257)) / 256 for m in POLICY}}
    if group == 'exact_replace':
      row['eval/pass@1'] = P_INF[seed] - (P_INF[seed] - P_0) * math.exp(-r / R0)
    if r < rounds:
      row.update({KEYS[m]: float(rng.uniform()) for m in FILTER[:3]})
      row[KEYS['labels']] = 64 * (r + 1)
      # Undefined precision (the filter kept nothing): at one round, or at every round.
      if r == 2 or (group == 'none_accumulate' and seed == 1):
        row[KEYS['precision']] = float('nan')
    rows.append(row)
  return rows


def fake_run_cli(calls: list, rounds: int = ROUNDS):
  def run(config, workdir, overrides, *, train_block=True):
    assert not train_block  # a loop config has no train block of its own
    calls.append((config, workdir, list(overrides)))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({'stage': 'self_improve', 'task': {'name': 'sum_mod'}}, f)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in fake_metrics(workdir, rounds))
  return run


def sft_run(tmp_path):
  sft = tmp_path / 'sft'
  sft.mkdir()
  (sft / 'config.json').write_text(json.dumps({'stage': 'sft', 'task': {'name': 'sum_mod'}}))
  return sft


def mean_and_half(values):
  values = np.asarray(values, np.float64)
  return values.mean(), stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(
      values.size)


def same(cell: str, value) -> bool:
  if value is None:
    return cell == ''
  return math.isnan(value) and cell == 'nan' or float(cell) == value


@pytest.mark.slow  # 5 s, mostly importing jax and matplotlib (as verifiable_rl's)
def test_csvs_and_ceilings_equal_the_runs_metrics(script, tmp_path, monkeypatch, capsys):
  from rlhf_jax.analysis.self_improve_metrics import fit_saturating
  calls = []
  monkeypatch.setattr(script, 'run_cli', fake_run_cli(calls))
  sft, out = sft_run(tmp_path), tmp_path / 'out'
  script.main([f'--out={out}', f'--sft_run={sft}', f'--filters={",".join(FILTERS)}',
               f'--schedules={",".join(SCHEDULES)}', f'--seeds={SEEDS}', f'--rounds={ROUNDS}',
               '--extra=--config.self_improve.label_budget=64'])
  figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

  groups = [(f, s) for f in FILTERS for s in SCHEDULES]
  runs = {(f, s, k): fake_metrics(str(out / f'{f}_{s}' / f'seed{k}'), ROUNDS)
          for f, s in groups for k in range(SEEDS)}
  with open(out / 'curves.csv') as f:
    curves = list(csv.DictReader(f))
  assert [(r['filter'], r['schedule'], int(r['seed']), int(r['round'])) for r in curves] == [
      (f, s, k, r) for f, s in groups for k in range(SEEDS) for r in range(ROUNDS + 1)]
  for row in curves:
    record = runs[row['filter'], row['schedule'], int(row['seed'])][int(row['round'])]
    for column, key in KEYS.items():
      assert same(row[column], record.get(key)), (row, column)

  with open(out / 'ceilings.csv') as f:
    ceilings = {(r['filter'], r['schedule']): r for r in csv.DictReader(f)}
  assert list(ceilings) == groups
  for (f, s), row in ceilings.items():
    curves_ = np.array([[rec['eval/pass@1'] for rec in runs[f, s, k]] for k in range(SEEDS)])
    fits = [fit_saturating(np.arange(ROUNDS + 1.0), c) for c in curves_]
    expected = {'p_0': [x.p_0 for x in fits], 'p_inf': [x.p_inf for x in fits],
                'pass@1_round0': curves_[:, 0], 'pass@1_final': curves_[:, -1]}
    for name, values in expected.items():
      mean, half = mean_and_half(values)
      assert float(row[f'{name}_mean']) == pytest.approx(mean, rel=1e-12), name
      assert float(row[f'{name}_ci95']) == pytest.approx(half, rel=1e-9, abs=1e-15), name
    per_seed = [[rec['self_improve/precision'] for rec in runs[f, s, k][:ROUNDS]]
                for k in range(SEEDS)]
    per_seed = [sum(v for v in p if not math.isnan(v)) / sum(not math.isnan(v) for v in p)
                for p in per_seed if not all(math.isnan(v) for v in p)]
    assert float(row['precision_mean']) == pytest.approx(sum(per_seed) / len(per_seed),
                                                         rel=1e-12)
    assert float(row['labels_final']) == 64 * ROUNDS
    assert (int(row['seeds']), int(row['rounds'])) == (SEEDS, ROUNDS)

  # The ceiling of exact saturating curves: each seed's planted p_inf, so the mean and the
  # interval of the planted values, and the seed-mean curve's fit their mean.
  exact = ceilings['exact', 'replace']
  mean, half = mean_and_half(P_INF)
  assert int(exact['fits_converged']) == SEEDS and exact['mean_fit_converged'] == 'True'
  assert int(exact['fits_identified']) == SEEDS  # planted r0 within the rounds
  assert float(exact['p_inf_mean']) == pytest.approx(mean, abs=1e-6)
  assert float(exact['p_inf_ci95']) == pytest.approx(half, abs=1e-5)
  assert float(exact['p_0_mean']) == pytest.approx(P_0, abs=1e-6)
  assert float(exact['r0_mean']) == pytest.approx(R0, abs=1e-4)
  assert float(exact['mean_fit_p_inf']) == pytest.approx(mean, abs=1e-6)
  assert float(exact['mean_fit_rmse']) < 1e-6

  assert [c['p_inf_mean'] for c in figures['ceilings']] == pytest.approx(
      [float(ceilings[g]['p_inf_mean']) for g in groups], rel=1e-3)
  by_dir = {os.path.relpath(w, out): (c, o) for c, w, o in calls}
  assert sorted(by_dir) == sorted(f'{f}_{s}/seed{k}' for f, s in groups for k in range(SEEDS))
  assert by_dir['none_accumulate/seed2'] == ('configs/self_improve.py:tiny', [
      f'--config.self_improve.init_run={sft}', '--config.self_improve.filter=none',
      '--config.self_improve.schedule=accumulate', '--config.seed=2',
      f'--config.self_improve.rounds={ROUNDS}', '--config.self_improve.label_budget=64'])
  assert (out / 'self_improvement.png').stat().st_size > 0


def error_line(script, capsys, argv) -> str:
  with pytest.raises(SystemExit) as exit_:
    script.main(argv)
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ')
  return err[0]


@pytest.mark.parametrize('flags, message', [
    (['--filters=exact,oracle'], '--filters: oracle'),
    (['--schedules=mix'], '--schedules: mix'),
    (['--seeds=0'], '--seeds=0 must be >= 1'),
    (['--rounds=2'], '--rounds=2 must be >= 3'),
    (['--extra=--config.seed=1'], 'sets seed itself'),
    (['--extra=--config.self_improve.filter=none'], 'sets self_improve.filter itself'),
    (['--extra=--config.seed'], 'is not a --config.x=v override'),
])
def test_bad_input_is_one_error_line(script, tmp_path, capsys, flags, message):
  assert message in error_line(script, capsys, [f'--out={tmp_path / "out"}', *flags])
  assert not (tmp_path / 'out').exists()  # refused before anything was made


def test_a_run_with_other_rounds_is_one_error_line(script, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(script, 'run_cli', fake_run_cli([], rounds=3))
  line = error_line(script, capsys, [f'--out={tmp_path / "out"}',
                                     f'--sft_run={sft_run(tmp_path)}', '--rounds=4'])
  assert 'logs rounds 0..3, not 0..4' in line
