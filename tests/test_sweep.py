"""launch/sweep.py: a 2 x 2 grid of tiny pretraining runs (one per point, each with the
point's config), a rerun that skips them all, a sweep killed mid-run that the rerun
finishes with the same metrics as the uninterrupted runs, a failing run, and bad input
refused before anything runs. The sweep itself runs as users run it, in a subprocess."""
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli_env

CONFIG = '--config=configs/pretrain.py:tiny'
TINY = ('--set', 'train.steps=6', '--set', 'train.log_every=3', '--set', 'train.eval_every=6',
        '--set', 'train.ckpt_every=3', '--set', 'train.progress=False',
        # a smaller model than tiny's: compiling is most of a 6-step run
        '--set', 'model.d_model=32', '--set', 'model.d_ff=64', '--set', 'train.seq_len=32',
        '--set', 'train.batch_size=8', '--set', 'train.eval_batches=1')
SETS = [a for a in TINY if a != '--set']
GRID = ('--sweep', 'optim.lr=[1e-3,3e-3]', '--sweep', 'seed=[0,1]')
POINTS = {'lr_0.001-seed_0': (0.001, 0), 'lr_0.001-seed_1': (0.001, 1),
          'lr_0.003-seed_0': (0.003, 0), 'lr_0.003-seed_1': (0.003, 1)}


def sweep(*args, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'launch/sweep.py', *args], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=timeout)


def summary(result) -> dict:
  return json.loads(result.stdout.strip().splitlines()[-1])


def read_manifest(root) -> dict:
  with open(os.path.join(root, 'manifest.json')) as f:
    return json.load(f)


def write_manifest(root, manifest: dict) -> None:
  with open(os.path.join(root, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)


def last_metrics(workdir) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = json.loads(f.read().strip().splitlines()[-1])
  return {k: v for k, v in last.items() if not k.startswith('perf/')}


@pytest.fixture(scope='module')
def grid_root(tmp_path_factory):
  """The 2 x 2 sweep, run once (about 45 s on 2 cores); tests that change it copy it."""
  root = str(tmp_path_factory.mktemp('sweep') / 'lr')
  result = sweep(CONFIG, f'--root={root}', *GRID, *TINY)
  return root, result


def test_grid_runs_every_point_with_its_config(grid_root):
  root, result = grid_root
  assert result.returncode == 0, result.stderr[-3000:]
  assert summary(result) == {'runs': 4, 'finished': 4, 'failed': 0, 'skipped': 0}
  assert len(result.stdout.strip().splitlines()) == 5  # a status line per run, the summary
  manifest = read_manifest(root)
  assert manifest['config'] == 'configs/pretrain.py:tiny'
  assert manifest['sets'] == {'train.steps': 6, 'train.log_every': 3, 'train.eval_every': 6,
                              'train.ckpt_every': 3, 'train.progress': False,
                              'model.d_model': 32, 'model.d_ff': 64, 'train.seq_len': 32,
                              'train.batch_size': 8, 'train.eval_batches': 1}
  assert [r['name'] for r in manifest['runs']] == list(POINTS)
  for run in manifest['runs']:
    lr, seed = POINTS[run['name']]
    assert run['overrides'] == {'optim.lr': lr, 'seed': seed}
    assert (run['status'], run['returncode'], run['workdir']) == ('finished', 0, run['name'])
    assert run['command'][:3] == [sys.executable, '-m', 'rlhf_jax.main']
    assert f'--config.optim.lr={lr!r}' in run['command']
    workdir = os.path.join(root, run['name'])
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    assert (config['optim']['lr'], config['seed'], config['train']['steps']) == (lr, seed, 6)
    assert last_metrics(workdir)['step'] == 6
  # Different learning rates and seeds really are different runs.
  losses = {last_metrics(os.path.join(root, n))['train/loss'] for n in POINTS}
  assert len(losses) == 4


def test_rerun_skips_finished_runs_and_changes_nothing(grid_root):
  root, first = grid_root
  assert first.returncode == 0, first.stderr[-3000:]

  def files():
    out = {}
    for name in POINTS:
      path = os.path.join(root, name, 'metrics.jsonl')
      with open(path, 'rb') as f:
        out[name] = (f.read(), os.stat(path).st_mtime_ns)
    return out

  before = files()
  result = sweep(CONFIG, f'--root={root}', *GRID, *TINY, timeout=60)
  assert result.returncode == 0, result.stderr
  assert summary(result) == {'runs': 4, 'finished': 4, 'failed': 0, 'skipped': 4}
  assert files() == before
  assert not os.path.exists(os.path.join(root, 'lr_0.003-seed_2'))


def test_other_grid_on_the_same_root_is_refused(grid_root):
  root, _ = grid_root
  before = read_manifest(root)
  for args in ((CONFIG, '--sweep', 'optim.lr=[1e-3,3e-3]', '--sweep', 'seed=[0,1,2]', *TINY),
               (CONFIG, *GRID, *TINY, '--set', 'train.keep_ckpts=2'),
               ('--config=configs/pretrain.py:small', *GRID, *TINY)):
    result = sweep(*args, f'--root={root}', timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith('error: ') and 'another --root' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
  assert read_manifest(root) == before


def test_killed_sweep_finishes_on_rerun_with_the_uninterrupted_metrics(grid_root, tmp_path):
  """Run A lost its newest checkpoint while marked running (a sweep killed mid-run); run B,
  marked finished, lost its whole directory. The sweep is then killed for real (SIGKILL to
  its process group, run B under way) and rerun: both end as the uninterrupted runs did."""
  source, first = grid_root
  assert first.returncode == 0, first.stderr[-3000:]
  root = str(tmp_path / 'lr')
  shutil.copytree(source, root)
  a, b = 'lr_0.003-seed_1', 'lr_0.001-seed_1'
  expected = {n: last_metrics(os.path.join(root, n)) for n in (a, b)}
  shutil.rmtree(os.path.join(root, a, 'checkpoints', '6'))
  shutil.rmtree(os.path.join(root, b))
  manifest = read_manifest(root)
  for run in manifest['runs']:
    if run['name'] == a:
      run['status'], run['returncode'] = 'running', None
  write_manifest(root, manifest)

  proc = subprocess.Popen([sys.executable, 'launch/sweep.py', CONFIG, f'--root={root}', *GRID,
                           *TINY], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, start_new_session=True)
  try:
    # Run B's directory appears once its CLI is past start-up: the sweep is mid-run.
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(root, b)) and proc.poll() is None:
      assert time.time() < deadline, 'run B never started'
      time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
  status = {r['name']: r['status'] for r in read_manifest(root)['runs']}
  assert status[b] == 'running' and status[a] == 'running'

  result = sweep(CONFIG, f'--root={root}', *GRID, *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  assert summary(result) == {'runs': 4, 'finished': 4, 'failed': 0, 'skipped': 2}
  assert all(r['status'] == 'finished' for r in read_manifest(root)['runs'])
  for name in (a, b):
    got = last_metrics(os.path.join(root, name))
    assert got['step'] == 6
    assert got['train/loss'] == pytest.approx(expected[name]['train/loss'], abs=1e-6)
    assert got.keys() == expected[name].keys()
    for key, value in expected[name].items():
      assert got[key] == pytest.approx(value, abs=1e-6), (name, key)
  assert os.path.isdir(os.path.join(root, a, 'checkpoints', '6'))


def test_failing_run_is_recorded_and_the_sweep_exits_1(tmp_path):
  root = str(tmp_path / 'mesh')
  # 3-way FSDP cannot divide the one CPU device: the CLI exits 2 right after start-up.
  result = sweep(CONFIG, f'--root={root}', '--sweep', 'mesh.fsdp=[3]', *TINY, timeout=120)
  assert result.returncode == 1, result.stderr
  assert summary(result) == {'runs': 1, 'finished': 0, 'failed': 1, 'skipped': 0}
  assert 'fsdp_3' in result.stderr and result.stderr.startswith('error: ')
  assert 'fsdp_3: failed (exit 2' in result.stdout
  (run,) = read_manifest(root)['runs']
  assert (run['name'], run['status'], run['returncode']) == ('fsdp_3', 'failed', 2)


def test_print_mode_prints_one_command_per_point_and_runs_nothing(tmp_path):
  root = tmp_path / 'printed'
  result = sweep(CONFIG, f'--root={root}', *GRID, *TINY, '--mode=print', timeout=60)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 4
  for line, (name, (lr, seed)) in zip(lines, POINTS.items()):
    argv = shlex.split(line)
    assert argv[:4] == ['python', '-m', 'rlhf_jax.main', '--config=configs/pretrain.py:tiny']
    assert argv[4] == f'--workdir={root}/{name}'
    assert argv[5:] == [*(f'--config.{s}' for s in SETS), f'--config.optim.lr={lr!r}',
                        f'--config.seed={seed}']
  assert not root.exists()


@pytest.mark.parametrize('args, says', [
    (('--sweep', 'optim.nope=[1,2]'), 'optim.nope'),
    (('--sweep', 'optim.lr'), "no '='"),
    (('--sweep', 'optim.lr=1e-3'), 'bracketed list'),
    (('--sweep', 'optim.lr=[]'), 'empty'),
    (('--sweep', 'train.steps=[10,1.5]'), 'train.steps=1.5'),
    (('--sweep', 'train.progress=[0,1]'), 'bool'),
    (('--sweep', 'optim.lr=[1e-3]', '--set', 'optim.lr=1e-2'), 'optim.lr is given twice'),
    (('--sweep', 'seed=[0]', '--sweep', 'seed=[1]'), 'seed is given twice'),
    (('--sweep', 'train.steps=[0,10]'), 'train.steps=0 must be positive'),
    (('--sweep', 'seed=[0]', '--list', 'seed=1'), 'not both'),
    (('--set', 'train.steps=6'), '--sweep'),
])
def test_bad_input_fails_before_anything_runs(tmp_path, args, says):
  root = tmp_path / 'bad'
  result = sweep(CONFIG, f'--root={root}', *args, timeout=60)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0], lines
  assert not root.exists()


@pytest.mark.parametrize('args, says', [
    (('--config=configs/nope.py:tiny',), 'configs/nope.py does not exist'),
    (('--config=configs/pretrain.py:huge',), "unknown variant 'huge'"),
    ((), '--config is required'),
])
def test_bad_config_fails_before_anything_runs(tmp_path, args, says):
  root = tmp_path / 'bad'
  result = sweep(*args, f'--root={root}', '--sweep', 'seed=[0,1]', timeout=60)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0], lines
  assert not root.exists()


# --- The parsing and naming helpers, in process ---------------------------------------------

@pytest.fixture(scope='module')
def lib():
  spec = importlib.util.spec_from_file_location('sweep_lib', os.path.join(REPO, 'launch',
                                                                          'sweep.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_values_are_literals_or_bare_words(lib):
  assert lib.parse_sweep(spec='optim.lr=[1e-3, 3e-3]') == ('optim.lr', [0.001, 0.003])
  assert lib.parse_sweep(spec="data.source=[world,text:/a/b,'x,y']") == (
      'data.source', ['world', 'text:/a/b', 'x,y'])
  assert lib.parse_sweep(spec='train.progress=[true,False]')[1] == [True, False]
  assert lib.parse_list_point(spec='optim.lr=1e-3,mesh.rules=((1, 2), 3),seed=0') == {
      'optim.lr': 0.001, 'mesh.rules': ((1, 2), 3), 'seed': 0}
  with pytest.raises(lib.SweepError):
    lib.parse_sweep(spec='seed=[0,,1]')


def test_names_are_readable_unique_and_filesystem_safe(lib):
  assert lib.run_names(points=[{'optim.lr': 0.001, 'seed': 0}]) == ['lr_0.001-seed_0']
  # Two keys ending alike keep their full dotted names.
  assert lib.run_names(points=[{'world.seed': 1, 'seed': 2}]) == ['world.seed_1-seed_2']
  names = lib.run_names(points=[{'data.source': 'text:/a/b'}, {'data.source': 'text:/a_b'}])
  assert names[0] != names[1] and all(n.startswith('source_text__a_b-') for n in names)
  assert all('/' not in n and ':' not in n for n in names)
  assert names == lib.run_names(points=[{'data.source': 'text:/a/b'},
                                        {'data.source': 'text:/a_b'}])  # stable on reruns


def test_values_take_the_field_type(lib):
  config = lib.load_config(spec=os.path.join(REPO, 'configs', 'pretrain.py') + ':tiny')[1]
  typed = lambda key, value: lib.typed_value(config=config, key=key, value=value, where='c')
  assert typed('optim.lr', 1) == 1.0 and isinstance(typed('optim.lr', 1), float)
  assert typed('train.steps', 7) == 7
  assert typed('mesh.rules', [('batch', None)]) == (('batch', None),)
  for key, value in (('train.steps', 1.5), ('train.steps', True), ('optim.lr', 'a'),
                     ('train.progress', 1), ('data.source', 3), ('optim', 1), ('seed.x', 1)):
    with pytest.raises(lib.SweepError):
      typed(key, value)
