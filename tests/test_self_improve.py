"""The self-improvement loop (loops/self_improve.py) end to end through the CLI, from the
session's sft.py:task_tiny warm start: with the exact filter pass@1 rises by more than 3
standard errors in 2 rounds of tiny, and with no filter and the replace schedule the
diversity of the samples falls; each round's filter statistics, labels and diversity
equal a plain-Python recount of the samples it kept in DIR (graded by hand, not by the
task's verifier); the learned filter keeps its labelled rows by their label and the
ORM's top share of the rest; a loop stopped mid-round continues to the same metrics.
Bad settings are one error line before any compute."""
import collections
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env
from rlhf_jax import tasks
from rlhf_jax.config import load_file, task_block
from rlhf_jax.data import array_store
from rlhf_jax.errors import UserError
from rlhf_jax.loops import self_improve
from test_cli_errors import assert_one_error_line
from test_grpo_step import _python_grade

TINY = ('--config=configs/self_improve.py:tiny', '--config.self_improve.rounds=2')
# For the runs whose claims are not about held-out pass@k: the smallest eval.
SMALL_EVAL = ('--config.self_improve.eval_prompts=16', '--config.self_improve.eval_samples=2')
K = 4  # self_improve.samples in configs/self_improve.py:tiny


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _loop(workdir, init_run, *overrides):
  result = subprocess.run(
      [sys.executable, '-m', 'rlhf_jax.main', *TINY, f'--workdir={workdir}',
       f'--config.self_improve.init_run={init_run}', *overrides],
      cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


def _samples(workdir, r):
  arrays, _ = array_store.read(os.path.join(workdir, f'round_{r}', 'samples'),
                               self_improve.SAMPLE_FIELDS)
  return {k: np.asarray(v) for k, v in arrays.items()}


def _kept(workdir, r):
  arrays, _ = array_store.read(os.path.join(workdir, f'round_{r}', 'kept'), ['kept'])
  return np.asarray(arrays['kept'], bool)


def _python_correct(data):
  """sum_mod graded by hand (test_grpo_step's rule) on the world's vocabulary."""
  task = tasks.make_task(task_block(), vocab_size=64)
  return np.array([_python_grade(task, int(a[0]), r, m) > 0.5 for a, r, m in
                   zip(data['answers'], data['response'], data['mask'])])


def _python_diversity(data):
  """Per problem: distinct traces / k (masked tokens compared) and the entropy in nats of
  the stated answers, 'none found' one more answer."""
  distinct, entropy = [], []
  for lo in range(0, len(data['response']), K):
    traces = {tuple(int(t) for t, m in zip(r, mk) if m > 0)
              for r, mk in zip(data['response'][lo:lo + K], data['mask'][lo:lo + K])}
    distinct.append(len(traces) / K)
    answers = collections.Counter(
        tuple(a) if f else 'none' for a, f in zip(map(tuple, data['stated'][lo:lo + K]),
                                                  data['found'][lo:lo + K]))
    entropy.append(-sum(c / K * math.log(c / K) for c in answers.values()))
  return np.array(distinct), np.array(entropy)


def _check_round_stats(workdir, rows, *, keep_rule, filter_):
  """The logged sample and filter statistics of each round against a recount."""
  labels = 0
  for r, row in enumerate(rows):
    data = _samples(workdir, r)
    correct = _python_correct(data)
    assert row['self_improve/sample_pass_rate'] == pytest.approx(correct.mean(), abs=1e-12)
    distinct, entropy = _python_diversity(data)
    assert row['self_improve/distinct_traces'] == pytest.approx(distinct.mean(), abs=1e-9)
    assert row['self_improve/answer_entropy'] == pytest.approx(entropy.mean(), abs=1e-9)
    if r == len(rows) - 1:
      assert 'self_improve/precision' not in row  # the last policy is measured only
      continue
    kept = _kept(workdir, r)
    keep_rule(kept, correct, data)
    assert row['self_improve/kept_fraction'] == pytest.approx(kept.mean(), abs=1e-12)
    assert row['self_improve/kept_rows'] == kept.sum()
    assert row['self_improve/precision'] == pytest.approx(correct[kept].mean(), abs=1e-12)
    assert row['self_improve/recall'] == pytest.approx(kept[correct].mean(), abs=1e-12)
    demos, _ = array_store.read(os.path.join(workdir, f'round_{r}', 'policy', 'demos'),
                                ['response', 'prompt_id'])
    # replace: policy r+1 trains on exactly round r's kept samples
    np.testing.assert_array_equal(np.asarray(demos['response']), data['response'][kept])
    assert row['self_improve/train_rows'] == kept.sum()
    labels += {'exact': len(correct)}.get(filter_, 0)
    assert row['self_improve/labels'] == labels


@pytest.fixture(scope='module')
def exact_run(task_warm_start, tmp_path_factory):
  return _loop(tmp_path_factory.mktemp('si') / 'exact', task_warm_start)


def test_exact_filter_raises_pass_at_1_by_more_than_3_standard_errors(exact_run):
  rows = _metrics(exact_run)
  assert [row['step'] for row in rows] == [0, 1, 2]
  p0, p2 = rows[0]['eval/pass@1'], rows[2]['eval/pass@1']
  se = math.hypot(rows[0]['eval/pass@1_se'], rows[2]['eval/pass@1_se'])
  assert p2 - p0 > 3 * se, (p0, p2, se)

  def exact(kept, correct, data):
    np.testing.assert_array_equal(kept, correct)
  _check_round_stats(exact_run, rows, keep_rule=exact, filter_='exact')


def test_stopped_mid_round_continues_to_the_same_metrics(exact_run):
  """Stopped inside round 1's SFT (after its middle checkpoint), before its summary; in
  place, since a loop's runs name each other by absolute path."""
  strip = lambda rows: [{k: v for k, v in row.items() if not k.startswith('perf/')}
                        for row in rows]
  before = strip(_metrics(exact_run))
  policy = os.path.join(exact_run, 'round_1', 'policy')
  steps = sorted(int(p) for p in os.listdir(os.path.join(policy, 'checkpoints'))
                 if p.isdigit())
  assert steps[-1] == 100 and 50 in steps
  shutil.rmtree(os.path.join(policy, 'checkpoints', '100'))
  os.remove(os.path.join(exact_run, 'round_1', 'summary.json'))
  shutil.rmtree(os.path.join(exact_run, 'round_2'))
  _loop(exact_run, json.load(open(os.path.join(exact_run, 'config.json')))['self_improve'][
      'init_run'])
  assert strip(_metrics(exact_run)) == before


def test_no_filter_with_replace_loses_diversity(task_warm_start, tmp_path):
  """Four rounds (the docs' experiment: distinct traces 0.80 -> 0.68 ± 0.10 over 3 seeds).
  One seed's loss is small against its noise (measured: 0.791 at round 0, 0.729 at round
  4, 0.018 standard error a round; 2 rounds fell by 1.7 standard errors only), so the
  claim pools rounds: the last two rounds' samples have fewer distinct traces than the
  first two's by more than 2 standard errors (measured: 3.3)."""
  workdir = _loop(tmp_path / 'none', task_warm_start, '--config.self_improve.filter=none',
                  '--config.self_improve.rounds=4', *SMALL_EVAL)
  rows = _metrics(workdir)

  def keep_all(kept, correct, data):
    assert kept.all()
  _check_round_stats(workdir, rows, keep_rule=keep_all, filter_='none')
  first, last = (np.concatenate([_python_diversity(_samples(workdir, r))[0] for r in rounds])
                 for rounds in ((0, 1), (3, 4)))
  se = math.hypot(first.std(ddof=1) / len(first) ** .5, last.std(ddof=1) / len(last) ** .5)
  assert first.mean() - last.mean() > 2 * se, (first.mean(), last.mean(), se)


def test_learned_filter_keeps_labelled_rows_by_label_and_the_orm_top_share(
    task_warm_start, tmp_path):
  """One round with a cut-down ORM (its quality is not the claim here, the rule is), and
  trainer='grpo': policy 1 is a GRPO run scored by that ORM."""
  workdir = _loop(tmp_path / 'learned', task_warm_start,
                  '--config.self_improve.filter=learned', '--config.self_improve.rounds=1',
                  '--config.self_improve.label_budget=64',
                  '--config.stages.reward_model.train.steps=10',
                  '--config.self_improve.trainer=grpo', '--config.stages.grpo.train.steps=2',
                  '--config.stages.grpo.train.eval_every=2', *SMALL_EVAL,
                  '--config.stages.grpo.grpo.eval_prompts=16',
                  '--config.stages.grpo.grpo.eval_samples=2',
                  '--config.stages.reward_model.outcome.eval_prompts=16',
                  '--config.stages.reward_model.outcome.eval_samples=2')
  rows = _metrics(workdir)
  data = _samples(workdir, 0)
  correct = _python_correct(data)
  labelled, _ = array_store.read(os.path.join(workdir, 'round_0', 'labels'), ['row', 'label'])
  rows_bought = np.asarray(labelled['row'])
  assert len(set(rows_bought.tolist())) == 64
  np.testing.assert_array_equal(np.asarray(labelled['label']) > 0.5, correct[rows_bought])
  kept_store, _ = array_store.read(os.path.join(workdir, 'round_0', 'kept'), ['kept', 'score'])
  kept, score = np.asarray(kept_store['kept'], bool), np.asarray(kept_store['score'])
  is_labelled = np.isin(np.arange(len(kept)), rows_bought)
  np.testing.assert_array_equal(kept[is_labelled], correct[rows_bought])
  rest = np.nonzero(~is_labelled)[0]
  share = round(correct[rows_bought].mean() * len(rest))
  assert kept[rest].sum() == share
  if 0 < share < len(rest):  # the kept unlabelled rows are the highest-scored
    assert score[rest][kept[rest]].min() >= score[rest][~kept[rest]].max()
  assert rows[0]['self_improve/labels'] == 64
  assert rows[0]['self_improve/precision'] == pytest.approx(correct[kept].mean(), abs=1e-12)
  orm = _metrics(os.path.join(workdir, 'round_0', 'orm'))
  assert orm[0]['orm/train_responses'] == 64  # trained on the bought labels only
  grpo = json.load(open(os.path.join(workdir, 'round_0', 'policy', 'config.json')))
  assert grpo['stage'] == 'grpo' and grpo['grpo']['reward'] == 'orm'
  assert grpo['grpo']['rm_run'] == os.path.join(workdir, 'round_0', 'orm')
  assert grpo['init']['run'] == task_warm_start and grpo['seed'] == 1  # round_seed(0, 0)
  assert rows[0]['self_improve/train_rows'] == 2 * 16 * 8  # GRPO's rollouts
  # policy 1, measured in row 1, is that GRPO run
  summary = json.load(open(os.path.join(workdir, 'round_1', 'summary.json')))
  assert summary['lineage']['policy_run'] == os.path.join(workdir, 'round_0', 'policy')


def test_learned_keep_matches_a_python_rule():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(1, 40))
    labelled, correct = rng.random(n) < 0.3, rng.random(n) < 0.4
    score = rng.integers(0, 5, n).astype(float)  # ties: the first row wins
    kept = self_improve.learned_keep(labelled, score, correct)
    expect = [bool(labelled[i] and correct[i]) for i in range(n)]
    rest = [i for i in range(n) if not labelled[i]]
    rate = sum(correct[i] for i in range(n) if labelled[i]) / max(1, labelled.sum())
    for i in sorted(rest, key=lambda i: (-score[i], i))[:round(rate * len(rest))]:
      expect[i] = True
    assert kept.tolist() == expect


def test_a_bad_filter_is_one_error_line_before_any_compute(run_cli, tmp_path):
  result = run_cli(*TINY, f'--workdir={tmp_path / "run"}', '--config.self_improve.filter=oracle')
  assert_one_error_line(result, mentions=('self_improve.filter',))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('field, value, mentions', [
    ('schedule', 'mix', 'self_improve.schedule'),
    ('rounds', 0, 'self_improve.rounds'),
    ('trainer', 'dpo', 'self_improve.trainer'),
    ('kl_rows', 8, 'self_improve.kl_rows'),
])
def test_bad_loop_fields_are_refused_by_name(field, value, mentions):
  config = load_file('configs/self_improve.py', 'tiny')
  config.self_improve[field] = value
  with pytest.raises(UserError, match=mentions.replace('.', r'\.')):
    self_improve.resolve(config)


def test_grpo_without_a_verdict_and_an_init_run_without_a_task_are_refused(tmp_path):
  config = load_file('configs/self_improve.py', 'tiny')
  config.self_improve.update(trainer='grpo', filter='none')
  with pytest.raises(UserError, match='nothing to learn'):
    self_improve.resolve(config)
  fake = tmp_path / 'sft'
  fake.mkdir()
  (fake / 'config.json').write_text(json.dumps({'stage': 'sft', 'sft': {}}))
  config = load_file('configs/self_improve.py', 'tiny')
  config.self_improve.init_run = str(fake)
  with pytest.raises(UserError, match='without a task'):
    self_improve.resolve(config)
