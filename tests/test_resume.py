"""Resuming reproduces the uninterrupted run exactly: an exception mid-run (in process), a
SIGKILL between checkpoints and one in the middle of writing a checkpoint (through the
CLI) all end with bitwise the same train state and the same metrics.jsonl (timings aside);
rerunning a finished run changes nothing."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, checkpoint_steps, cli_env, load_config, read_state

SMALL = ('--config.model.d_model=32', '--config.model.d_ff=64', '--config.train.seq_len=32',
         '--config.train.batch_size=8', '--config.train.eval_batches=1',
         '--config.train.progress=False')


def assert_states_equal(a: dict, b: dict):
  paths_a = jax.tree_util.tree_leaves_with_path(a)
  paths_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert len(paths_a) == len(paths_b)
  for path, x in paths_a:
    y = paths_b[path]
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert np.array_equal(x, y), f'{jax.tree_util.keystr(path)} differs'


def metrics_without_timing(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith('perf/')}
            for line in f]


# --- In process: an exception from the data source after 7 batches --------------------------

class Crash(Exception):
  pass


def small_config(steps: int):
  config = load_config('pretrain', 'tiny')
  config.model.update(d_model=32, d_ff=64)
  config.train.update(steps=steps, batch_size=8, seq_len=32, ckpt_every=4, log_every=2,
                      eval_every=6, eval_batches=1, keep_ckpts=10, progress=False)
  return config


@pytest.mark.slow
def test_crash_in_process_then_resume_is_bitwise_identical(tmp_path, monkeypatch):
  from rlhf_jax.data.world_source import WorldSource
  from rlhf_jax.stages import pretrain
  steps = 12
  straight, crashed = str(tmp_path / 'straight'), str(tmp_path / 'crashed')
  for workdir in (straight, crashed):  # dispatch.prepare_workdir makes it before a stage runs
    os.makedirs(workdir)
  pretrain.run(small_config(steps), workdir=straight)
  assert checkpoint_steps(straight) == [4, 8, 12]

  original = WorldSource.next_batch
  calls = []

  def failing_next_batch(self):
    if len(calls) == 7:
      raise Crash('the data source died after 7 batches')
    calls.append(1)
    return original(self)

  with monkeypatch.context() as patch:
    patch.setattr(WorldSource, 'next_batch', failing_next_batch)
    with pytest.raises(Crash):
      pretrain.run(small_config(steps), workdir=crashed)
  # 7 steps done: the checkpoint at 4 is there, and lines up to step 6 were written.
  assert checkpoint_steps(crashed) == [4]
  assert [r['step'] for r in metrics_without_timing(crashed)] == [0, 2, 4, 6]

  pretrain.run(small_config(steps), workdir=crashed)
  assert checkpoint_steps(crashed) == [4, 8, 12]
  assert_states_equal(read_state(os.path.join(straight, 'checkpoints', '12')),
                      read_state(os.path.join(crashed, 'checkpoints', '12')))
  assert metrics_without_timing(crashed) == metrics_without_timing(straight)
  assert [r['step'] for r in metrics_without_timing(straight)] == [0, 2, 4, 6, 8, 10, 12]


# --- Through the CLI: SIGKILL ----------------------------------------------------------------

STEPS = 60
CLI_ARGS = ('--config=configs/pretrain.py:tiny', *SMALL, f'--config.train.steps={STEPS}',
            '--config.train.ckpt_every=10', '--config.train.log_every=5',
            '--config.train.eval_every=20')


def cli(workdir):
  return [sys.executable, '-m', 'rlhf_jax.main', *CLI_ARGS, f'--workdir={workdir}']


def run_to_end(workdir):
  result = subprocess.run(cli(workdir), cwd=REPO, env=cli_env(1), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted') / 'run'
  run_to_end(workdir)
  # keep_ckpts=3 (the default) leaves the newest three.
  assert checkpoint_steps(workdir) == [40, 50, 60]
  return workdir


def kill_when(workdir, ready) -> list[str]:
  """Starts the run and SIGKILLs it as soon as ready(names in checkpoints/) holds; returns
  those names. Fails if the run finished first (then nothing was tested)."""
  proc = subprocess.Popen(cli(workdir), cwd=REPO, env=cli_env(1), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  try:
    while time.monotonic() < deadline:
      try:
        names = os.listdir(os.path.join(workdir, 'checkpoints'))
      except FileNotFoundError:
        names = []
      if ready(names):
        assert proc.poll() is None, 'the run ended before it could be killed'
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return names
      assert proc.poll() is None, 'the run ended before it could be killed'
      time.sleep(0.002)
    raise AssertionError('no checkpoint appeared in time')
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def finalised(names):
  return [int(n) for n in names if n.isdigit()]


def writing(names):
  """Orbax writes into "<step>.orbax-checkpoint-tmp..." and renames it when complete."""
  return any(not n.isdigit() and n.split('.')[0].isdigit() for n in names)


@pytest.mark.parametrize('when', ['after-a-checkpoint', 'while-writing-a-checkpoint',
                                  'while-writing-the-first-checkpoint'])
def test_sigkill_then_rerun_is_bitwise_identical(tmp_path, uninterrupted, when):
  workdir = tmp_path / 'run'
  if when == 'after-a-checkpoint':
    seen = kill_when(workdir, lambda names: any(0 < s < STEPS for s in finalised(names)))
  elif when == 'while-writing-a-checkpoint':
    seen = kill_when(workdir, lambda names: finalised(names) and writing(names))
  else:  # nothing to resume from: the rerun starts over in a workdir that is not empty
    seen = kill_when(workdir, writing)
  left = sorted(os.listdir(workdir / 'checkpoints'))
  context = f'seen before the kill: {seen}; left after it: {left}'
  assert all(s < STEPS for s in checkpoint_steps(workdir)), context
  assert (workdir / 'metrics.jsonl').exists()

  result = run_to_end(workdir)
  assert 'error' not in result.stderr.lower(), (context, result.stderr[-3000:])
  # No partial checkpoint directory survives the rerun.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['40', '50', '60'], context
  assert_states_equal(read_state(uninterrupted / 'checkpoints' / str(STEPS)),
                      read_state(workdir / 'checkpoints' / str(STEPS)))
  assert metrics_without_timing(workdir) == metrics_without_timing(uninterrupted)


def test_rerunning_a_finished_run_changes_nothing(uninterrupted):
  def files(root, *, skip_events=True):
    out = {}
    for dirpath, _, names in os.walk(root):
      for n in names:
        if skip_events and n.startswith('events.out.tfevents'):
          continue
        path = os.path.join(dirpath, n)
        with open(path, 'rb') as f:
          out[os.path.relpath(path, root)] = f.read()
    return out

  before = files(uninterrupted)
  result = run_to_end(uninterrupted)
  assert result.stderr.strip() == ''
  assert files(uninterrupted) == before


# --- Damaged checkpoints are moved aside, never deleted --------------------------------------

def damage(step_dir):
  """Truncates every array-data file of a checkpoint (what a full disk or a bad copy does)."""
  files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(step_dir, 'state'))
           for f in names if os.sep + 'd' + os.sep in os.path.join(d, f)]
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def tree_files(root) -> dict:
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      with open(os.path.join(dirpath, n), 'rb') as f:
        out[os.path.relpath(os.path.join(dirpath, n), root)] = f.read()
  return out


def test_checkpointer_moves_damaged_checkpoints_aside(tmp_path, capsys):
  from rlhf_jax.errors import UserError
  from rlhf_jax.train.checkpoint import Checkpointer
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state_of = lambda step: {'w': np.arange(64, dtype=np.float32) * step, 'n': np.int32(step)}
  like = jax.tree.map(jax.numpy.asarray, state_of(0))
  shardings = jax.tree.map(lambda _: device, like)
  ckpt_dir, aside = tmp_path / 'checkpoints', tmp_path / 'corrupt_checkpoints'
  ckpt = Checkpointer(str(ckpt_dir), keep=2)

  def save(*steps):
    for s in steps:
      ckpt.save(s, state=state_of(s), data_state={'position': s})

  def newest():
    step, state, data = ckpt.restore_newest(state_shardings=shardings, like_state=like)
    assert data == {'position': step} and int(state['n']) == step
    np.testing.assert_array_equal(state['w'], state_of(step)['w'])
    return step

  save(1, 2)
  damage(ckpt_dir / '2')
  damaged = tree_files(ckpt_dir / '2')
  assert newest() == 1
  warning = capsys.readouterr().err.strip().splitlines()
  assert len(warning) == 1 and warning[0].startswith('warning: checkpoint 2 in ')
  assert f'moved it to {aside / "2"}; resuming from checkpoint 1' in warning[0]
  assert tree_files(aside / '2') == damaged and ckpt.all_steps() == [1]

  # The same step damaged again after it was recomputed: it lands beside the first, not on it.
  save(2)
  damage(ckpt_dir / '2')
  again = tree_files(ckpt_dir / '2')
  assert newest() == 1
  assert f'moved it to {aside / "2.1"};' in capsys.readouterr().err
  # Orbax's max_to_keep=2 now collects steps 1 and 2: neither moved copy is touched.
  save(2, 3, 4)
  assert ckpt.all_steps() == [3, 4] and sorted(os.listdir(ckpt_dir)) == ['3', '4']
  assert tree_files(aside / '2') == damaged and tree_files(aside / '2.1') == again

  # Every checkpoint damaged: an error naming each, and nothing moved.
  damage(ckpt_dir / '3')
  damage(ckpt_dir / '4')
  before = tree_files(tmp_path)
  with pytest.raises(UserError, match=r'no checkpoint in .* can be restored \(4: .*; 3: .*\); '
                                      'nothing was moved'):
    ckpt.restore_newest(state_shardings=shardings, like_state=like)
  assert tree_files(tmp_path) == before and capsys.readouterr().err == ''
  ckpt.close()


# --- Extending a finished run: more steps, the schedule to the new end -----------------------

EXTEND = {'model.d_model': 32, 'model.d_ff': 64, 'train.seq_len': 32, 'train.batch_size': 8,
          'train.eval_batches': 1, 'train.progress': False, 'train.ckpt_every': 4,
          'train.log_every': 1, 'train.eval_every': 6, 'optim.warmup_steps': 2}


def extend_config(steps: int):
  config = load_config('pretrain', 'tiny')
  for key, value in {**EXTEND, 'train.steps': steps}.items():
    block, field = key.split('.')
    config[block][field] = value
  return config


def cosine_lr(t: int, *, total: int, optim) -> float:
  """optax.warmup_cosine_decay_schedule written out in float64: linear warmup from 0, then
  a half cosine from lr down to lr * end_lr_ratio at `total`."""
  peak, end, w = optim.lr, optim.lr * optim.end_lr_ratio, optim.warmup_steps
  if t < w:
    return peak * t / w
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))


@pytest.mark.slow
def test_extending_a_finished_run(tmp_path, capsys, run_cli):
  from rlhf_jax.stages import dispatch, pretrain
  n = 4
  workdir = tmp_path / 'run'
  dispatch.run(extend_config(n), str(workdir))
  first = metrics_without_timing(workdir)
  assert checkpoint_steps(workdir) == [n] and [r['step'] for r in first] == list(range(n + 1))
  assert 'config:' not in capsys.readouterr().out

  dispatch.run(extend_config(2 * n), str(workdir))
  notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith('config:')]
  assert len(notes) == 1, notes  # once, though the config is checked twice
  assert notes[0].startswith(f'config: {workdir} continues from checkpoint {n} with '
                             f'train.steps {n} -> {2 * n} (the learning-rate schedule now '
                             f'runs to the new end, {2 * n})')
  history = [json.loads(l) for l in open(workdir / 'config_history.jsonl')]
  assert len(history) == 1 and history[0]['from_step'] == n
  assert history[0]['changes'] == {'train.steps': {'old': n, 'new': 2 * n}}
  assert json.load(open(workdir / 'config.json'))['train']['steps'] == 2 * n

  # It continued from step n: the old lines stand, then one per step, evaluated at its own
  # cadence and at the new end.
  records = metrics_without_timing(workdir)
  assert records[:n + 1] == first and [r['step'] for r in records] == list(range(2 * n + 1))
  assert [r['step'] for r in records if 'eval/loss' in r] == [0, n, 6, 2 * n]
  assert checkpoint_steps(workdir) == [n, 2 * n]
  optim = extend_config(n).optim
  for r in records[1:]:  # the line of step d reports the LR of update d - 1
    total = n if r['step'] <= n else 2 * n
    assert r['train/lr'] == pytest.approx(cosine_lr(r['step'] - 1, total=total, optim=optim),
                                          rel=1e-6), r['step']

  # The same as n updates under the n-step schedule, then n under the 2n-step one.
  os.makedirs(tmp_path / 'reference')
  setup = pretrain.Setup(extend_config(n), workdir=str(tmp_path / 'reference'))
  longer = pretrain.Setup(extend_config(2 * n), workdir=str(tmp_path / 'reference'),
                          source=setup.source)
  state = setup.state
  for s in (setup,) * n + (longer,) * n:
    state, _ = s.step(state, s.put_batch(setup.source.next_batch()))
  saved = read_state(workdir / 'checkpoints' / str(2 * n))
  assert int(saved['step']) == int(state.step) == 2 * n
  assert_states_equal(jax.device_get(state.params), saved['params'])

  # Any other field is still refused, with or without a longer run; nothing is written.
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  flags = [f'--config.{k}={v}' for k, v in EXTEND.items()]
  for extra in (['--config.train.steps=16', '--config.optim.lr=0.001'],
                ['--config.train.steps=6']):
    result = run_cli('--config=configs/pretrain.py:tiny', f'--workdir={workdir}', *flags,
                     *extra)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ')
    assert ('optim.lr' in lines[0]) if 'optim.lr' in extra[-1] else (
        f'train.steps=6 does not continue the run in {workdir} past its newest checkpoint '
        f'(step {2 * n})' in lines[0] and f'train.steps >= {2 * n + 1}' in lines[0]), lines[0]
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before


def test_which_changes_a_rerun_accepts(tmp_path, capsys):
  """Single stages may change their length and cadences (recorded once, on write); loops
  may not change their train blocks; a length never goes back past the newest checkpoint."""
  from rlhf_jax.config import write_or_check
  from rlhf_jax.errors import UserError
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '10').mkdir(parents=True)  # as orbax names a finished step
  config = load_config('pretrain', 'tiny')
  config.train.steps = 10
  write_or_check(config, str(workdir))
  assert not (workdir / 'config_history.jsonl').exists()

  config.train.update(steps=30, eval_every=7, ckpt_every=9, keep_ckpts=1, log_every=3,
                      progress=not config.train.progress)
  before = (workdir / 'config.json').read_bytes()
  write_or_check(config, str(workdir), write=False)  # the check before compute: no trace
  assert (workdir / 'config.json').read_bytes() == before and capsys.readouterr().out == ''
  assert not (workdir / 'config_history.jsonl').exists()
  old = load_config('pretrain', 'tiny').train
  write_or_check(config, str(workdir))
  write_or_check(config, str(workdir))  # config.json is now the new config: no second line
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'config: {workdir} continues from checkpoint '
                                                 '10 with train.ckpt_every ')
  history = [json.loads(l) for l in open(workdir / 'config_history.jsonl')]
  assert len(history) == 1 and history[0]['from_step'] == 10
  assert history[0]['changes'] == {  # progress only shows the run differently: not recorded
      'train.steps': {'old': 10, 'new': 30},
      'train.eval_every': {'old': old.eval_every, 'new': 7},
      'train.ckpt_every': {'old': old.ckpt_every, 'new': 9},
      'train.keep_ckpts': {'old': old.keep_ckpts, 'new': 1},
      'train.log_every': {'old': old.log_every, 'new': 3}}
  assert json.load(open(workdir / 'config.json'))['train']['steps'] == 30

  # As if stopped at step 10 of 30: a new length must reach past it (a train loop evaluates
  # at its last step); any that does is taken.
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  for steps in (5, 10):
    config.train.steps = steps
    with pytest.raises(UserError, match=rf'train.steps={steps} does not continue .* past its '
                                        r'newest checkpoint \(step 10\).* train.steps >= 11'):
      write_or_check(config, str(workdir))
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before
  config.train.steps = 11
  write_or_check(config, str(workdir))
  assert 'train.steps 30 -> 11' in capsys.readouterr().out

  # In a loop the train block is each generation's, or each stage's: fixed.
  for name, variant, change in (('collapse', 'tiny', ('train', 'steps')),
                                ('collapse', 'tiny', ('train', 'ckpt_every')),
                                ('rlhf_rounds', 'tiny', ('stages', 'ppo', 'train', 'steps'))):
    loop_dir = tmp_path / f'{name}_{change[-1]}'
    loop_dir.mkdir()
    config = load_config(name, variant)
    write_or_check(config, str(loop_dir))
    block = config
    for key in change[:-1]:
      block = block[key]
    block[change[-1]] += 1
    with pytest.raises(UserError, match=rf'different config \(differs at: {".".join(change)}\)'):
      write_or_check(config, str(loop_dir), write=False)
  assert capsys.readouterr().out == ''
