"""The GRPO stage end to end through the CLI, on the session's pretraining run: a warm start
on solved traces, then GRPO. GRPO's step-0 evaluation is the warm start's last one (same
held-out problems, same key, same params), its float32 sampler agrees with the trainer,
the training pool holds no eval problem, and a run stopped after a checkpoint continues to
the same metrics. Bad settings are one error line before any compute."""
import json
import shutil

import pytest

from conftest import _run_stage as run_stage
from test_cli_errors import assert_one_error_line

QUICK = ('--config.train.progress=False',)


def _metrics(workdir):
  with open(f'{workdir}/metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def _strip(lines):
  return [{k: v for k, v in line.items() if not k.startswith('perf/')} for line in lines]


@pytest.fixture
def warm_start(task_warm_start):
  """The session's sft.py:task_tiny run (the README's warm start; conftest)."""
  return task_warm_start


def _grpo_args(workdir, warm_start):
  return ('--config=configs/grpo.py:tiny', f'--workdir={workdir}', *QUICK,
          f'--config.init.run={warm_start}', '--config.train.steps=4',
          '--config.train.log_every=1', '--config.train.eval_every=4',
          '--config.train.ckpt_every=2', '--config.train.batch_size=8',
          '--config.grpo.num_prompts=512')


@pytest.mark.slow
def test_grpo_continues_the_warm_start_and_resumes(warm_start, run_cli, tmp_path):
  workdir = tmp_path / 'grpo'
  args = _grpo_args(workdir, warm_start)
  result = run_cli(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _metrics(workdir)
  sft_last = _metrics(warm_start)[-1]
  # (eval/kl_ref is to each run's own reference: the pretrained model, then the warm start)
  evals = [k for k in sft_last if k.startswith('eval/') and k not in ('eval/loss',
                                                                       'eval/kl_ref')]
  assert 'eval/pass@4' in evals and 'eval/maj@4' in evals
  for k in evals:  # GRPO's step 0 is the warm start's params on the same problems and key
    assert lines[0][k] == pytest.approx(sft_last[k], abs=1e-9), k
  assert abs(lines[0]['eval/kl_ref']) < 1e-5  # the policy is its reference at step 0
  steps = [line for line in lines if 'rl/pass_rate' in line]
  assert [line['step'] for line in steps] == [1, 2, 3, 4]
  for line in steps:
    # One forward for sampler and trainer: they differ by float32 rounding only (the
    # KV-cached decode and the full forward round differently; the largest gaps, a few
    # 1e-5, are at the least likely tokens). bfloat16 sampling is 8e-4 mean, 0.06 max.
    assert line['mismatch/abs_diff_mean'] < 1e-6
    assert line['mismatch/abs_diff_max'] < 1e-4
    assert 0 <= line['rl/pass_rate'] <= 1
  assert lines[0]['grpo/rollouts_per_step'] == 8 * 8
  # The pool is 512 problems less the eval ones among them, rounded to whole shards.
  assert 512 - 128 <= lines[0]['rl/prompt_pool'] <= 512
  # Stopped after checkpoint 2 (its step-4 checkpoint lost): the rerun recomputes 3 and 4.
  again = tmp_path / 'again'
  shutil.copytree(workdir, again)
  shutil.rmtree(again / 'checkpoints' / '4')
  result = run_cli(*_grpo_args(again, warm_start))
  assert result.returncode == 0, result.stderr[-3000:]
  assert _strip(_metrics(again)) == _strip(lines)


@pytest.mark.slow
def test_grpo_tiny_raises_held_out_pass_at_1_by_more_than_3_standard_errors(
    warm_start, run_cli, tmp_path):
  """grpo.py:tiny cut to 50 steps, from the warm start as configured: the
  pass@1 of 128 held-out problems x 8 samples rises by more than 3 standard errors of the
  difference (each eval's SE is over problems; the two evals are independent samples)."""
  workdir = tmp_path / 'grpo'
  result = run_cli('--config=configs/grpo.py:tiny', f'--workdir={workdir}', *QUICK,
                   f'--config.init.run={warm_start}', '--config.train.steps=50',
                   '--config.train.eval_every=50', '--config.train.ckpt_every=50')
  assert result.returncode == 0, result.stderr[-3000:]
  evals = [line for line in _metrics(workdir) if 'eval/pass@1' in line]
  first, last = evals[0], evals[-1]
  assert (first['step'], last['step']) == (0, 50)
  se = (first['eval/pass@1_se'] ** 2 + last['eval/pass@1_se'] ** 2) ** 0.5
  assert last['eval/pass@1'] - first['eval/pass@1'] > 3 * se, (first, last)


@pytest.mark.parametrize('override,mention', [
    ('--config.grpo.group_size=1', 'grpo.group_size=1'),
    ('--config.grpo.advantage=ppo', "grpo.advantage='ppo'"),
    ('--config.task.name=chess', "task.name='chess'"),
    ('--config.task.modulus=200', 'task.modulus=200'),
])
def test_bad_settings_are_one_error_line(chain, run_cli, tmp_path, override, mention):
  workdir = tmp_path / 'bad'
  result = run_cli('--config=configs/grpo.py:tiny', f'--workdir={workdir}', *QUICK,
                   f'--config.init.run={chain["pretrain"]}', override)
  assert_one_error_line(result, mentions=(mention,))
  assert not workdir.exists()
