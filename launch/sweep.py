#!/usr/bin/env python
r"""Runs one config over a grid (or a list) of overrides, one run directory per point.

  python launch/sweep.py --config=configs/pretrain.py:tiny --root=runs/sweep_lr \
      --sweep 'optim.lr=[1e-3,3e-3]' --sweep 'seed=[0,1,2]' [--set train.steps=100 ...] \
      [--mode=local|print|slurm|tpu_vm]
  python launch/sweep.py --config=configs/pretrain.py:tiny --root=runs/sweep_pts \
      --list 'optim.lr=1e-3,seed=0' --list 'optim.lr=3e-3,seed=1'

Points:
  --sweep KEY=[v1,v2,...]  (repeatable) the grid is the Cartesian product of all of them.
                           Values are Python literals (1e-3, 4, True, 'a b'); unquoted words
                           are strings: 'data.source=[world,text:/data/corpus]'.
  --list K=V,K=V,...       (repeatable) explicit points instead of a grid (not with --sweep).
  --set KEY=VALUE          (repeatable) an override shared by every point.

Each point runs as
  python -m rlhf_jax.main --config=CONFIG --workdir=ROOT/<name> --config.KEY=VALUE ...
from the repository root, one after another (`--mode=local`, the default), with the run's
output in ROOT/<name>.log and one status line per run on stdout. <name> is made from the
point's overrides: optim.lr=0.001,seed=0 -> lr_0.001-seed_0 (the full dotted key where two
keys end alike). `--mode=print` prints each point's command instead (one per line,
shell-quoted, `python` from PATH; paths relative to the repository root when under it),
e.g. to hand to a pod launcher; it writes nothing.

ROOT/manifest.json records the config, the shared overrides and each run's overrides,
command, status (pending | running | finished | failed) and return code. Rerunning the same
command skips finished runs and reruns the others with the same command; a run stopped
mid-way resumes from its newest checkpoint. A different config, --set or set of points on
an existing ROOT is refused: use another --root. So is a second sweep on a ROOT whose sweep,
or a run it started, is still going (a lock on ROOT/.sweep.lock that the runs inherit).

Cluster modes: hand each pending point to the cluster's scheduler, then return (they do
not wait for the jobs; rerun the same command later to learn how they ended).
  --mode=slurm [--partition=P] [--nodes=N] [--gpus_per_node=G] [--time=T] [--dry-run]
      one `sbatch --array=I,J,...` of the points not finished, I the point's index in the
      manifest; the array script ROOT/slurm/array_<k>.sh (a new k per submission, never
      overwritten) carries launch/slurm_gpu.sh's #SBATCH defaults, and its task I runs
      `bash launch/slurm_gpu.sh --config=... --workdir=ROOT/<name> --config.K=V ...` (its
      srun path: one process per node, N nodes per point, default 1), output in
      ROOT/slurm/sweep-<basename of ROOT>-<job>_<task>.out. Submit from a login node, ROOT
      on the shared filesystem; PYTHON passes to slurm_gpu.sh through the environment.
  --mode=tpu_vm --zone=Z --accelerator=TYPE --name_prefix=P [--bucket=B] [--project=X]
      [--tpu_root=DIR] [--spot] [--queued] [--dry-run]
      one `launch/tpu_vm.sh --name=P-I ... --workdir=TPU_ROOT/<name>` per pending point,
      started in the background in its own session (its gcloud lines in
      ROOT/<name>.tpu_vm.log, the run's output in ROOT/<name>.log); each creates its slice,
      runs the point and deletes the slice. TPU_ROOT (default ROOT, absolute) is where the
      workers see ROOT: ROOT must be the same storage here (e.g. --bucket=B, ROOT=/mnt/B/x
      with gs://B mounted at /mnt/B on this host too), or the rerun cannot see the runs.
      Every launcher's own checks (its --dry-run) pass before the first one starts.
  --dry-run prints the exact sbatch command line and array script, or each point's
  launch/tpu_vm.sh command and its gcloud lines, and submits and writes nothing.
A submitted point is `submitted` in the manifest, with its job (SLURM job_task id, or TPU
VM name and launcher pid). Status is learned on the rerun from the run directory: a point
is finished when the last step in ROOT/<name>/metrics.jsonl reaches the step its
config.json says a finished run logs last (train.steps; a loop's own last step, as
rlhf_jax.analysis.compare decides); in these modes that also holds for a point never
submitted, so a run finished by other means is not submitted again. A SLURM point not
finished that `squeue` still lists stays submitted; one that ended unfinished is submitted
again and resumes from its newest checkpoint. TPU VM launchers hold ROOT's lock while they
run, so a rerun before they all ended is refused. A config that gives no length (the
pipeline loop) never counts as finished here, so it is submitted again (and resumes). The
last stdout line is {"runs": N, "submitted": s, "finished": k, "queued": q} (q: still held
by SLURM). --mode=local refuses a ROOT with points still queued on SLURM.

Every override is checked against the config before anything runs (unknown field, a value
of the wrong type, a point the config validation rejects): bad input ends with one line
`error: ...` on stderr and exit status 2. A run that fails is recorded and the sweep goes
on; the sweep then exits 1 naming it. The last stdout line is a JSON summary,
{"runs": N, "finished": k, "failed": f, "skipped": s}, where finished counts every run
finished at the end (those skipped as finished on entry included).
"""
import argparse
import ast
import copy
import dataclasses
import difflib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Config files import rlhf_jax; `python launch/sweep.py` puts launch/, not the root, on the path.
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import ml_collections  # noqa: E402

MANIFEST = 'manifest.json'
STATUSES = ('pending', 'running', 'finished', 'failed', 'submitted')
_KEY = re.compile(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$')
_NAME_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]')
_MAX_NAME = 180  # well under the 255 bytes a file name may take, with '.log' appended


class SweepError(Exception):
  """Bad input: reported as one `error:` line, exit status 2, before any run starts."""


class Interrupted(Exception):
  """SIGINT or SIGTERM while a run was going."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep: its directory name under ROOT and its typed overrides."""
  name: str
  overrides: dict


# --- Parsing the command line --------------------------------------------------------------

def _split_top_level(text: str, *, sep: str = ',') -> list[str]:
  """Splits at `sep` outside quotes and brackets, so '(1, 2)' and "'a,b'" stay whole."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return parts


def parse_value(*, text: str):
  """A Python literal, else the bare text as a string (as ml_collections' literal parser)."""
  text = text.strip()
  if text in ('true', 'false'):  # absl spells booleans in lower case
    return text == 'true'
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def _split_key(*, spec: str, flag: str) -> tuple[str, str]:
  key, eq, rest = spec.partition('=')
  key = key.strip()
  if not eq:
    raise SweepError(f"{flag} {spec!r} has no '=': write {flag} KEY=...")
  if not _KEY.match(key):
    raise SweepError(f'{flag} {spec!r}: {key!r} is not a dotted config key')
  return key, rest


def parse_sweep(*, spec: str) -> tuple[str, list]:
  """'optim.lr=[1e-3,3e-3]' -> ('optim.lr', [0.001, 0.003])."""
  key, rest = _split_key(spec=spec, flag='--sweep')
  rest = rest.strip()
  if not (rest.startswith('[') and rest.endswith(']')):
    raise SweepError(f"--sweep {spec!r}: the values must be a bracketed list, "
                     f"e.g. {key}=[1,2]")
  inner = rest[1:-1]
  if not inner.strip():
    raise SweepError(f'--sweep {spec!r}: the list of values is empty')
  values = [parse_value(text=item) for item in _split_top_level(inner)]
  if any(isinstance(v, str) and not v for v in values):
    raise SweepError(f'--sweep {spec!r}: an empty value (a stray comma?)')
  return key, values


def parse_set(*, spec: str) -> tuple[str, object]:
  key, rest = _split_key(spec=spec, flag='--set')
  return key, parse_value(text=rest)


def parse_list_point(*, spec: str) -> dict:
  """'optim.lr=1e-3,seed=0' -> {'optim.lr': 0.001, 'seed': 0}. A comma starts a new pair
  only where KEY= follows, so a tuple or a quoted string may hold commas."""
  point = {}
  for pair in re.split(r',(?=\s*[A-Za-z_][\w.]*\s*=)', spec):
    if not pair.strip():
      raise SweepError(f'--list {spec!r}: an empty KEY=VALUE pair')
    key, rest = _split_key(spec=pair, flag='--list')
    if key in point:
      raise SweepError(f'--list {spec!r} sets {key} twice')
    point[key] = parse_value(text=rest)
  return point


# --- The config and its fields --------------------------------------------------------------

def display_path(*, path: str) -> str:
  """Relative to the repository root when under it (commands run there and stay short and
  portable to a pod's checkout), else absolute."""
  path = os.path.abspath(path)
  rel = os.path.relpath(path, REPO)
  return path if rel == '..' or rel.startswith('..' + os.sep) else rel


def load_config(*, spec: str) -> tuple[str, ml_collections.ConfigDict]:
  """Loads FILE[:variant] as ml_collections' config_flags does (everything after the first
  colon goes to get_config). Returns the spec with FILE as the commands will name it."""
  path, colon, variant = spec.partition(':')
  if not path:
    raise SweepError(f'--config={spec!r} names no file')
  if not os.path.isfile(path):
    raise SweepError(f'config file {path} does not exist')
  try:
    from rlhf_jax.config import load_file
    config = load_file(path, variant if colon else None)
  except Exception as e:  # the config file's own error, e.g. an unknown variant
    raise SweepError(f'cannot load --config={spec}: {_one_line(e)}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise SweepError(f'--config={spec}: get_config() did not return a ConfigDict')
  return display_path(path=path) + colon + variant, config


def _one_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def _holder(*, config: ml_collections.ConfigDict, key: str, where: str):
  """The ConfigDict holding `key`'s last component; a clear error for a key not there."""
  node, parts = config, key.split('.')
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      block = '.'.join(parts[:depth])
      if not isinstance(node, ml_collections.ConfigDict):
        raise SweepError(f'{key} is not a field of {where}: {block} is a leaf')
      close = difflib.get_close_matches(part, list(node.keys()), n=1)
      hint = f" (did you mean {'.'.join(parts[:depth] + close)}?)" if close else ''
      raise SweepError(f'{key} is not a field of {where}{hint}')
    if depth < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def typed_value(*, config: ml_collections.ConfigDict, key: str, value, where: str):
  """`value` as the field's type, or a SweepError where the CLI's flag parser (or
  ConfigDict's type safety) would refuse it: an int field takes no 1.5, a float field takes
  an int, a bool field only True/False."""
  holder, field = _holder(config=config, key=key, where=where)
  kind = holder.get_type(field)
  if isinstance(kind, type) and issubclass(kind, ml_collections.ConfigDict):
    raise SweepError(f'{key} is a block of {where}, not a field: name one of its fields')

  def wrong():
    return SweepError(f'{key}={value!r}: the field is of type {kind.__name__} '
                      f'(default {holder[field]!r}), not {type(value).__name__}')
  # bool is an int in Python, but the CLI parses an int or float field's 'True' as an error.
  if kind is bool:
    if not isinstance(value, bool):
      raise wrong()
    return value
  if isinstance(value, bool):
    raise wrong()
  if kind is int:
    if not isinstance(value, int):
      raise wrong()
    return value
  if kind is float:
    if not isinstance(value, (int, float)):
      raise wrong()
    return float(value)
  if kind is str:
    if not isinstance(value, str):
      raise SweepError(f'{key}={value!r}: the field is a string; quote the value '
                       f"('{value}')")
    return value
  if kind is tuple:
    if not isinstance(value, (tuple, list)):
      raise wrong()
    return tuple(value)
  raise SweepError(f'{key} (type {kind.__name__}) cannot be overridden from the command line')


def check_point(*, config: ml_collections.ConfigDict, overrides: dict, where: str,
                label: str) -> None:
  """Applies the overrides to a copy and runs the checks the CLI makes before any compute,
  so a point it would refuse stops the sweep before the first run, not mid-way."""
  point = copy.deepcopy(config)
  for key, value in overrides.items():
    holder, field = _holder(config=point, key=key, where=where)
    try:
      holder[field] = value
    except (TypeError, ValueError) as e:
      raise SweepError(f'{label}: {key}={value!r}: {_one_line(e)}') from None
  try:
    from rlhf_jax import config as config_lib
    from rlhf_jax.errors import UserError
  except ImportError:  # only the CLI's own checks then; it reports them per run
    return
  try:
    config_lib.validate(point)
  except UserError as e:
    raise SweepError(f'{label}: {e}') from None
  except Exception:  # a config validate() does not understand: the CLI will say
    pass


# --- Points and names -----------------------------------------------------------------------

def grid(*, sweeps: list[tuple[str, list]]) -> list[dict]:
  keys = [key for key, _ in sweeps]
  return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in sweeps))]


def _value_text(value) -> str:
  if isinstance(value, float):
    return repr(value)  # 0.001, 1e-05: short and exact
  if isinstance(value, (tuple, list)):
    return '_'.join(_value_text(v) for v in value)
  return str(value)


def _canonical(overrides: dict) -> str:
  return json.dumps(overrides, sort_keys=True)


def run_names(*, points: list[dict]) -> list[str]:
  """Readable, filesystem-safe and unique names: lr_0.001-seed_0. A name that sanitising
  or shortening makes ambiguous gets a hash of the point's overrides (stable across
  reruns, so a rerun finds the same directories)."""
  keys = list(dict.fromkeys(k for point in points for k in point))
  last = [k.rsplit('.', 1)[-1] for k in keys]
  short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
  names = []
  for point in points:
    name = '-'.join(f'{short[k]}_{_value_text(v)}' for k, v in point.items())
    names.append(_NAME_UNSAFE.sub('_', name))
  clashes = {n for n in names if names.count(n) > 1}
  for i, point in enumerate(points):
    if names[i] in clashes or len(names[i]) > _MAX_NAME:
      digest = hashlib.sha1(_canonical(point).encode()).hexdigest()[:8]
      names[i] = f'{names[i][:_MAX_NAME - 9]}-{digest}'
  return names


def render(*, value) -> str:
  """A value as the CLI's flag parsers read it back."""
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, tuple):
    return repr(value)
  return str(value)


def command(*, python: str, config_spec: str, workdir: str, overrides: dict) -> list[str]:
  return [python, '-m', 'rlhf_jax.main', f'--config={config_spec}', f'--workdir={workdir}',
          *(f'--config.{k}={render(value=v)}' for k, v in overrides.items())]


# --- The manifest ---------------------------------------------------------------------------

def _jsonable(x):
  return json.loads(json.dumps(x))  # tuples become lists, as they are in the file


def read_manifest(*, root: str) -> dict | None:
  path = os.path.join(root, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
    for run in manifest['runs']:
      if run['status'] not in STATUSES:
        raise ValueError(f"unknown status {run['status']!r}")
    return manifest
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SweepError(f'{path} is unreadable ({_one_line(e)}); use another --root') from None


def write_manifest(*, root: str, manifest: dict) -> None:
  """Atomically: a sweep killed at any moment leaves the old or the new file, whole."""
  path = os.path.join(root, MANIFEST)
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)


def new_manifest(*, config_spec: str, root: str, sets: dict, points: list[Point],
                 python: str) -> dict:
  runs = []
  for point in points:
    workdir = os.path.join(display_path(path=root), point.name)
    runs.append(dict(name=point.name, workdir=point.name, overrides=_jsonable(point.overrides),
                     status='pending', returncode=None,
                     command=command(python=python, config_spec=config_spec, workdir=workdir,
                                     overrides={**sets, **point.overrides})))
  return dict(config=config_spec, root=display_path(path=root), sets=_jsonable(sets), runs=runs)


def merge_manifest(*, old: dict, new: dict, root: str) -> dict:
  """The new manifest with the old runs' statuses, or a SweepError if the old one
  describes another sweep (which this one would mix with or overwrite)."""
  differs = None
  if old.get('config') != new['config']:
    differs = f"config {old.get('config')!r}, not {new['config']!r}"
  elif old.get('sets') != new['sets']:
    before = old.get('sets') or {}
    keys = sorted(k for k in set(before) | set(new['sets'])
                  if before.get(k, ...) != new['sets'].get(k, ...))
    differs = f"other --set values at {', '.join(keys)}"
  elif ({_canonical(r['overrides']) for r in old['runs']} !=
        {_canonical(r['overrides']) for r in new['runs']}):
    differs = 'a different set of points'
  if differs:
    raise SweepError(f'{os.path.join(root, MANIFEST)} holds another sweep ({differs}); '
                     'use another --root')
  status = {_canonical(r['overrides']): r for r in old['runs']}
  for run in new['runs']:
    before = status[_canonical(run['overrides'])]
    run['status'], run['returncode'] = before['status'], before.get('returncode')
    if 'job' in before:  # where a scheduler was given it: the rerun asks it
      run['job'] = before['job']
  return new


# --- Running --------------------------------------------------------------------------------

def _lock(root: str) -> int:
  """An exclusive lock on ROOT for this sweep and its runs (they inherit it): a second
  sweep on the same ROOT, or a rerun while an orphaned run still writes, is refused."""
  fd = os.open(os.path.join(root, '.sweep.lock'), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise SweepError(f'another sweep (or a run it started) is still running on {root}; '
                     'wait for it or stop it') from None
  return fd


def _raise_interrupted(signum, frame):
  raise Interrupted(signal.Signals(signum).name)


def _last_error(log_path: str) -> str:
  """The failed run's `error:` line (the CLI's contract), else its last line."""
  try:
    with open(log_path, errors='replace') as f:
      lines = [l.strip() for l in f.readlines()[-200:] if l.strip()]
  except OSError:
    return ''
  errors = [l for l in lines if l.startswith('error:')]
  return (errors or lines or [''])[-1][:300]


def run_one(*, run: dict, root: str, lock_fd: int) -> int:
  """Runs one point's command from the repository root, its output appended to
  ROOT/<name>.log. Returns its exit status."""
  log_path = os.path.join(root, run['name'] + '.log')
  with open(log_path, 'a') as log:
    log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(run['command'])}\n")
    log.flush()
    proc = subprocess.Popen(run['command'], cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, pass_fds=(lock_fd,))
    try:
      return proc.wait()
    except (KeyboardInterrupt, Interrupted):
      # A terminal's Ctrl-C reaches the run too, a `kill` of the sweep alone does not; the
      # CLI stops cleanly on SIGINT and the rerun resumes it.
      proc.send_signal(signal.SIGINT)
      proc.wait()
      raise


def run_all(*, manifest: dict, root: str, lock_fd: int, counts: dict) -> None:
  """Runs the points not finished yet, in order, counting into `counts` as it goes (so an
  interrupted sweep can still report)."""
  runs, n = manifest['runs'], len(manifest['runs'])
  width = len(str(n))
  for i, run in enumerate(runs, 1):
    tag = f'[{i:>{width}}/{n}] {run["name"]}'
    if run['status'] == 'finished' and os.path.isdir(os.path.join(root, run['workdir'])):
      counts['skipped'] += 1
      counts['finished'] += 1
      print(f'{tag}: skipped (finished earlier)', flush=True)
      continue
    run['status'], run['returncode'] = 'running', None
    write_manifest(root=root, manifest=manifest)
    start = time.time()
    try:
      rc = run_one(run=run, root=root, lock_fd=lock_fd)
    except (KeyboardInterrupt, Interrupted):
      run['status'] = 'pending'  # not failed: the rerun resumes it from its checkpoint
      write_manifest(root=root, manifest=manifest)
      print(f'{tag}: interrupted', flush=True)
      raise
    run['status'], run['returncode'] = ('finished' if rc == 0 else 'failed'), rc
    write_manifest(root=root, manifest=manifest)
    took = f'{time.time() - start:.1f} s'
    if rc == 0:
      counts['finished'] += 1
      print(f'{tag}: finished ({took})', flush=True)
    else:
      counts['failed'] += 1
      reason = _last_error(os.path.join(root, run['name'] + '.log'))
      print(f'{tag}: failed (exit {rc}, {took}){": " + reason if reason else ""}', flush=True)


# --- The cluster modes: a SLURM job array, one TPU VM per point -----------------------------

_TPU_NAME = re.compile(r'[a-z]([-a-z0-9]*[a-z0-9])?$')
_SLURM_WORD = re.compile(r'[A-Za-z0-9_.:,+-]+$')


def cluster_options(*, args: argparse.Namespace) -> None:
  """The options of --mode=slurm / tpu_vm, checked before anything is written or submitted."""
  slurm = dict(partition=args.partition, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
               time=args.time)
  tpu = dict(zone=args.zone, accelerator=args.accelerator, name_prefix=args.name_prefix,
             bucket=args.bucket, project=args.project, tpu_root=args.tpu_root,
             spot=args.spot or None, queued=args.queued or None)
  for mode, options in (('slurm', slurm), ('tpu_vm', tpu)):
    given = [k for k, v in options.items() if v is not None]
    if args.mode != mode and given:
      raise SweepError(f'--{given[0]} is an option of --mode={mode}, not --mode={args.mode}')
  if args.dry_run and args.mode not in ('slurm', 'tpu_vm'):
    raise SweepError(f'--dry-run is for --mode=slurm or tpu_vm (--mode={args.mode} '
                     'prints nothing to submit; --mode=print prints the commands)')
  if args.mode == 'slurm':
    for key in ('nodes', 'gpus_per_node'):
      value = getattr(args, key)
      if value is not None and (not value.isdigit() or int(value) < 1):
        raise SweepError(f'--{key}={value}: give a positive whole number')
    for key in ('partition', 'time'):
      value = getattr(args, key)
      if value is not None and not _SLURM_WORD.match(value):
        raise SweepError(f'--{key}={value!r}: not a SLURM {key}')
  if args.mode == 'tpu_vm':
    for key in ('zone', 'accelerator', 'name_prefix'):
      if not getattr(args, key):
        raise SweepError(f'--mode=tpu_vm needs --{key}')
    if not _TPU_NAME.match(args.name_prefix) or len(args.name_prefix) > 50:
      raise SweepError(f'--name_prefix={args.name_prefix}: use at most 50 lower-case letters, '
                       'digits and hyphens, starting with a letter')
    if args.tpu_root is not None and not os.path.isabs(args.tpu_root):
      raise SweepError(f'--tpu_root={args.tpu_root}: give the absolute path the TPU workers '
                       'see the root as (e.g. /mnt/BUCKET/sweeps/x)')


def run_finished(*, workdir: str) -> bool:
  """Whether the run directory holds a finished run: its last logged step (metrics.jsonl)
  reaches the step its config.json says a finished run logs last (train.steps, or the
  loop's own last step: stages/dispatch.last_logged_step, as rlhf_jax.analysis.compare
  decides). A config that gives no length never counts as finished here: such a point is
  submitted again (and resumes)."""
  if not all(os.path.isfile(os.path.join(workdir, name))
             for name in ('config.json', 'metrics.jsonl')):
    return False
  from rlhf_jax.analysis import compare  # late: it imports jax
  from rlhf_jax.errors import UserError
  try:
    run = compare.load_run(path=workdir)
  except UserError:  # an unreadable config.json or metrics.jsonl: not finished
    return False
  expected = compare.expected_last_step(config=run.config)
  return bool(run.rows) and expected is not None and run.last_step >= expected


def _slurm_queued(*, job_ids: set[str]) -> set[str]:
  """Of the array jobs `job_ids`, the tasks ('JOB_TASK') SLURM still holds, pending or
  running. One squeue per job: squeue fails as a whole on a job id it forgot."""
  held = set()
  for job in sorted(job_ids):
    argv = ['squeue', '--noheader', '--array', f'--jobs={job}', '--format=%A_%a']
    try:
      out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise SweepError(f'cannot ask SLURM which submitted points still run '
                       f'({shlex.join(argv)}: {_one_line(e)})') from None
    if out.returncode != 0 and 'Invalid job id' not in out.stderr:  # forgotten: it ended
      raise SweepError(f'{shlex.join(argv)} failed: {_one_line(Exception(out.stderr))}')
    held |= {line.strip() for line in out.stdout.splitlines() if line.strip()}
  return held


def refresh_submitted(*, manifest: dict, root: str, every: bool) -> None:
  """Learns the fate of the points handed to a scheduler earlier: finished when the run
  directory says so, still 'submitted' while SLURM holds the job, else pending again (it
  ended unfinished: submitted once more, it resumes from its newest checkpoint). TPU VM
  launchers hold ROOT's lock while they run, so here all of them have ended. With `every`
  (the cluster modes) a point in any other unfinished state whose run directory holds a
  finished run is marked finished too, so it is not submitted again; --mode=local leaves
  those to the CLI, which also rewrites a checkpoint a killed run lost."""
  if every:
    for run in manifest['runs']:
      if (run['status'] in ('pending', 'running', 'failed')
          and run_finished(workdir=os.path.join(root, run['workdir']))):
        run['status'], run['returncode'] = 'finished', None
  submitted = [r for r in manifest['runs'] if r['status'] == 'submitted']
  queued = _slurm_queued(job_ids={r['job']['id'].split('_')[0] for r in submitted
                                  if r.get('job', {}).get('scheduler') == 'slurm'
                                  and not run_finished(workdir=os.path.join(root, r['workdir']))})
  for run in submitted:
    if run_finished(workdir=os.path.join(root, run['workdir'])):
      run['status'] = 'finished'
    elif run.get('job', {}).get('scheduler') == 'slurm' and run['job']['id'] in queued:
      pass
    else:
      run['status'] = 'pending'


def _slurm_header() -> list[str]:
  """slurm_gpu.sh's #SBATCH defaults (nodes, GPUs, CPUs, time), for the array script; the
  job name and output are the sweep's."""
  with open(os.path.join(REPO, 'launch', 'slurm_gpu.sh')) as f:
    return [l.rstrip('\n') for l in f
            if l.startswith('#SBATCH') and not l.startswith(('#SBATCH --job-name',
                                                              '#SBATCH --output'))]


def slurm_submission(*, args, manifest: dict, root: str, todo: list[int]) -> tuple[list, str, str]:
  """(sbatch argv, path of the array script, its text): array task i runs point i's
  command through launch/slurm_gpu.sh (its srun path: one process per node)."""
  shown = display_path(path=root)
  lines = ['#!/usr/bin/env bash', *_slurm_header(),
           f'# launch/sweep.py --mode=slurm on {shown}: array task i runs point i of',
           f'# {shown}/{MANIFEST} through launch/slurm_gpu.sh.',
           'set -euo pipefail', 'cd "$SLURM_SUBMIT_DIR"', 'case $SLURM_ARRAY_TASK_ID in']
  for i in todo:
    run = manifest['runs'][i]
    lines.append(f'  {i}) exec bash launch/slurm_gpu.sh {shlex.join(run["command"][3:])} ;;')
  lines += ['  *) echo "error: no point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
            'esac', '']
  slurm_dir = os.path.join(root, 'slurm')
  n = 1
  while os.path.exists(os.path.join(slurm_dir, f'array_{n}.sh')):
    n += 1  # never overwrite the script of an earlier submission
  script = os.path.join(slurm_dir, f'array_{n}.sh')
  argv = ['sbatch', '--parsable', f'--job-name=sweep-{os.path.basename(root)}',
          f'--array={",".join(map(str, todo))}', f'--nodes={args.nodes or 1}',
          *([f'--partition={args.partition}'] if args.partition else []),
          *([f'--gpus-per-node={args.gpus_per_node}'] if args.gpus_per_node else []),
          *([f'--time={args.time}'] if args.time else []),
          f'--output={os.path.join(shown, "slurm", "%x-%A_%a.out")}', display_path(path=script)]
  return argv, script, '\n'.join(lines)


def tpu_launches(*, args, manifest: dict, root: str, todo: list[int]) -> list[tuple[int, list]]:
  """(point index, launch/tpu_vm.sh argv) per point: TPU VM NAME_PREFIX-<index>, the run in
  TPU_ROOT/<name> on the workers."""
  remote = args.tpu_root or os.path.abspath(root)
  out = []
  for i in todo:
    run = manifest['runs'][i]
    argv = ['bash', 'launch/tpu_vm.sh', f'--name={args.name_prefix}-{i}', f'--zone={args.zone}',
            f'--accelerator={args.accelerator}',
            *([f'--project={args.project}'] if args.project else []),
            *([f'--bucket={args.bucket}'] if args.bucket else []),
            *(['--spot'] if args.spot else []), *(['--queued'] if args.queued else []),
            run['command'][3], f'--workdir={os.path.join(remote, run["workdir"])}',
            f'--log={os.path.join(root, run["name"] + ".log")}',
            *(['--'] + run['command'][5:] if run['command'][5:] else [])]
    out.append((i, argv))
  return out


def _tpu_dry_run(*, argv: list) -> list[str]:
  """The '+ ' lines of the launcher's dry run, or its usage error as a SweepError."""
  out = subprocess.run([*argv, '--dry-run'] if '--' not in argv else
                       [*argv[:argv.index('--')], '--dry-run', *argv[argv.index('--'):]],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  if out.returncode != 0:
    errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
    raise SweepError(f"{argv[2].split('=', 1)[1]}: launch/tpu_vm.sh refuses it: "
                     f"{(errors or [out.stderr.strip() or 'exit ' + str(out.returncode)])[0]}"
                     .replace('error: ', ''))
  return [l for l in out.stdout.splitlines() if l.startswith('+ ')]


def submit(*, args, manifest: dict, root: str, lock_fd: int | None) -> dict:
  """Hands every point not finished and not still queued to the scheduler and returns at
  once. With --dry-run prints what it would run and writes nothing."""
  runs = manifest['runs']
  todo = [i for i, r in enumerate(runs) if r['status'] not in ('finished', 'submitted')]
  counts = dict(runs=len(runs), submitted=len(todo),
                finished=sum(r['status'] == 'finished' for r in runs),
                queued=sum(r['status'] == 'submitted' for r in runs))
  if not todo:
    return counts
  if args.mode == 'slurm':
    argv, script, text = slurm_submission(args=args, manifest=manifest, root=root, todo=todo)
    if args.dry_run:
      print(f'+ {shlex.join(argv)}')
      print(f'# {display_path(path=script)}:')
      print(text, end='')
      return counts
    os.makedirs(os.path.dirname(script), exist_ok=True)
    with open(script, 'x') as f:
      f.write(text)
    try:
      out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    except OSError as e:
      raise SweepError(f'cannot run sbatch ({e.strerror or e})') from None
    job = out.stdout.strip().split(';')[0]
    if out.returncode != 0 or not job.isdigit():
      said = _one_line(Exception(out.stderr or out.stdout))
      raise SweepError(f'sbatch refused the array: {said}')
    for i in todo:
      runs[i].update(status='submitted', returncode=None,
                     job=dict(scheduler='slurm', id=f'{job}_{i}', script=display_path(path=script)))
    write_manifest(root=root, manifest=manifest)
    print(f'submitted SLURM array job {job}: tasks {",".join(map(str, todo))}', flush=True)
    return counts
  launches = tpu_launches(args=args, manifest=manifest, root=root, todo=todo)
  printed = [(i, argv, _tpu_dry_run(argv=argv)) for i, argv in launches]  # every check first
  if args.dry_run:
    for i, argv, lines in printed:
      print(f'# {runs[i]["name"]}: {shlex.join(argv)}')
      print('\n'.join(lines))
    return counts
  for i, argv, _ in printed:
    log = open(os.path.join(root, runs[i]['name'] + '.tpu_vm.log'), 'a')
    # Its own session, so the sweep returns and a Ctrl-C here does not reach it; it holds
    # ROOT's lock until the slice is deleted.
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, pass_fds=(lock_fd,),
                            start_new_session=True)
    log.close()
    runs[i].update(status='submitted', returncode=None,
                   job=dict(scheduler='tpu_vm', name=argv[2].split('=', 1)[1], pid=proc.pid))
    write_manifest(root=root, manifest=manifest)
    print(f'submitted {runs[i]["name"]}: TPU VM {runs[i]["job"]["name"]} '
          f'(launch/tpu_vm.sh pid {proc.pid})', flush=True)
  return counts


# --- Entry point ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one `error:` line, as the project's CLI, not argparse's usage
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def _flags() -> argparse.ArgumentParser:
  p = _Parser(prog='launch/sweep.py', allow_abbrev=False, description=__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', help='config file[:variant], as for rlhf_jax.main')
  p.add_argument('--root', help='directory of the sweep: ROOT/<name> per point, manifest.json')
  p.add_argument('--sweep', action='append', default=[], metavar='KEY=[V,...]',
                 help='a grid axis (repeatable)')
  p.add_argument('--list', action='append', default=[], metavar='K=V,K=V',
                 help='one point (repeatable; instead of --sweep)')
  p.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE',
                 help='an override of every point (repeatable)')
  p.add_argument('--mode', choices=('local', 'print', 'slurm', 'tpu_vm'), default='local',
                 help='local: run the points here, one after another; print: print their '
                 'commands; slurm: submit a job array; tpu_vm: one TPU VM per point')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                 help='slurm, tpu_vm: print the sbatch / gcloud commands, submit nothing')
  slurm = p.add_argument_group('--mode=slurm (passed to sbatch)')
  slurm.add_argument('--partition')
  slurm.add_argument('--nodes', help='nodes per point (default 1)')
  slurm.add_argument('--gpus_per_node')
  slurm.add_argument('--time')
  tpu = p.add_argument_group('--mode=tpu_vm (passed to launch/tpu_vm.sh)')
  tpu.add_argument('--zone')
  tpu.add_argument('--accelerator', help='e.g. v4-32, the slice of every point')
  tpu.add_argument('--name_prefix', help='TPU VM of point i: NAME_PREFIX-i')
  tpu.add_argument('--bucket')
  tpu.add_argument('--project')
  tpu.add_argument('--tpu_root', help='where the workers see ROOT (default: ROOT, absolute)')
  tpu.add_argument('--spot', action='store_true')
  tpu.add_argument('--queued', action='store_true')
  return p


def plan(*, args: argparse.Namespace) -> tuple[str, dict, list[Point]]:
  """Every check on the input, before anything is written or run: (config spec, typed
  shared overrides, points)."""
  if not args.config:
    raise SweepError('--config is required')
  if not args.root:
    raise SweepError('--root is required')
  if args.sweep and args.list:
    raise SweepError('give either --sweep (a grid) or --list (points), not both')
  if not args.sweep and not args.list:
    raise SweepError('give at least one --sweep KEY=[...] or --list K=V,...')
  if os.path.exists(args.root) and not os.path.isdir(args.root):
    raise SweepError(f'--root {args.root} exists and is not a directory')
  config_spec, config = load_config(spec=args.config)
  where = config_spec

  sets = {}
  for spec in args.sets:
    key, value = parse_set(spec=spec)
    if key in sets:
      raise SweepError(f'--set {key} is given twice')
    sets[key] = typed_value(config=config, key=key, value=value, where=where)

  if args.sweep:
    sweeps, seen = [], set()
    for spec in args.sweep:
      key, values = parse_sweep(spec=spec)
      if key in seen or key in sets:
        raise SweepError(f'{key} is given twice (in --sweep or --set)')
      seen.add(key)
      typed = [typed_value(config=config, key=key, value=v, where=where) for v in values]
      if len({json.dumps(_jsonable(v)) for v in typed}) < len(typed):
        raise SweepError(f'--sweep {spec!r} lists a value twice')
      sweeps.append((key, typed))
    raw_points = grid(sweeps=sweeps)
  else:
    raw_points = []
    for spec in args.list:
      point = parse_list_point(spec=spec)
      for key in point:
        if key in sets:
          raise SweepError(f'{key} is given in both --list and --set')
      raw_points.append({k: typed_value(config=config, key=k, value=v, where=where)
                         for k, v in point.items()})
    if len({_canonical(_jsonable(p)) for p in raw_points}) < len(raw_points):
      raise SweepError('a --list point is given twice')

  points = [Point(name=name, overrides=p)
            for name, p in zip(run_names(points=raw_points), raw_points)]
  for point in points:
    check_point(config=config, overrides={**sets, **point.overrides}, where=where,
                label=f'point {point.name}')
  return config_spec, sets, points


def main(*, argv: list[str] | None = None) -> int:
  args = _flags().parse_args(argv)
  try:
    cluster_options(args=args)
    config_spec, sets, points = plan(args=args)
    if args.mode == 'print':
      for point in points:
        workdir = os.path.join(display_path(path=args.root), point.name)
        print(shlex.join(command(python='python', config_spec=config_spec, workdir=workdir,
                                 overrides={**sets, **point.overrides})))
      return 0
    root = os.path.abspath(args.root)
    manifest = new_manifest(config_spec=config_spec, root=root, sets=sets, points=points,
                            python=sys.executable)
    if args.dry_run:  # reads ROOT, writes nothing
      old = read_manifest(root=root) if os.path.isdir(root) else None
      if old is not None:
        manifest = merge_manifest(old=old, new=manifest, root=root)
      refresh_submitted(manifest=manifest, root=root,
                        every=args.mode in ('slurm', 'tpu_vm'))
      print(json.dumps(submit(args=args, manifest=manifest, root=root, lock_fd=None)),
            flush=True)
      return 0
    try:
      os.makedirs(root, exist_ok=True)
    except OSError as e:
      raise SweepError(f'cannot create --root {args.root} ({e.strerror or e})') from None
    lock_fd = _lock(root)
    old = read_manifest(root=root)
    if old is not None:
      manifest = merge_manifest(old=old, new=manifest, root=root)
    refresh_submitted(manifest=manifest, root=root,
                      every=args.mode in ('slurm', 'tpu_vm'))
    write_manifest(root=root, manifest=manifest)
    if args.mode in ('slurm', 'tpu_vm'):
      try:
        counts = submit(args=args, manifest=manifest, root=root, lock_fd=lock_fd)
      finally:  # TPU VM launchers keep their inherited copy of the lock while they run
        os.close(lock_fd)
      print(json.dumps(counts), flush=True)
      return 0
    queued = [r['name'] for r in manifest['runs'] if r['status'] == 'submitted']
    if queued:
      raise SweepError(f"{len(queued)} points are still queued or running on SLURM "
                       f"({', '.join(queued)}); wait for them or scancel them")
  except SweepError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:
    print(f'error: cannot write to --root {args.root} ({e.strerror or e})', file=sys.stderr)
    return 2

  signal.signal(signal.SIGTERM, _raise_interrupted)
  counts = dict(runs=len(manifest['runs']), finished=0, failed=0, skipped=0)
  try:
    run_all(manifest=manifest, root=root, lock_fd=lock_fd, counts=counts)
  except (KeyboardInterrupt, Interrupted):
    print('error: interrupted; rerun the same command to finish the sweep', file=sys.stderr)
    print(json.dumps(counts), flush=True)
    return 130
  failed = [r for r in manifest['runs'] if r['status'] == 'failed']
  if failed:
    which = ', '.join(f"{r['name']} (exit {r['returncode']})" for r in failed)
    print(f'error: {len(failed)} of {len(manifest["runs"])} runs failed: {which}; '
          f'their output is in {display_path(path=root)}/<name>.log', file=sys.stderr)
  print(json.dumps(counts), flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
