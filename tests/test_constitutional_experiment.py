"""experiments/constitutional.py's bookkeeping, with its CLI runs replaced by run directories
of known figures (drawn per workdir from zlib.crc32 of its path): the calls are the planned
ones (order, configs, workdirs, seeds on the loop and every stage, the human fraction, the
judge and init runs, the wide judge's init, --extra passed through); runs.csv holds the
values the fake wrote; summary.csv's means and 95% half-widths are NumPy's with scipy's t
quantile over those values; the last stdout line's summary is summary.csv's; a rerun gives
the same CSVs; and bad input is one error line with exit status 2."""
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

SEEDS, JUDGES = 3, ('tiny', 'wide')
FRACTIONS = ((0.0, 'f0'), (0.5, 'f0.5'), (1.0, 'f1'))  # value, run directory
TOTAL_LABELS = 64
RL = {'harm_rate': 'cai/harm_rate', 'gold_reward': 'cai/gold_reward', 'kl_sl': 'cai/kl_init',
      'response_length': 'cai/response_length', 'human_labels': 'cai/human_labels',
      'judge_labels': 'cai/judge_labels', 'label_gold_agreement': 'cai/label_gold_agreement'}
ROW = ('cai/gold_reward', 'cai/gold_reward_se', 'cai/harm_rate', 'cai/kl_init',
       'cai/response_length')
FIGURES = ('harm_rate', 'gold_reward', 'kl_sl', 'label_gold_agreement')
EXTRA_FLAGS = ['--extra=--config.cai.eval_prompts=16 --config.judge.total_labels=64',
               '--extra=--config.stages.ppo.lr=1e-4']
EXTRA = ['--config.cai.eval_prompts=16', '--config.judge.total_labels=64',
         '--config.stages.ppo.lr=1e-4']


@pytest.fixture
def script(monkeypatch):
  # experiments/ on sys.path, as running the script puts it: it imports sibling scripts.
  monkeypatch.syspath_prepend(os.path.join(REPO, 'experiments'))
  spec = importlib.util.spec_from_file_location(
      'constitutional', os.path.join(REPO, 'experiments', 'constitutional.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def draw(key: str, names) -> dict:
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  return {n: float(rng.uniform(-1, 1)) for n in names}


def sl_summary(workdir: str, judge_keys) -> dict:
  """The SL loop's summary.json for one workdir (module docstring)."""
  return {'rows': [{'step': 0, **draw(workdir + '#init', ROW)},
                   {'step': 40, **draw(workdir + '#sl', (*ROW, 'cai/demo_first_harm_rate'))}],
          'judge': draw(workdir + '#judge', judge_keys), 'lineage': {'init_run': 'x'}}


def rl_last(workdir: str) -> dict:
  """The last metrics.jsonl row of the RL loop in workdir (.../f<fraction>)."""
  human = round(TOTAL_LABELS * float(os.path.basename(workdir)[1:]))
  return {'step': 30, **draw(workdir, [v for v in RL.values() if 'labels' not in v]),
          'cai/human_labels': human, 'cai/judge_labels': TOTAL_LABELS - human}


def fake_run_cli(calls: list, judge_keys):
  def run(config, workdir, overrides, train_block=True):
    calls.append((config, workdir, list(overrides), train_block))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({'config': config}, f)
    if config == 'configs/cai.py:tiny_sl':
      with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        json.dump(sl_summary(workdir, judge_keys), f)
    elif config == 'configs/cai.py:tiny_rl':
      first = {'step': 0, **draw(workdir + '#first', RL.values())}
      with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in (first, rl_last(workdir)))
  return run


def a_run(path) -> str:
  path.mkdir()
  (path / 'config.json').write_text('{}')
  return str(path)


def mean_and_half(values):
  values = np.asarray(values, np.float64)
  return values.mean(), stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(
      values.size)


def read_csv(path) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def check_calls(script, calls, out, pre, sft):
  planned = []
  for judge in JUDGES:
    if judge == 'wide':
      planned.append(('configs/pretrain.py:tiny', f'{out}/pretrain_wide'))
    for k in range(SEEDS):
      planned.append(('configs/cai.py:tiny_sl', f'{out}/{judge}/seed{k}/sl'))
      planned += [('configs/cai.py:tiny_rl', f'{out}/{judge}/seed{k}/{d}') for _, d in FRACTIONS]
  assert [(c, w) for c, w, _, _ in calls] == planned
  for config, workdir, overrides, train_block in calls:
    if config == 'configs/pretrain.py:tiny':
      assert train_block and overrides == ['--config.model.d_model=128',
                                           '--config.model.n_layers=4', '--config.model.d_ff=512']
      continue
    assert not train_block
    judge, seed, leaf = os.path.relpath(workdir, out).split(os.sep)
    k = int(seed.removeprefix('seed'))
    assert overrides[-len(EXTRA):] == EXTRA, workdir  # passed through, last
    own = overrides[:-len(EXTRA)]
    expected = [f'--config.seed={k}', *(f'--config.stages.{s}.seed={k}' for s in script.STAGES)]
    if leaf == 'sl':
      expected += [f'--config.cai.init_run={pre}',
                   f'--config.stages.judge.judge_data.other_run={sft}']
      if judge == 'wide':
        expected.append(f'--config.cai.judge_init={out}/pretrain_wide')
    else:
      fraction = [o for o in own if o.startswith('--config.judge.human_fraction=')]
      assert len(fraction) == 1 and float(fraction[0].split('=')[1]) == dict(
          (d, f) for f, d in FRACTIONS)[leaf]
      own = [o for o in own if o not in fraction]
      sl = f'{out}/{judge}/seed{k}/sl'
      expected += [f'--config.cai.init_run={sl}/sl', f'--config.cai.judge_run={sl}/judge']
    assert sorted(own) == sorted(expected), workdir


@pytest.mark.slow  # a few seconds, mostly importing jax and matplotlib
def test_csvs_and_calls_equal_the_runs(script, tmp_path, monkeypatch, capsys):
  calls, keys = [], script.JUDGE_KEYS
  monkeypatch.setattr(script, 'run_cli', fake_run_cli(calls, keys))
  pre, sft, out = a_run(tmp_path / 'pre'), a_run(tmp_path / 'sft'), str(tmp_path / 'out')
  argv = [f'--out={out}', f'--pretrain_run={pre}', f'--sft_run={sft}', f'--seeds={SEEDS}',
          '--fractions=0,0.5,1', f'--judges={",".join(JUDGES)}', *EXTRA_FLAGS]
  script.main(argv)
  figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  check_calls(script, calls, out, pre, sft)

  runs = read_csv(f'{out}/runs.csv')
  assert [(r['judge'], int(r['seed']), float(r['fraction'])) for r in runs] == [
      (j, k, f) for j in JUDGES for k in range(SEEDS) for f, _ in FRACTIONS]
  expected = {}
  for row in runs:
    base = f'{out}/{row["judge"]}/seed{row["seed"]}'
    d = dict((f, d) for f, d in FRACTIONS)[float(row['fraction'])]
    rl, sl = rl_last(f'{base}/{d}'), sl_summary(f'{base}/sl', keys)
    (init, sl_row), judge = sl['rows'], sl['judge']
    want = {**{name: rl[key] for name, key in RL.items()},
            'sl_harm_rate': sl_row['cai/harm_rate'], 'sl_gold_reward': sl_row['cai/gold_reward'],
            'init_harm_rate': init['cai/harm_rate'],
            'init_gold_reward': init['cai/gold_reward'], **judge}
    for name, value in want.items():
      assert float(row[name]) == value, (row, name)
    expected.setdefault((row['judge'], float(row['fraction'])), []).append(want)

  summary = read_csv(f'{out}/summary.csv')
  assert [(r['judge'], float(r['fraction'])) for r in summary] == list(expected)
  for row in summary:
    cell = expected[row['judge'], float(row['fraction'])]
    assert int(row['seeds']) == SEEDS
    for name in FIGURES:
      mean, half = mean_and_half([w[name] for w in cell])
      assert float(row[f'{name}_mean']) == pytest.approx(mean, rel=1e-12), name
      assert float(row[f'{name}_ci95']) == pytest.approx(half, rel=1e-9, abs=1e-15), name
    human = round(TOTAL_LABELS * float(row['fraction']))
    assert (float(row['human_labels']), float(row['judge_labels'])) == (
        human, TOTAL_LABELS - human)

  assert len(figures['summary']) == len(summary)
  for printed, row in zip(figures['summary'], summary):
    assert list(printed) == list(row)
    for name, cell in row.items():
      if isinstance(printed[name], str):
        assert printed[name] == cell
      else:
        assert printed[name] == pytest.approx(float(cell), rel=1e-12), name
  assert os.path.getsize(f'{out}/constitutional.png') > 0

  texts = [open(f'{out}/{n}').read() for n in ('runs.csv', 'summary.csv')]
  del calls[:]
  script.main(argv)
  assert [open(f'{out}/{n}').read() for n in ('runs.csv', 'summary.csv')] == texts
  check_calls(script, calls, out, pre, sft)


@pytest.mark.parametrize('flag', ['--fractions=2', '--fractions=a', '--judges=huge',
                                  '--seeds=0', '--pretrain_run=/no/such'])
def test_bad_input_is_one_error_line(script, tmp_path, monkeypatch, capsys, flag):
  calls = []
  monkeypatch.setattr(script, 'run_cli', fake_run_cli(calls, script.JUDGE_KEYS))
  out = tmp_path / 'out'
  with pytest.raises(SystemExit) as exit_:
    script.main([f'--out={out}', f'--pretrain_run={a_run(tmp_path / "pre")}',
                 f'--sft_run={a_run(tmp_path / "sft")}', flag])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert not calls and not out.exists()  # refused before anything ran or was made
