"""Multi-controller runs on this machine: 2 processes x 4 CPU devices (JAX's gloo collectives
between them) give the losses of 1 process x 8 devices, only process 0 writes, and the
2-process run resumes from its checkpoint (every process restoring its data position) to
the same metrics, here when its newest checkpoint is damaged."""
import json
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

ARGS = ['--config=configs/pretrain.py:tiny', '--config.train.steps=6',
        '--config.train.log_every=2', '--config.train.eval_every=6',
        '--config.train.ckpt_every=3', '--config.train.progress=False']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start_processes(workdir, processes: int, devices: int) -> list[subprocess.Popen]:
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, '-m', 'rlhf_jax.main', *ARGS, f'--workdir={workdir}',
       *([f'--coordinator=localhost:{port}', f'--num_processes={processes}',
          f'--process_id={i}'] if processes > 1 else [])],
      cwd=REPO, env=cli_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(processes)]


def finish_processes(*runs: list[subprocess.Popen]) -> list[list[str]]:
  """Waits for every run's processes to end; returns each one's stderr, by run."""
  try:
    out = []
    for procs in runs:
      errs = []
      for i, p in enumerate(procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f'process {i}: {err[-3000:]}'
        errs.append(err)
      out.append(errs)
    return out
  finally:
    for p in (p for procs in runs for p in procs):
      p.kill()


def run_processes(workdir, processes: int, devices: int) -> list[str]:
  """Runs the processes to the end; returns each one's stderr."""
  return finish_processes(start_processes(workdir, processes, devices))[0]


def records(workdir) -> list[dict]:
  return [{k: v for k, v in json.loads(l).items() if not k.startswith('perf/')}
          for l in open(workdir / 'metrics.jsonl')]


@pytest.mark.slow
def test_two_processes_equal_one_and_resume(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  # Independent runs: both at once (their start-ups and compiles overlap on the two cores).
  finish_processes(start_processes(one, processes=1, devices=8),
                   start_processes(two, processes=2, devices=4))
  a, b = records(one), records(two)
  assert [r['step'] for r in a] == [r['step'] for r in b] == [0, 2, 3, 4, 6]
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for key in x:
      if key.startswith(('train/loss', 'eval/')):
        # Same global batches and params; only the all-reduce order may differ.
        assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x['step'], key)
  # Only process 0 writes: one metrics file, one event file, one line per logged step.
  assert len(list(two.glob('events.out.tfevents.*'))) == 1

  # Its newest checkpoint damaged: both processes fail to restore it and agree to resume
  # from step 3; process 0 alone moves it aside and says so. Then both restore the state and
  # the data position of step 3, as a run stopped after step 3 would (Checkpointer.
  # restore_newest tries step 6, then restores step 3 by the same call), to the same
  # metrics: one 2-process rerun for both claims.
  damaged = tmp_path / 'damaged'
  shutil.copytree(two, damaged)
  data = [p for p in (damaged / 'checkpoints' / '6' / 'state').rglob('*')
          if p.is_file() and p.parent.name == 'd']
  assert data
  for path in data:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  errs = run_processes(damaged, processes=2, devices=4)
  warnings = [[l for l in e.splitlines() if l.startswith('warning: ')] for e in errs]
  assert len(warnings[0]) == 1 and warnings[1] == [], warnings
  assert warnings[0][0].endswith(f'moved it to {damaged / "corrupt_checkpoints" / "6"}; '
                                 'resuming from checkpoint 3')
  assert sorted(p.name for p in (damaged / 'corrupt_checkpoints').iterdir()) == ['6']
  assert records(damaged) == b


def test_bad_process_flags(run_cli, tmp_path):
  result = run_cli(*ARGS, f'--workdir={tmp_path / "bad"}', '--num_processes=2',
                   '--process_id=0')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and '--coordinator' in lines[0]


@pytest.mark.parametrize('config', [  # each ~6 s: one in the quick tier
    'configs/sft.py:tiny', pytest.param('configs/grpo.py:tiny', marks=pytest.mark.slow),
    pytest.param('configs/selfplay.py:tic_tac_toe', marks=pytest.mark.slow),
    pytest.param('configs/distill.py:tiny', marks=pytest.mark.slow)])
def test_stages_not_yet_multi_process_are_refused_with_one_error_line(tmp_path, config):
  """Only pretraining runs on several processes so far (stages/dispatch.MULTI_PROCESS): a
  2-process run of any other stage stops before any compute, in every process, with one
  error line, and leaves no workdir."""
  port, workdir = free_port(), tmp_path / 'run'
  stage = config.split('/')[1].split('.')[0]
  init = ([] if stage in ('selfplay', 'distill')  # no init block
          else [f'--config.init.run={tmp_path / "unused"}'])
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'rlhf_jax.main', f'--config={config}', f'--workdir={workdir}',
       *init, f'--coordinator=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=cli_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    for p in procs:
      _, err = p.communicate(timeout=120)
      assert p.returncode == 2, err[-3000:]
      lines = err.splitlines()
      assert len(lines) == 1 and lines[0].startswith(
          f'error: stage {stage} runs in one process only (this run has 2'), err
  finally:
    for p in procs:
      p.kill()
  assert not workdir.exists()
