"""experiments/verifiable_rl.py's bookkeeping, with the CLI runs replaced by run
directories of known metrics: the CSVs hold the runs' metrics.jsonl values, the summary's
mean and 95% interval are NumPy's with the closed-form Student-t quantile, the mismatch
figures are the means over the runs' steps, and each --extra override reaches the runs of
its block only."""
import csv
import importlib.util
import json
import math
import os
import zlib

import numpy as np
import pytest

from conftest import REPO

SEEDS, STEPS, MISMATCH_STEPS = 3, 4, 3
EVAL_STEPS = (0, 2, 4)


@pytest.fixture
def script(monkeypatch):
  # experiments/ on sys.path, as running the script puts it: it imports a sibling script.
  monkeypatch.syspath_prepend(os.path.join(REPO, 'experiments'))
  spec = importlib.util.spec_from_file_location(
      'verifiable_rl', os.path.join(REPO, 'experiments', 'verifiable_rl.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def fake_run_cli(calls: list):
  """Writes a run directory as the CLI would: config.json and metrics.jsonl (eval rows at
  EVAL_STEPS, mismatch rows at every step of a mismatch run), values drawn per workdir."""
  def run(config, workdir, overrides):
    calls.append((config, workdir, list(overrides)))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({'stage': 'grpo', 'task': {'name': 'sum_mod'}}, f)
    rng = np.random.default_rng(zlib.crc32(workdir.encode()))
    if os.sep + 'mismatch' + os.sep in workdir:
      rows = [{'step': s, **{f'mismatch/{k}': float(rng.uniform(1e-7, 1e-2))
                             for k in ('abs_diff_mean', 'abs_diff_max', 'kl_k3')}}
              for s in range(1, MISMATCH_STEPS + 1)]
    else:
      rows = [{'step': s, 'train/loss': 0.5,
               **{f'eval/{m}': int(rng.integers(0, 257)) / 256
                  for m in ('pass@1', 'pass@8', 'greedy_pass', 'maj@8', 'maj@4')}}
              for s in EVAL_STEPS]
      rows.insert(1, {'step': 1, 'train/loss': 0.4})  # a log step without eval
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  return run


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow  # 4.7 s, mostly importing jax and matplotlib
def test_csvs_and_intervals_equal_the_runs_metrics(script, tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(script, 'run_cli', fake_run_cli(calls))
  sft = tmp_path / 'sft'
  sft.mkdir()
  (sft / 'config.json').write_text(json.dumps({'stage': 'sft', 'task': {'name': 'sum_mod'}}))
  out = tmp_path / 'out'
  script.main([f'--out={out}', f'--sft_run={sft}', '--methods=rloo,ppo', f'--seeds={SEEDS}',
               f'--steps={STEPS}', '--eval_prompts=16', '--eval_samples=8',
               f'--mismatch_steps={MISMATCH_STEPS}',
               '--extra=--config.grpo.kl_coef=0.1 --config.ppo.kl_coef=0.2',
               '--extra=--config.optim.lr=1e-4'])
  figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

  with open(out / 'curves.csv') as f:
    curves = list(csv.DictReader(f))
  expected = [(method, seed, r['step'], *(r[f'eval/{m}'] for m in
                                          ('pass@1', 'pass@8', 'greedy_pass', 'maj@8')))
              for method in ('rloo', 'ppo') for seed in range(SEEDS)
              for r in read_jsonl(out / method / f'seed{seed}' / 'metrics.jsonl')
              if 'eval/pass@1' in r]
  got = [(r['method'], int(r['seed']), int(r['step']), float(r['pass@1']),
          float(r['pass@8']), float(r['greedy_pass']), float(r['maj@8'])) for r in curves]
  assert got == expected

  t_975_df2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # Student t quantile, 2 dof, closed form
  with open(out / 'summary.csv') as f:
    summary = list(csv.DictReader(f))
  assert [(r['method'], int(r['step'])) for r in summary] == [
      ('rloo', 0), ('rloo', STEPS), ('ppo', 0), ('ppo', STEPS)]
  for row in summary:
    assert int(row['seeds']) == SEEDS
    for metric in ('pass@1', 'pass@8'):
      values = np.array([float(c[metric]) for c in curves if c['method'] == row['method']
                         and int(c['step']) == int(row['step'])], np.float64)
      assert len(values) == SEEDS
      assert float(row[f'{metric}_mean']) == pytest.approx(values.mean(), rel=1e-12)
      half = t_975_df2 * values.std(ddof=1) / math.sqrt(SEEDS)
      assert float(row[f'{metric}_ci95']) == pytest.approx(half, rel=1e-9, abs=1e-15)
  assert [r['pass@1_mean'] for r in figures['summary']] == pytest.approx(
      [float(r['pass@1_mean']) for r in summary], rel=1e-3)

  for dtype in ('float32', 'bfloat16'):
    rows = read_jsonl(out / 'mismatch' / dtype / 'metrics.jsonl')
    for key in ('abs_diff_mean', 'abs_diff_max', 'kl_k3'):
      assert figures['mismatch'][dtype][key] == pytest.approx(
          np.mean([r[f'mismatch/{key}'] for r in rows]), rel=1e-3)
    assert figures['mismatch'][dtype]['steps'] == MISMATCH_STEPS

  by_dir = {os.path.relpath(w, out): o for _, w, o in calls}
  assert sorted(by_dir) == sorted([f'{m}/seed{s}' for m in ('rloo', 'ppo')
                                   for s in range(SEEDS)] + ['mismatch/float32',
                                                             'mismatch/bfloat16'])
  for name, overrides in by_dir.items():
    block = 'ppo' if name.startswith('ppo') else 'grpo'
    other = {'ppo': 'grpo', 'grpo': 'ppo'}[block]
    assert '--config.optim.lr=1e-4' in overrides and f'--config.init.run={sft}' in overrides
    assert f'--config.{block}.kl_coef={"0.2" if block == "ppo" else "0.1"}' in overrides
    assert f'--config.{block}.eval_prompts=16' in overrides
    assert not any(o.startswith(f'--config.{other}.') for o in overrides)
  assert by_dir['rloo/seed2'][:4] == [f'--config.init.run={sft}', '--config.seed=2',
                                      '--config.grpo.advantage=rloo',
                                      f'--config.train.steps={STEPS}']
  # The mismatch runs' own settings come last, so no --extra can undo them.
  assert by_dir['mismatch/bfloat16'][-4:] == [
      f'--config.train.steps={MISMATCH_STEPS}', '--config.train.log_every=1',
      '--config.grpo.sample_dtype=bfloat16', '--config.grpo.tis_cap=2']
  assert (out / 'verifiable_rl.png').stat().st_size > 0


@pytest.mark.parametrize('flags, message', [
    (['--methods=grpo,sft'], '--methods: sft'),
    (['--eval_samples=4'], 'pass@8 and maj@8 need >= 8'),
    (['--extra=--config.seed'], "is not a --config.x=v override"),
])
def test_bad_input_is_one_error_line(script, tmp_path, capsys, flags, message):
  with pytest.raises(SystemExit) as exit_:
    script.main([f'--out={tmp_path / "out"}', *flags])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0]
