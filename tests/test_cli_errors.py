"""Bad input to `python -m rlhf_jax.main`: exit status 2, exactly one `error: ...` line on
stderr (no traceback, no library noise), and nothing an earlier run left in the workdir is
changed, added or deleted. A non-finite loss stops the run with the last good checkpoint
finite."""
import json
import math
import os
import re
import shutil

import jax
import numpy as np
import pytest

from conftest import checkpoint_steps, read_state

CONFIG = '--config=configs/pretrain.py:tiny'
# A model small enough that the runs these tests need take seconds, not a minute.
SMALL = ('--config.model.d_model=32', '--config.model.d_ff=64', '--config.train.seq_len=32',
         '--config.train.batch_size=8', '--config.train.eval_batches=1',
         '--config.train.progress=False')


def snapshot(root) -> dict:
  """Every file and folder under root: relative path -> bytes (None for folders)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root) + '/'] = None
    for f in filenames:
      path = os.path.join(dirpath, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


def assert_one_error_line(result, *, status=2, mentions=()):
  lines = result.stderr.splitlines()
  assert result.returncode == status, (result.returncode, result.stderr[-3000:])
  assert len(lines) == 1, f'stderr is not one line:\n{result.stderr[-3000:]}'
  assert lines[0].startswith('error: ') and len(lines[0]) > len('error: ')
  assert 'Traceback' not in lines[0]
  for word in mentions:
    assert word in lines[0], (word, lines[0])
  return lines[0]


def existing_workdir(tmp_path):
  """A workdir holding files of the user's: a bad run must leave them exactly as they are."""
  workdir = tmp_path / 'run'
  (workdir / 'notes').mkdir(parents=True)
  (workdir / 'notes' / 'plan.txt').write_text('keep me\n')
  (workdir / 'results.bin').write_bytes(bytes(range(256)))
  return workdir


@pytest.mark.parametrize('overrides, devices, mentions', [
    (('--config.train.stepz=3',), 1, ('stepz',)),
    (('--config.train.steps=abc',), 1, ('train.steps', 'abc')),
    (('--config.mesh.data=3',), 1, ('mesh', '3 devices', '1 are available')),
    (('--config.mesh.data=3', '--config.mesh.fsdp=1', '--config.mesh.tensor=1'), 8,
     ('mesh', '3 devices', '8 are available')),
    (('--config.train.batch_size=12',), 8, ('batch_size=12', 'divisible', '8')),
    (('--config.data.source=text:/nonexistent',), 1, ('/nonexistent',)),
    (('--config.data.source=foo',), 1, ("'foo'",)),
    (('--config.train.steps=0',), 1, ('train.steps',)),
], ids=['unknown-key', 'mistyped-value', 'mesh-1-device', 'mesh-8-devices',
        'batch-vs-data-parallel', 'missing-text-path', 'unknown-source', 'zero-steps'])
def test_bad_override(run_cli, tmp_path, overrides, devices, mentions):
  workdir = existing_workdir(tmp_path)
  before = snapshot(workdir)
  result = run_cli(CONFIG, f'--workdir={workdir}', *SMALL, *overrides, devices=devices)
  assert_one_error_line(result, mentions=mentions)
  assert snapshot(workdir) == before


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the refusals of a CPU backend')
@pytest.mark.parametrize('overrides, mentions', [
    (('--config.model.attention=cudnn',), ("'cudnn'", 'bfloat16')),
    (('--config.model.attention=cudnn', '--config.model.dtype=bfloat16'),
     ("'cudnn'", 'GPU', "'cpu'")),
    (('--config.model.attention=pallas_flash',), ("'pallas_flash'", 'TPU', "'cpu'")),
], ids=['cudnn-float32', 'cudnn-on-cpu', 'pallas-flash-on-cpu'])
def test_attention_kernel_the_backend_lacks(run_cli, tmp_path, overrides, mentions):
  """An attention kernel this backend cannot run is refused before any compute, not
  replaced by another implementation."""
  workdir = existing_workdir(tmp_path)
  before = snapshot(workdir)
  result = run_cli(CONFIG, f'--workdir={workdir}', *SMALL, *overrides)
  assert_one_error_line(result, mentions=mentions)
  assert snapshot(workdir) == before


def test_unknown_variant(run_cli, tmp_path):
  workdir = existing_workdir(tmp_path)
  before = snapshot(workdir)
  result = run_cli('--config=configs/pretrain.py:huge', f'--workdir={workdir}')
  # The config file's own message, not ml_collections' traceback of it.
  assert_one_error_line(result, mentions=("unknown variant 'huge'", 'tiny'))
  assert snapshot(workdir) == before


@pytest.mark.parametrize('extra', [(), ('--config.train.steps=3',)], ids=['plain', 'override'])
def test_missing_config_file(run_cli, tmp_path, extra):
  workdir = existing_workdir(tmp_path)
  before = snapshot(workdir)
  missing = tmp_path / 'no_such_config.py'
  result = run_cli(f'--config={missing}', f'--workdir={workdir}', *extra)
  assert_one_error_line(result, mentions=(str(missing), 'No such file'))
  assert snapshot(workdir) == before


def test_config_file_with_syntax_error(run_cli, tmp_path):
  workdir = existing_workdir(tmp_path)
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n')
  before = snapshot(workdir)
  assert_one_error_line(run_cli(f'--config={bad}', f'--workdir={workdir}'),
                        mentions=('syntax',))
  assert snapshot(workdir) == before


def test_empty_text_folder(run_cli, tmp_path):
  workdir = existing_workdir(tmp_path)
  empty = tmp_path / 'corpus'
  empty.mkdir()
  before = snapshot(workdir)
  result = run_cli(CONFIG, f'--workdir={workdir}', *SMALL, f'--config.data.source=text:{empty}')
  assert_one_error_line(result, mentions=(str(empty),))
  assert snapshot(workdir) == before
  assert os.listdir(empty) == []


def test_unwritable_workdir(run_cli, tmp_path):
  # Root ignores permission bits, so "unwritable" is a path under a regular file.
  afile = tmp_path / 'afile'
  afile.write_bytes(b'not a folder')
  before = snapshot(tmp_path)
  result = run_cli(CONFIG, f'--workdir={afile / "run"}', *SMALL)
  assert_one_error_line(result, mentions=('--workdir', str(afile / 'run')))
  assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_workdir_with_a_different_config(run_cli, tmp_path):
  workdir = tmp_path / 'run'
  first = run_cli(CONFIG, f'--workdir={workdir}', *SMALL, '--config.train.steps=2')
  assert first.returncode == 0, first.stderr[-3000:]
  before = snapshot(workdir)
  assert {'config.json', 'metrics.jsonl'} <= set(before) and checkpoint_steps(workdir) == [2]
  result = run_cli(CONFIG, f'--workdir={workdir}', *SMALL, '--config.train.steps=2',
                   '--config.optim.lr=0.001')
  assert_one_error_line(result, mentions=(str(workdir), 'optim.lr'))
  assert snapshot(workdir) == before


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4, made once and copied per test."""
  import subprocess
  import sys
  from conftest import REPO, cli_env
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  args = (CONFIG, f'--workdir={workdir}', *SMALL, '--config.train.steps=4',
          '--config.train.ckpt_every=2', '--config.train.log_every=1')
  result = subprocess.run([sys.executable, '-m', 'rlhf_jax.main', *args], cwd=REPO,
                          env=cli_env(1), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoint_steps(workdir) == [2, 4]
  return workdir, args


def _overwrite_with_zeros(path):
  size = os.path.getsize(path)
  with open(path, 'wb') as f:
    f.write(b'\0' * size)


def _truncate_to_half(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _damage(step_dir, damage):
  data_files = [os.path.join(dirpath, f)
                for dirpath, _, files in os.walk(step_dir / 'state')
                for f in files if os.sep + 'd' + os.sep in os.path.join(dirpath, f)]
  assert data_files
  if damage == 'truncate':
    for path in data_files:
      _truncate_to_half(path)
  elif damage == 'zeros':
    for path in data_files:
      _overwrite_with_zeros(path)
  else:  # a copy that lost the index of the array store: every array read fails
    for dirpath, _, files in os.walk(step_dir / 'state'):
      for f in files:
        if f == 'manifest.ocdbt':
          os.remove(os.path.join(dirpath, f))


def _copy_of(finished_run, tmp_path):
  source, args = finished_run
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  return source, workdir, tuple(a.replace(str(source), str(workdir)) for a in args)


@pytest.mark.parametrize('damage', ['truncate', 'zeros', 'lost-manifests'])
def test_corrupt_newest_checkpoint_is_moved_aside(run_cli, tmp_path, finished_run, damage):
  source, workdir, args = _copy_of(finished_run, tmp_path)
  _damage(workdir / 'checkpoints' / '4', damage)
  damaged = snapshot(workdir / 'checkpoints' / '4')
  aside = workdir / 'corrupt_checkpoints'
  if damage == 'truncate':  # one moved there by an earlier attempt keeps its name
    (aside / '4' / 'state').mkdir(parents=True)
    (aside / '4' / 'state' / 'earlier').write_text('moved before\n')
  result = run_cli(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  moved = aside / ('4.1' if damage == 'truncate' else '4')
  assert lines[0].startswith(f'warning: checkpoint 4 in {workdir / "checkpoints"} cannot be '
                             'restored (')
  assert lines[0].endswith(f'); moved it to {moved}; resuming from checkpoint 2'), lines[0]
  assert snapshot(moved) == damaged  # renamed, every byte kept
  if damage == 'truncate':
    assert (aside / '4' / 'state' / 'earlier').read_text() == 'moved before\n'
  # Resumed from step 2, it recomputed step 4 exactly as the undamaged run did.
  assert checkpoint_steps(workdir) == [2, 4]
  original = read_state(source / 'checkpoints' / '4')
  again = read_state(workdir / 'checkpoints' / '4')
  for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(again), strict=True):
    assert np.array_equal(a, b)
  strip = lambda text: [{k: v for k, v in json.loads(l).items() if not k.startswith('perf/')}
                        for l in text.splitlines()]
  assert (strip((workdir / 'metrics.jsonl').read_text()) ==
          strip((source / 'metrics.jsonl').read_text()))


def test_every_checkpoint_corrupt(run_cli, tmp_path, finished_run):
  _, workdir, args = _copy_of(finished_run, tmp_path)
  _damage(workdir / 'checkpoints' / '4', 'truncate')
  _damage(workdir / 'checkpoints' / '2', 'zeros')
  before = snapshot(workdir)
  result = run_cli(*args)
  assert_one_error_line(result, mentions=('no checkpoint in', '4: ', '2: ',
                                          'nothing was moved'))
  assert snapshot(workdir) == before


def test_corrupt_checkpoint_of_an_input_run(run_cli, tmp_path, finished_run):
  """A checkpoint another run starts from is not replaced by an earlier one unasked."""
  source, workdir, _ = _copy_of(finished_run, tmp_path)
  _damage(workdir / 'checkpoints' / '4', 'truncate')
  before = snapshot(workdir)
  result = run_cli('--config=configs/sft.py:tiny', f'--workdir={tmp_path / "sft"}',
                   f'--config.init.run={workdir}', '--config.train.steps=2',
                   '--config.train.progress=False')
  assert_one_error_line(result, mentions=(f'init.run {workdir}: checkpoint 4 cannot be '
                                          'restored', '([2])', 'init.step'))
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_non_finite_loss_stops_at_the_last_finite_checkpoint(run_cli, tmp_path):
  # Without clipping, an lr of 1e30 makes the first update's parameters ~1e30, whose
  # gradients overflow to NaN on the next step (the loss there is still finite).
  workdir = tmp_path / 'run'
  result = run_cli(CONFIG, f'--workdir={workdir}', *SMALL, '--config.train.steps=10',
                   '--config.train.ckpt_every=1', '--config.train.log_every=1',
                   '--config.optim.clip_norm=0', '--config.optim.lr=1e30',
                   '--config.optim.warmup_steps=0')
  assert result.returncode != 0
  line = assert_one_error_line(result, status=result.returncode, mentions=('non-finite',))
  failed_at = int(re.search(r'at step (\d+)', line).group(1))
  steps = checkpoint_steps(workdir)
  assert steps and max(steps) < failed_at
  assert f'last good checkpoint is step {max(steps)}' in line
  state = read_state(workdir / 'checkpoints' / str(max(steps)))
  assert int(state['step']) == max(steps)
  for leaf in jax.tree.leaves(state['params']):
    assert np.isfinite(leaf).all()
  # Nothing non-finite was logged either: every record is plain, finite JSON.
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    assert record['step'] < failed_at
    assert all(math.isfinite(v) for v in record.values()), record


def test_reports_of_abandoned_reads_are_dropped_for_every_future_class():
  """asyncio names the future's class in its report: a gather's is `_GatheringFuture`."""
  import asyncio
  import gc
  import logging
  from rlhf_jax.train import checkpoint
  seen = []

  class Keep(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage().split('\n', 1)[0])

  log = logging.getLogger('asyncio')
  keep = Keep()
  log.addHandler(keep)
  try:
    checkpoint._collect_abandoned_reads()  # installs the filter, as a failed restore does
    loop = asyncio.new_event_loop()

    async def fail():
      raise ValueError('OUT_OF_RANGE: a truncated chunk')

    async def abandon():
      asyncio.gather(fail(), fail())  # both fail; nobody retrieves the gather's result
      await asyncio.sleep(0.01)

    loop.run_until_complete(abandon())
    loop.close()
    gc.collect()
    log.error('an unrelated asyncio error')
  finally:
    log.removeHandler(keep)
  assert seen == ['an unrelated asyncio error']
