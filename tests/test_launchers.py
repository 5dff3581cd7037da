"""The launchers in launch/: the exact commands they print (dry runs), their usage errors,
and, with fake gcloud / srun / python first on PATH, that they run what they print,
evaluate the process id per task, tear down on failure and stop the other processes when
one fails. Nothing here reaches a cloud or a cluster; each case takes well under a second."""
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ['launch/tpu_vm.sh', 'launch/slurm_gpu.sh', 'launch/local.sh']

TPU_ARGS = ['--name=t1', '--zone=us-central2-b', '--accelerator=v4-32',
            '--config=configs/pretrain.py:tpu_v4_32', '--bucket=b', '--workdir=/mnt/b/run']
# The remote command that installs gcsfuse where it is missing and mounts gs://b at /mnt/b.
MOUNT_B = (
    'if ! command -v gcsfuse >/dev/null; then export GCSFUSE_REPO=gcsfuse-$(lsb_release -c -s) '
    '&& echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
    'https://packages.cloud.google.com/apt $GCSFUSE_REPO main" '
    '| sudo tee /etc/apt/sources.list.d/gcsfuse.list '
    '&& curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg '
    '| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null '
    '&& sudo apt-get update -q && sudo apt-get install -y -o DPkg::Lock::Timeout=600 gcsfuse; '
    'fi && { mountpoint -q /mnt/b || { sudo mkdir -p /mnt/b '
    '&& sudo chown "$(id -u):$(id -g)" /mnt/b && gcsfuse --implicit-dirs --rename-dir-limit=100000 b /mnt/b; }; }')


def _run(script, *args, env=None, path_prefix=None, timeout=30):
  full_env = dict(os.environ)
  for key in list(full_env):
    if key.startswith('SLURM_') or key in ('DRY_RUN', 'PORT', 'LOCAL_DEVICES', 'LOG_DIR',
                                           'PYTHON', 'XLA_FLAGS'):
      del full_env[key]
  full_env.update(env or {})
  if path_prefix:
    full_env['PATH'] = str(path_prefix) + os.pathsep + full_env['PATH']
  return subprocess.run(['bash', script, *args], cwd=REPO, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def _plus_lines(stdout, prefix='+ gcloud '):
  return [line for line in stdout.splitlines() if line.startswith(prefix)]


def _write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


# -- tpu_vm.sh ----------------------------------------------------------------------------

def test_tpu_vm_dry_run_prints_the_exact_gcloud_sequence(tmp_path):
  result = _run('launch/tpu_vm.sh', '--dry-run', *TPU_ARGS, '--', '--config.train.steps=10',
                env={'TMPDIR': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  tarball = f'{tmp_path}/rlhf_jax-t1.tar.gz'
  loc = '--zone=us-central2-b'
  ssh = f'+ gcloud compute tpus tpu-vm ssh t1 {loc} --worker=all --command='
  assert _plus_lines(result.stdout) == [
      f'+ gcloud compute tpus tpu-vm create t1 {loc} --accelerator-type=v4-32 '
      '--version=tpu-ubuntu2204-base',
      f'+ gcloud compute tpus tpu-vm scp {tarball} t1:rlhf_jax.tar.gz {loc} --worker=all',
      ssh + "'rm -rf rlhf_jax && mkdir -p rlhf_jax && tar -xzf rlhf_jax.tar.gz -C rlhf_jax "
      "&& rm rlhf_jax.tar.gz'",
      ssh + "'cd rlhf_jax && python3 -m pip install --user --quiet uv && python3 -m uv venv "
      "--seed --python=3.11 .venv && .venv/bin/pip install -r requirements-tpu.txt -e .'",
      ssh + f"'{MOUNT_B}'",
      ssh + "'cd rlhf_jax && .venv/bin/python -m rlhf_jax.main "
      "--config=configs/pretrain.py:tpu_v4_32 --workdir=/mnt/b/run --distributed=auto "
      "--config.train.steps=10'",
      f'+ gcloud compute tpus tpu-vm delete t1 {loc} --quiet',
  ]
  # The only other command is the local packing of the code, before anything is created.
  others = [line for line in result.stdout.splitlines()
            if line.startswith('+ ') and not line.startswith('+ gcloud ')]
  assert len(others) == 1 and others[0].startswith(f'+ tar -czf {tarball} ')
  assert result.stdout.index('+ tar ') < result.stdout.index('+ gcloud ')
  assert not os.path.exists(tarball)  # a dry run runs nothing
  # The mount line is valid shell, and its command reaches the workers unchanged.
  mount_argv = shlex.split(_plus_lines(result.stdout)[-3][2:])
  assert mount_argv[-1] == f'--command={MOUNT_B}'
  assert subprocess.run(['bash', '-n', '-c', MOUNT_B]).returncode == 0


def test_tpu_vm_mount_runs_on_a_worker_installing_gcsfuse_once(tmp_path):
  """The mount command, run by bash with fake sudo, curl, lsb_release, mountpoint and
  apt-get: installs gcsfuse when it is missing, mounts, and skips what is done."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  record = tmp_path / 'record'
  _write_exe(bin_dir / 'sudo', '#!/usr/bin/env bash\necho "sudo $*" >> "$RECORD"\n'
             'case $1 in tee) cat > /dev/null ;; apt-get) if [[ $* == *install* ]]; then\n'
             '  printf \'#!/bin/sh\\necho "gcsfuse $*" >> "$RECORD"\\n\' > "$BIN/gcsfuse"\n'
             '  chmod +x "$BIN/gcsfuse"; fi ;; esac\n')
  _write_exe(bin_dir / 'curl', '#!/bin/sh\necho "curl $*" >> "$RECORD"; echo KEY\n')
  _write_exe(bin_dir / 'lsb_release', '#!/bin/sh\necho jammy\n')
  _write_exe(bin_dir / 'mountpoint', '#!/bin/sh\n[ -e "$MOUNTED" ]\n')
  env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'RECORD': str(record), 'BIN': str(bin_dir),
         'MOUNTED': str(tmp_path / 'mounted')}

  def worker():
    subprocess.run(['bash', '-c', MOUNT_B], env=env, check=True)
    lines = record.read_text().splitlines()
    record.unlink()
    return lines

  first = worker()
  assert first[0] == 'sudo tee /etc/apt/sources.list.d/gcsfuse.list'
  # `curl KEY | sudo tee FILE`: the two ends of a pipe run at once, so either may log first.
  assert sorted(first[1:3]) == [
      'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg',
      'sudo tee /usr/share/keyrings/cloud.google.asc']
  assert first[3:] == ['sudo apt-get update -q',
                       'sudo apt-get install -y -o DPkg::Lock::Timeout=600 gcsfuse',
                       'sudo mkdir -p /mnt/b', f'sudo chown {os.getuid()}:{os.getgid()} /mnt/b',
                       'gcsfuse --implicit-dirs --rename-dir-limit=100000 b /mnt/b']
  assert worker() == first[-3:]  # gcsfuse there: only the mount
  (tmp_path / 'mounted').touch()
  subprocess.run(['bash', '-c', MOUNT_B], env=env, check=True)
  assert not record.exists()  # mounted already: nothing


def test_tpu_vm_printed_lines_are_valid_shell_with_nested_quoting(tmp_path):
  tricky = "--config.data.source=text:/data/it's here"
  result = _run('launch/tpu_vm.sh', '--dry-run', *TPU_ARGS, '--', tricky,
                env={'TMPDIR': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  run_line = _plus_lines(result.stdout)[-2]
  argv = shlex.split(run_line[2:])
  command = argv[-1].removeprefix('--command=')
  assert shlex.split(command) == [
      'cd', 'rlhf_jax', '&&', '.venv/bin/python', '-m', 'rlhf_jax.main',
      '--config=configs/pretrain.py:tpu_v4_32', '--workdir=/mnt/b/run', '--distributed=auto',
      tricky]


def test_tpu_vm_spot_and_project(tmp_path):
  result = _run('launch/tpu_vm.sh', '--dry-run', *TPU_ARGS, '--spot', '--project', 'my-proj',
                env={'TMPDIR': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  lines = _plus_lines(result.stdout)
  assert lines[0] == ('+ gcloud compute tpus tpu-vm create t1 --zone=us-central2-b '
                      '--project=my-proj --accelerator-type=v4-32 '
                      '--version=tpu-ubuntu2204-base --spot')
  assert all(' --project=my-proj' in line for line in lines)
  assert sum('--spot' in line for line in lines) == 1


def test_tpu_vm_queued_creates_waits_and_deletes_the_queued_resource(tmp_path):
  result = _run('launch/tpu_vm.sh', '--dry-run', *TPU_ARGS, '--queued',
                env={'TMPDIR': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  lines = _plus_lines(result.stdout)
  assert lines[0] == ('+ gcloud compute tpus queued-resources create t1 --zone=us-central2-b '
                      '--node-id=t1 --accelerator-type=v4-32 '
                      '--runtime-version=tpu-ubuntu2204-base')
  assert shlex.split(lines[1][2:], comments=True) == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 't1',
      '--zone=us-central2-b', '--format=value(state.state)']
  assert lines[-1] == ('+ gcloud compute tpus queued-resources delete t1 '
                       '--zone=us-central2-b --force --quiet')
  assert len(lines) == 8 and not any('tpu-vm create' in l or 'tpu-vm delete' in l
                                     for l in lines)


@pytest.mark.parametrize('accelerator, accelerator_type, version', [
    ('v4-8', 'v4-8', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5e-16', 'v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v5p-8', 'v2-alpha-tpuv5'),
])
def test_tpu_vm_runtime_version_per_family(tmp_path, accelerator, accelerator_type, version):
  args = [a for a in TPU_ARGS if not a.startswith('--accelerator')]
  result = _run('launch/tpu_vm.sh', '--dry-run', *args, f'--accelerator={accelerator}',
                env={'TMPDIR': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  create = _plus_lines(result.stdout)[0]
  assert f' --accelerator-type={accelerator_type} --version={version}' in create
  explicit = _run('launch/tpu_vm.sh', '--dry-run', *args, f'--accelerator={accelerator}',
                  '--version=my-runtime', env={'TMPDIR': str(tmp_path)})
  assert _plus_lines(explicit.stdout)[0].endswith(' --version=my-runtime')


def test_tpu_vm_clone_and_keep(tmp_path):
  result = _run('launch/tpu_vm.sh', '--dry-run', *TPU_ARGS, '--code=clone', '--keep',
                '--repo_url=https://github.com/me/rlhf_jax.git', '--ref=v1',
                env={'TMPDIR': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  lines = _plus_lines(result.stdout)
  assert [l.split(' --command=')[-1] for l in lines[1:2]] == [
      "'rm -rf rlhf_jax && git clone https://github.com/me/rlhf_jax.git rlhf_jax "
      "&& git -C rlhf_jax checkout v1'"]
  assert not any(' scp ' in l or ' delete ' in l for l in lines)  # kept: no teardown
  assert '+ tar ' not in result.stdout
  assert 'tpu-vm delete t1' in result.stderr  # but says how


@pytest.mark.parametrize('missing', ['name', 'zone', 'accelerator', 'config', 'workdir'])
def test_tpu_vm_missing_required_flag_exits_2_with_usage(missing):
  args = [a for a in TPU_ARGS if not a.startswith(f'--{missing}=')]
  result = _run('launch/tpu_vm.sh', '--dry-run', *args)
  assert result.returncode == 2
  assert f'error: --{missing} is required' in result.stderr
  assert 'usage: launch/tpu_vm.sh' in result.stderr
  assert '+ ' not in result.stdout


def test_tpu_vm_gs_workdir_exits_2_saying_why():
  args = [a for a in TPU_ARGS if not a.startswith(('--workdir=', '--bucket='))]
  result = _run('launch/tpu_vm.sh', '--dry-run', *args, '--workdir=gs://b/run')
  assert result.returncode == 2 and '+ ' not in result.stdout
  assert 'must be a POSIX path' in result.stderr
  assert '--bucket=b --workdir=/mnt/b/run' in result.stderr


@pytest.mark.parametrize('workdir', ['runs/x', '/home/me/runs/x', '/mnt', '/mnt/'])
def test_tpu_vm_multi_host_without_bucket_needs_a_shared_mount(workdir):
  args = [a for a in TPU_ARGS if not a.startswith(('--workdir=', '--bucket='))]
  result = _run('launch/tpu_vm.sh', '--dry-run', *args, f'--workdir={workdir}')
  assert result.returncode == 2 and '+ ' not in result.stdout
  assert 'pass --bucket=NAME' in result.stderr and 'under /mnt/' in result.stderr
  assert 'usage: launch/tpu_vm.sh' in result.stderr
  # A shared filesystem mounted under /mnt by hand is accepted, with no mount step.
  shared = _run('launch/tpu_vm.sh', '--dry-run', *args, '--workdir=/mnt/nfs/x')
  assert shared.returncode == 0, shared.stderr
  assert 'gcsfuse' not in shared.stdout


@pytest.mark.parametrize('workdir', ['/mnt/other/run', '/mnt/b', '/mnt/b/../other', 'runs/x'])
def test_tpu_vm_multi_host_with_bucket_needs_the_workdir_in_the_mount(workdir):
  args = [a for a in TPU_ARGS if not a.startswith('--workdir=')]
  result = _run('launch/tpu_vm.sh', '--dry-run', *args, f'--workdir={workdir}')
  assert result.returncode == 2 and '+ ' not in result.stdout
  assert 'under the mount' in result.stderr and '--workdir=/mnt/b/runs/t1' in result.stderr


def test_tpu_vm_single_host_takes_a_local_workdir(tmp_path):
  args = [a for a in TPU_ARGS if not a.startswith(('--workdir=', '--bucket=', '--accel'))]
  result = _run('launch/tpu_vm.sh', '--dry-run', *args, '--accelerator=v4-8',
                '--workdir=runs/x', env={'TMPDIR': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  assert 'gcsfuse' not in result.stdout and '--workdir=runs/x' in result.stdout
  assert 'deleted with the slice' in result.stderr  # but says where it goes


@pytest.mark.parametrize('bad', [['--accelerator=v3-8'], ['--accelerator=v6e-8'],
                                 ['--accelerator=v4'], ['--accelerator=v4-x'],
                                 ['--code=rsync'], ['--code=clone'], ['--bogus=1'],
                                 ['--name=Bad_Name'], ['--bucket=gs://b'], ['--bucket=b/run'],
                                 ["--bucket=b'x"]])
def test_tpu_vm_bad_flags_exit_2(bad):
  result = _run('launch/tpu_vm.sh', '--dry-run', *TPU_ARGS, *bad)
  assert result.returncode == 2, result.stdout
  assert 'usage: launch/tpu_vm.sh' in result.stderr and '+ ' not in result.stdout


_FAKE_GCLOUD = r'''#!{python}
"""Records its argv; `describe` answers PROVISIONING, then ACTIVE; fails on FAKE_FAIL."""
import json, os, subprocess, sys
args = sys.argv[1:]
log = os.environ['FAKE_LOG']
with open(log, 'a') as f:
  f.write(json.dumps(args) + '\n')
if 'scp' in args:  # keep what would be shipped
  subprocess.run(['tar', '-tzf', args[args.index('scp') + 1]], check=True,
                 stdout=open(log + '.tar', 'w'))
if 'describe' in args:
  n = sum(1 for line in open(log) if '"describe"' in line)
  print('PROVISIONING' if n < 3 else 'ACTIVE')
if any(a.startswith('--command=cd rlhf_jax && .venv/bin/python') for a in args):
  print('step 0 loss 4.2 (from every worker)')
fail = os.environ.get('FAKE_FAIL')
if fail and fail in ' '.join(args):
  sys.exit(7)
'''


def _fake_gcloud(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(bin_dir / 'gcloud', _FAKE_GCLOUD.replace('{python}', sys.executable))
  return bin_dir, tmp_path / 'gcloud_calls.jsonl'


def _calls(log):
  return [json.loads(line) for line in open(log)]


def test_tpu_vm_runs_what_it_prints_and_ships_the_working_tree(tmp_path):
  bin_dir, log = _fake_gcloud(tmp_path)
  run_log = tmp_path / 'run.log'
  result = _run('launch/tpu_vm.sh', *TPU_ARGS, '--queued', f'--log={run_log}', '--',
                '--config.train.steps=10', path_prefix=bin_dir,
                env={'FAKE_LOG': str(log), 'TMPDIR': str(tmp_path), 'POLL_SECONDS': '0'})
  assert result.returncode == 0, result.stderr
  printed = [shlex.split(l[2:], comments=True) for l in _plus_lines(result.stdout)]
  calls = _calls(log)
  describes = [c for c in calls if 'describe' in c]
  assert len(describes) == 3  # polled until ACTIVE
  assert [['gcloud', *c] for c in calls if 'describe' not in c] == [
      p for p in printed if 'describe' not in p]
  assert calls[-1][:3] == ['compute', 'tpus', 'queued-resources'] and 'delete' in calls[-1]
  assert 'queued resource t1: PROVISIONING' in result.stdout
  assert 'step 0 loss 4.2' in run_log.read_text()
  shipped = set(open(str(log) + '.tar').read().split())
  assert {'./rlhf_jax/main.py', './requirements-tpu.txt', './launch/tpu_vm.sh'} <= shipped
  assert not any(n.startswith(('./.git/', './runs/')) or '__pycache__' in n for n in shipped)
  assert not os.path.exists(tmp_path / 'rlhf_jax-t1.tar.gz')  # removed after the copy


@pytest.mark.parametrize('fail_on, queued', [('pip install', False), ('rlhf_jax.main', True)])
def test_tpu_vm_tears_down_when_a_step_fails(tmp_path, fail_on, queued):
  bin_dir, log = _fake_gcloud(tmp_path)
  result = _run('launch/tpu_vm.sh', *TPU_ARGS, *(['--queued'] if queued else []),
                f'--log={tmp_path}/run.log', path_prefix=bin_dir,
                env={'FAKE_LOG': str(log), 'FAKE_FAIL': fail_on, 'TMPDIR': str(tmp_path),
                     'POLL_SECONDS': '0'})
  assert result.returncode == 7  # the failing step's status
  last = _calls(log)[-1]
  kind = 'queued-resources' if queued else 'tpu-vm'
  assert last[:4] == ['compute', 'tpus', kind, 'delete'] and last[4] == 't1'


def test_tpu_vm_failed_create_deletes_nothing(tmp_path):
  """A create that fails (say, the name is taken) must not delete a TPU of that name."""
  bin_dir, log = _fake_gcloud(tmp_path)
  result = _run('launch/tpu_vm.sh', *TPU_ARGS, path_prefix=bin_dir,
                env={'FAKE_LOG': str(log), 'FAKE_FAIL': 'create', 'TMPDIR': str(tmp_path)})
  assert result.returncode == 7
  assert [c[3] for c in _calls(log)] == ['create']
  assert 'delete it with' in result.stderr


# -- slurm_gpu.sh -------------------------------------------------------------------------

NODES = ['gpu-a01', 'gpu-a02', 'gpu-b07', 'gpu-b08']


def _fake_slurm(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(bin_dir / 'scontrol', '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
             + ''.join(f'echo {n}\n' for n in NODES))
  env = {'SLURM_JOB_NODELIST': 'gpu-a[01-02],gpu-b[07-08]', 'SLURM_NTASKS': '4',
         'SLURM_PROCID': '1', 'SLURM_JOB_ID': '4242'}
  return bin_dir, env


def test_slurm_dry_run_prints_srun_with_the_head_node_as_coordinator(tmp_path):
  bin_dir, env = _fake_slurm(tmp_path)
  args = ['--config=configs/pretrain.py:small', '--workdir=/shared/runs/x',
          '--config.train.steps=10']
  result = _run('launch/slurm_gpu.sh', *args, '--dry-run', env=env, path_prefix=bin_dir)
  assert result.returncode == 0, result.stderr
  srun_lines = _plus_lines(result.stdout, '+ srun ')
  assert len(srun_lines) == 1
  argv = shlex.split(srun_lines[0][2:])
  main = ['python', '-m', 'rlhf_jax.main', *args, '--coordinator=gpu-a01:24242',
          '--num_processes=4']
  assert argv == ['srun', '--kill-on-bad-exit=1', 'bash', '-c',
                  'exec "$@" --process_id="$SLURM_PROCID"', 'rlhf_jax_task', *main]
  # Each task's own command: the id is the task's, not this shell's SLURM_PROCID=1.
  tasks = [l.split(': ', 1)[1] for l in result.stdout.splitlines() if l.startswith('  task ')]
  assert [shlex.split(t) for t in tasks] == [main + [f'--process_id={i}'] for i in range(4)]


def test_slurm_dry_run_from_the_environment_and_port_override(tmp_path):
  bin_dir, env = _fake_slurm(tmp_path)
  result = _run('launch/slurm_gpu.sh', '--config=c.py', '--workdir=/x', path_prefix=bin_dir,
                env={**env, 'DRY_RUN': '1', 'PORT': '7000'})
  assert result.returncode == 0, result.stderr
  assert ' --coordinator=gpu-a01:7000 --num_processes=4' in _plus_lines(result.stdout,
                                                                        '+ srun ')[0]


def test_slurm_each_task_gets_its_own_process_id(tmp_path):
  """A fake srun runs the command once per task with SLURM_PROCID set, as srun does; a
  fake python records its argv."""
  bin_dir, env = _fake_slurm(tmp_path)
  _write_exe(bin_dir / 'srun', '#!/usr/bin/env bash\n[ "$1" = --kill-on-bad-exit=1 ] && shift\n'
             'for i in $(seq 0 $((SLURM_NTASKS - 1))); do SLURM_PROCID=$i "$@" || exit; done\n')
  _write_exe(bin_dir / 'fakepython',
             f'#!{sys.executable}\nimport json, sys\nprint("ARGV", json.dumps(sys.argv[1:]))\n')
  result = _run('launch/slurm_gpu.sh', '--config=configs/pretrain.py:small',
                '--workdir=/shared/x y', path_prefix=bin_dir,
                env={**env, 'PYTHON': 'fakepython', 'SLURM_SUBMIT_DIR': REPO})
  assert result.returncode == 0, result.stderr
  argvs = [json.loads(l[5:]) for l in result.stdout.splitlines() if l.startswith('ARGV ')]
  assert argvs == [['-m', 'rlhf_jax.main', '--config=configs/pretrain.py:small',
                    '--workdir=/shared/x y', '--coordinator=gpu-a01:24242',
                    '--num_processes=4', f'--process_id={i}'] for i in range(4)]


@pytest.mark.parametrize('args', [['--workdir=/shared/x'], ['--config=configs/pretrain.py:small'],
                                  [], ['--config.train.steps=1', '--workdir=/x']])
def test_slurm_missing_config_or_workdir_exits_2(tmp_path, args):
  bin_dir, env = _fake_slurm(tmp_path)
  result = _run('launch/slurm_gpu.sh', *args, '--dry-run', env=env, path_prefix=bin_dir)
  assert result.returncode == 2
  assert 'usage: sbatch' in result.stderr and 'srun' not in result.stdout


def test_slurm_outside_an_allocation_exits_2():
  result = _run('launch/slurm_gpu.sh', '--config=c.py', '--workdir=/x')
  assert result.returncode == 2 and 'not inside a SLURM allocation' in result.stderr


def test_slurm_headers_come_before_any_command():
  lines = open(os.path.join(REPO, 'launch/slurm_gpu.sh')).read().splitlines()
  first_code = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith('#'))
  headers = {l.split()[1].split('=')[0] for l in lines[:first_code] if l.startswith('#SBATCH')}
  assert {'--nodes', '--ntasks-per-node', '--gpus-per-node', '--time', '--output'} <= headers
  assert not any(l.startswith('#SBATCH') for l in lines[first_code:])
  assert 'ntasks-per-node=1' in '\n'.join(lines[:first_code])


# -- local.sh -----------------------------------------------------------------------------

def test_local_dry_run_prints_n_commands_with_one_coordinator():
  result = _run('launch/local.sh', '--dry-run', '2', '--config=configs/pretrain.py:tiny',
                '--workdir=runs/mp', env={'LOCAL_DEVICES': '4', 'XLA_FLAGS': '--xla_foo=1'})
  assert result.returncode == 0, result.stderr
  lines = _plus_lines(result.stdout, '+ ')
  assert len(lines) == 2
  argvs = [shlex.split(l[2:]) for l in lines]
  coordinators = {a for argv in argvs for a in argv if a.startswith('--coordinator=')}
  assert len(coordinators) == 1
  port = int(coordinators.pop().split(':')[-1])
  assert 0 < port < 65536
  for i, argv in enumerate(argvs):
    assert argv == ['JAX_PLATFORMS=cpu',
                    'XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=4',
                    'python', '-m', 'rlhf_jax.main', '--config=configs/pretrain.py:tiny',
                    '--workdir=runs/mp', f'--coordinator=localhost:{port}',
                    '--num_processes=2', f'--process_id={i}']


def test_local_port_from_env_and_no_xla_flags_without_local_devices():
  result = _run('launch/local.sh', '3', '--config=c.py', '--workdir=w',
                env={'DRY_RUN': '1', 'PORT': '23456', 'PYTHON': 'python3'})
  lines = _plus_lines(result.stdout, '+ ')
  assert lines == [f'+ JAX_PLATFORMS=cpu python3 -m rlhf_jax.main --config=c.py --workdir=w '
                   f'--coordinator=localhost:23456 --num_processes=3 --process_id={i}'
                   for i in range(3)]


@pytest.mark.parametrize('n', [None, '0', 'x', '-1', '2.5', ''])
def test_local_bad_n_exits_2_with_usage(n):
  args = ['--dry-run'] if n is None else ['--dry-run', n, '--config=c.py', '--workdir=w']
  result = _run('launch/local.sh', *args)
  assert result.returncode == 2
  assert 'usage: launch/local.sh' in result.stderr and '+ ' not in result.stdout


def test_local_bad_local_devices_exits_2():
  result = _run('launch/local.sh', '--dry-run', '2', env={'LOCAL_DEVICES': 'four'})
  assert result.returncode == 2 and 'LOCAL_DEVICES' in result.stderr


_FAKE_MAIN = r'''#!/usr/bin/env bash
id=''
for a in "$@"; do case $a in --process_id=*) id=${a#*=} ;; esac; done
echo "process $id of $* on ${JAX_PLATFORMS:-?} with ${XLA_FLAGS:-no flags}"
if [[ $id == "${FAIL_ID:-none}" ]]; then sleep 0.3; exit 3; fi
if [[ -n ${FAIL_ID:-} ]]; then exec sleep 30; fi
'''


def test_local_runs_n_processes_with_logs(tmp_path):
  fake = _write_exe(tmp_path / 'fakepython', _FAKE_MAIN)
  result = _run('launch/local.sh', '3', '--workdir=w',
                env={'PYTHON': str(fake), 'LOG_DIR': str(tmp_path / 'logs'), 'PORT': '5555',
                     'LOCAL_DEVICES': '2'})
  assert result.returncode == 0, result.stderr
  for i in range(3):
    log = (tmp_path / 'logs' / f'process_{i}.log').read_text()
    assert log.startswith(f'process {i} of -m rlhf_jax.main --workdir=w '
                          '--coordinator=localhost:5555 --num_processes=3')
    assert 'on cpu with --xla_force_host_platform_device_count=2' in log
  assert 'process 0 of' in result.stdout and 'process 1 of' not in result.stdout


def test_local_one_failure_stops_the_others_and_sets_the_status(tmp_path):
  fake = _write_exe(tmp_path / 'fakepython', _FAKE_MAIN)
  start = time.time()
  result = _run('launch/local.sh', '3', '--workdir=w',
                env={'PYTHON': str(fake), 'LOG_DIR': str(tmp_path / 'logs'), 'FAIL_ID': '1',
                     'PORT': '5555'})
  assert result.returncode == 3
  assert time.time() - start < 8  # the others (sleeping 30 s) were stopped
  assert 'process 1 exited with status 3' in result.stderr


# -- all ----------------------------------------------------------------------------------

@pytest.mark.parametrize('script', LAUNCHERS)
def test_launcher_is_executable_valid_bash_and_shellcheck_clean(script):
  path = os.path.join(REPO, script)
  assert os.access(path, os.X_OK)
  assert subprocess.run(['bash', '-n', path], capture_output=True).returncode == 0
  if shutil.which('shellcheck') is None:
    # CI installs it (.ci/run): a skip there would hide that the lint never ran.
    (pytest.fail if os.environ.get('CI') else pytest.skip)('shellcheck not installed')
  result = subprocess.run(['shellcheck', path], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize('script', LAUNCHERS)
def test_launcher_help_goes_to_stdout_with_status_0(script):
  result = _run(script, '--help')
  assert result.returncode == 0 and result.stdout.startswith('usage: ')
