"""launch/sweep.py --mode=slurm and --mode=tpu_vm with fake sbatch, squeue and gcloud first
on PATH: the exact sbatch command line and array script, the exact gcloud lines, the
manifest they leave, a rerun after the fake jobs "ran" (their run directories hold a
finished run) that submits nothing, and bad options refused with one line. No training:
the run directories are written by hand (config.json, metrics.jsonl)."""
import importlib.util
import json
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

from conftest import REPO

CONFIG = '--config=configs/pretrain.py:tiny'
GRID = ('--sweep', 'seed=[0,1,2]', '--set', 'train.steps=4')
# slurm_gpu.sh's #SBATCH defaults, which the array script carries (sbatch flags override).
HEADER = ['#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
          '#SBATCH --cpus-per-task=16', '#SBATCH --time=04:00:00']

_FAKE = r'''#!{python}
"""Records its name and argv (and sbatch's script); sbatch answers a job id, squeue the
tasks listed in FAKE_QUEUE."""
import json, os, sys
name = os.path.basename(sys.argv[0])
record = dict(tool=name, argv=sys.argv[1:])
if name == 'sbatch':
  record['script'] = open(sys.argv[-1]).read()
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps(record) + '\n')
if name == 'sbatch' and os.environ.get('FAKE_REFUSE'):
  sys.exit(print('sbatch: error: invalid partition specified: gpu', file=sys.stderr) or 1)
if name == 'sbatch':
  print(os.environ.get('FAKE_JOB', '4242') + ';cluster1')
if name == 'squeue':
  print('\n'.join(os.environ.get('FAKE_QUEUE', '').split()))
'''


class Result:
  def __init__(self, returncode, captured):
    self.returncode, self.stdout, self.stderr = returncode, captured.out, captured.err


@pytest.fixture(scope='module')
def lib():
  """launch/sweep.py in this process: the config loads (and jax imports) once, not per call."""
  spec = importlib.util.spec_from_file_location('sweep_cluster_lib',
                                                os.path.join(REPO, 'launch', 'sweep.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def fake(tmp_path, lib, monkeypatch, capsys):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in ('sbatch', 'squeue', 'gcloud'):
    path = bin_dir / tool
    path.write_text(_FAKE.replace('{python}', sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
  log = tmp_path / 'calls.jsonl'
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_LOG', str(log))
  monkeypatch.setenv('TMPDIR', str(tmp_path))

  def sweep(*args, **env):
    for key in ('FAKE_QUEUE', 'FAKE_JOB', 'FAKE_REFUSE'):
      monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
      monkeypatch.setenv(key, value)
    capsys.readouterr()
    try:
      rc = lib.main(argv=[CONFIG, *args])
    except SystemExit as e:  # argparse's own errors
      rc = e.code
    return Result(rc, capsys.readouterr())

  def calls(tool=None):
    if not log.exists():
      return []
    out = [json.loads(l) for l in log.read_text().splitlines()]
    return [c for c in out if tool in (None, c['tool'])]
  return sweep, calls


def finish(root, name, *, last_step=4):
  """A run directory as the CLI leaves it, logged up to `last_step` of train.steps=4."""
  workdir = root / name
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(json.dumps({'stage': 'pretrain', 'train': {'steps': 4}}))
  rows = [{'step': s, 'train/loss': 1.0 / s} for s in range(2, last_step + 1, 2)]
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def manifest(root):
  return json.loads((root / 'manifest.json').read_text())


def statuses(root):
  return {r['name']: (r['status'], r.get('job', {}).get('id')) for r in manifest(root)['runs']}


def summary(result):
  return json.loads(result.stdout.strip().splitlines()[-1])


def array_script(root, n, points):
  lines = ['#!/usr/bin/env bash', *HEADER,
           f'# launch/sweep.py --mode=slurm on {root}: array task i runs point i of',
           f'# {root}/manifest.json through launch/slurm_gpu.sh.',
           'set -euo pipefail', 'cd "$SLURM_SUBMIT_DIR"', 'case $SLURM_ARRAY_TASK_ID in']
  lines += [f'  {i}) exec bash launch/slurm_gpu.sh --config=configs/pretrain.py:tiny '
            f'--workdir={root}/seed_{i} --config.train.steps=4 --config.seed={i} ;;'
            for i in points]
  lines += ['  *) echo "error: no point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
            'esac', '']
  return '\n'.join(lines)


def sbatch_argv(root, n, array):
  return ['--parsable', f'--job-name=sweep-{root.name}', f'--array={array}', '--nodes=2',
          '--partition=gpu', f'--output={root}/slurm/%x-%A_%a.out', f'{root}/slurm/array_{n}.sh']


SLURM = ('--mode=slurm', '--partition=gpu', '--nodes=2')


def test_slurm_submits_one_array_of_the_unfinished_points_and_learns_their_end(fake, tmp_path):
  sweep, calls = fake
  root = tmp_path / 'grid'
  finish(root, 'seed_1')  # finished before the sweep: not submitted
  dry = sweep(f'--root={root}', *GRID, *SLURM, '--dry-run')
  assert dry.returncode == 0, dry.stderr
  lines = dry.stdout.splitlines()
  assert lines[0] == f'+ sbatch {" ".join(sbatch_argv(root, 1, "0,2"))}'
  assert lines[1] == f'# {root}/slurm/array_1.sh:'
  assert '\n'.join(lines[2:-1]) + '\n' == array_script(root, 1, [0, 2])
  assert calls() == [] and not (root / 'manifest.json').exists()

  result = sweep(f'--root={root}', *GRID, *SLURM)
  assert result.returncode == 0, result.stderr
  (sbatch,) = calls('sbatch')
  assert sbatch['argv'] == sbatch_argv(root, 1, '0,2')
  assert sbatch['script'] == array_script(root, 1, [0, 2])
  assert summary(result) == {'runs': 3, 'submitted': 2, 'finished': 1, 'queued': 0}
  assert statuses(root) == {'seed_0': ('submitted', '4242_0'), 'seed_1': ('finished', None),
                            'seed_2': ('submitted', '4242_2')}

  # Task 2 still queued; task 0 ended half-way: only it is submitted again, in a new script.
  finish(root, 'seed_0', last_step=2)
  again = sweep(f'--root={root}', *GRID, *SLURM, FAKE_QUEUE='4242_2', FAKE_JOB='4243')
  assert again.returncode == 0, again.stderr
  assert calls('squeue')[-1]['argv'] == ['--noheader', '--array', '--jobs=4242',
                                         '--format=%A_%a']
  assert [c['argv'] for c in calls('sbatch')][1] == sbatch_argv(root, 2, '0')
  assert calls('sbatch')[1]['script'] == array_script(root, 2, [0])
  assert (root / 'slurm' / 'array_1.sh').read_text() == array_script(root, 1, [0, 2])
  assert statuses(root) == {'seed_0': ('submitted', '4243_0'), 'seed_1': ('finished', None),
                            'seed_2': ('submitted', '4242_2')}

  # Both jobs ran (squeue holds nothing) and left finished runs: nothing is submitted.
  finish(root, 'seed_0')
  finish(root, 'seed_2')
  done = sweep(f'--root={root}', *GRID, *SLURM)
  assert done.returncode == 0, done.stderr
  assert len(calls('sbatch')) == 2
  assert summary(done) == {'runs': 3, 'submitted': 0, 'finished': 3, 'queued': 0}
  assert {s for s, _ in statuses(root).values()} == {'finished'}


def test_slurm_refusal_is_one_error_line_and_leaves_the_points_pending(fake, tmp_path):
  sweep, calls = fake
  root = tmp_path / 'grid'
  result = sweep(f'--root={root}', *GRID, *SLURM, FAKE_REFUSE='1')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'error: sbatch refused the array: sbatch: error: invalid partition specified: gpu']
  assert statuses(root) == {f'seed_{i}': ('pending', None) for i in range(3)}
  again = sweep(f'--root={root}', *GRID, *SLURM)  # the fixed rerun submits all three
  assert again.returncode == 0, again.stderr
  assert calls('sbatch')[-1]['argv'] == sbatch_argv(root, 2, '0,1,2')


def test_slurm_array_task_runs_its_point_through_slurm_gpu_sh(fake, tmp_path):
  """The array script as SLURM runs it (task 2 of a 2-node job), with fake srun, scontrol
  and python: every node's process gets point 2's command, the coordinator and its id."""
  sweep, _ = fake
  root = tmp_path / 'grid'
  assert sweep(f'--root={root}', *GRID, *SLURM).returncode == 0
  bin_dir = tmp_path / 'bin'
  for name, text in (
      ('srun', '#!/usr/bin/env bash\n[ "$1" = --kill-on-bad-exit=1 ] && shift\n'
               'for i in $(seq 0 $((SLURM_NTASKS - 1))); do SLURM_PROCID=$i "$@" || exit; done\n'),
      ('scontrol', '#!/bin/sh\necho n1\necho n2\n'),
      ('fakepython',
       f'#!{sys.executable}\nimport json, sys\nprint("ARGV", json.dumps(sys.argv[1:]))\n')):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  env.update(SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NODELIST='n[1-2]', SLURM_NTASKS='2',
             SLURM_JOB_ID='77', PYTHON='fakepython')
  script = str(root / 'slurm' / 'array_1.sh')
  ran = subprocess.run(['bash', script], env={**env, 'SLURM_ARRAY_TASK_ID': '2'}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
  assert ran.returncode == 0, ran.stderr
  argvs = [json.loads(l[5:]) for l in ran.stdout.splitlines() if l.startswith('ARGV ')]
  assert argvs == [['-m', 'rlhf_jax.main', '--config=configs/pretrain.py:tiny',
                    f'--workdir={root}/seed_2', '--config.train.steps=4', '--config.seed=2',
                    '--coordinator=n1:20077', '--num_processes=2', f'--process_id={i}']
                   for i in range(2)]
  none = subprocess.run(['bash', script], env={**env, 'SLURM_ARRAY_TASK_ID': '5'},
                        capture_output=True, text=True, timeout=30)
  assert none.returncode == 2 and 'no point for array task 5' in none.stderr


TPU = ('--mode=tpu_vm', '--zone=us-central2-b', '--accelerator=v4-32', '--name_prefix=sw',
       '--bucket=b', '--tpu_root=/mnt/b/sw')


def gcloud_lines(name, point):
  loc = '--zone=us-central2-b'
  ssh = f'+ gcloud compute tpus tpu-vm ssh {name} {loc} --worker=all --command='
  return [f'+ gcloud compute tpus tpu-vm create {name} {loc} --accelerator-type=v4-32 '
          '--version=tpu-ubuntu2204-base',
          f'+ gcloud compute tpus tpu-vm scp {{tmp}}/rlhf_jax-{name}.tar.gz '
          f'{name}:rlhf_jax.tar.gz {loc} --worker=all',
          ssh + "'rm -rf rlhf_jax && mkdir -p rlhf_jax && tar -xzf rlhf_jax.tar.gz -C rlhf_jax "
          "&& rm rlhf_jax.tar.gz'",
          ssh + "'cd rlhf_jax && python3 -m pip install --user --quiet uv && python3 -m uv "
          "venv --seed --python=3.11 .venv && .venv/bin/pip install -r requirements-tpu.txt -e .'",
          None,  # the gcsfuse mount, tested in test_launchers.py
          ssh + "'cd rlhf_jax && .venv/bin/python -m rlhf_jax.main "
          f"--config=configs/pretrain.py:tiny --workdir=/mnt/b/sw/seed_{point} "
          f"--distributed=auto --config.train.steps=4 --config.seed={point}'",
          f'+ gcloud compute tpus tpu-vm delete {name} {loc} --quiet']


def _running(pid):
  try:
    return os.waitpid(pid, os.WNOHANG) == (0, 0)
  except ChildProcessError:  # reaped already (subprocess reaps its lost children)
    return False


def _gcloud_only(lines, tmp_path):
  got = [l.replace(str(tmp_path), '{tmp}') for l in lines if l.startswith('+ gcloud ')]
  return [None if 'gcsfuse' in l else l for l in got]


def test_tpu_vm_one_slice_per_unfinished_point_then_a_rerun_submits_nothing(fake, tmp_path):
  sweep, calls = fake
  root = tmp_path / 'grid'
  finish(root, 'seed_1')
  dry = sweep(f'--root={root}', *GRID, *TPU, '--dry-run')
  assert dry.returncode == 0, dry.stderr
  heads = [l for l in dry.stdout.splitlines() if l.startswith('# ')]
  assert heads == [
      f'# seed_{i}: bash launch/tpu_vm.sh --name=sw-{i} --zone=us-central2-b '
      f'--accelerator=v4-32 --bucket=b --config=configs/pretrain.py:tiny '
      f'--workdir=/mnt/b/sw/seed_{i} --log={root}/seed_{i}.log -- --config.train.steps=4 '
      f'--config.seed={i}' for i in (0, 2)]
  assert _gcloud_only(dry.stdout.splitlines(), tmp_path) == [
      *gcloud_lines('sw-0', 0), *gcloud_lines('sw-2', 2)]
  assert calls() == [] and not (root / 'manifest.json').exists()

  start = time.time()
  result = sweep(f'--root={root}', *GRID, *TPU)
  assert result.returncode == 0, result.stderr
  assert summary(result) == {'runs': 3, 'submitted': 2, 'finished': 1, 'queued': 0}
  runs = {r['name']: r for r in manifest(root)['runs']}
  assert [runs[n]['status'] for n in ('seed_0', 'seed_1', 'seed_2')] == [
      'submitted', 'finished', 'submitted']
  # The launchers run on in the background (children of this process, as the sweep runs
  # here); they hold ROOT's lock until they end.
  pids = {runs[n]['job']['pid'] for n in ('seed_0', 'seed_2')}
  while pids:
    assert time.time() - start < 30
    pids = {p for p in pids if _running(p)}
    time.sleep(0.05)
  for name, point in (('sw-0', 0), ('sw-2', 2)):
    ran = [c['argv'] for c in calls('gcloud') if any(name in a for a in c['argv'])]
    expected = [l and shlex.split(l[2:].replace('{tmp}', str(tmp_path)))[1:]
                for l in gcloud_lines(name, point)]
    assert [None if 'gcsfuse' in ' '.join(r) else r for r in ran] == expected

  finish(root, 'seed_0')
  finish(root, 'seed_2')
  before = len(calls())
  done = sweep(f'--root={root}', *GRID, *TPU)
  assert done.returncode == 0, done.stderr
  assert len(calls()) == before  # nothing created
  assert summary(done) == {'runs': 3, 'submitted': 0, 'finished': 3, 'queued': 0}
  assert {r['status'] for r in manifest(root)['runs']} == {'finished'}


@pytest.mark.parametrize('args, says', [
    (('--mode=slurm', '--nodes=0'), '--nodes=0: give a positive whole number'),
    (('--mode=slurm', '--partition=a b'), "--partition='a b'"),
    (('--mode=slurm', '--zone=x'), '--zone is an option of --mode=tpu_vm'),
    (('--mode=local', '--dry-run'), '--dry-run is for --mode=slurm or tpu_vm'),
    (TPU[:1] + TPU[2:], '--mode=tpu_vm needs --zone'),
    (TPU[:3] + ('--name_prefix=Bad_Name',), '--name_prefix=Bad_Name'),
    (TPU[:4] + ('--partition=gpu',), '--partition is an option of --mode=slurm'),
    (TPU[:5] + ('--tpu_root=/home/sw',), 'launch/tpu_vm.sh refuses it'),  # not in the mount
])
def test_bad_cluster_options_are_one_error_line_and_submit_nothing(fake, tmp_path, args, says):
  sweep, calls = fake
  result = sweep(f'--root={tmp_path / "bad"}', *GRID, *args)
  assert result.returncode == 2, result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0], lines
  assert calls() == []
