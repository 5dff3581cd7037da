"""Test session setup: 8 simulated CPU devices for the sharding tests.

XLA reads the flag when JAX initialises its backend, so it must be set before any test
module imports jax. CLI tests run the package in subprocesses with a plain environment
(one device) unless they ask for more.
"""
import os
import shutil
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session, inherited by every CLI subprocess: the
# many tiny runs (and each generation or round of a loop, which builds its jitted steps
# anew) compile the same programs over and over. The key covers the program, the backend,
# the devices and the XLA flags, so a hit is the very executable a fresh compile would give.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import tempfile
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='rlhf_jax_xla_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)

import rlhf_jax  # noqa: E402,F401  (adds the project's XLA flag defaults, as every entry point does)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(devices: int = 1) -> dict:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if devices > 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


@pytest.fixture
def run_cli():
  """Runs `python -m rlhf_jax.main ARGS` from the repo root; returns CompletedProcess."""
  import subprocess

  def run(*args, devices: int = 1, timeout: float = 600):
    return subprocess.run([sys.executable, '-m', 'rlhf_jax.main', *args], cwd=REPO,
                          env=cli_env(devices), capture_output=True, text=True,
                          timeout=timeout)
  return run


def _run_stage(config: str, workdir: str, *overrides: str) -> None:
  import subprocess
  args = [sys.executable, '-m', 'rlhf_jax.main', f'--config={config}', f'--workdir={workdir}',
          '--config.train.progress=False', *overrides]
  result = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]


def shared_dir(tmp_path_factory, name: str, build) -> str:
  """A directory `build(path)` fills once per test session. Under pytest-xdist every worker
  asks for it: the first to take the lock in the session's common temp root builds it, the
  others wait there and reuse it (a build that failed part-way is started over)."""
  import filelock
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    path = tmp_path_factory.mktemp(name)
    build(path)
    return str(path)
  common = tmp_path_factory.getbasetemp().parent
  path = common / name
  with filelock.FileLock(str(common / f'{name}.lock')):
    if not (path / '.built').exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      build(path)
      (path / '.built').write_text('done\n')
  return str(path)


@pytest.fixture(scope='session')
def chain(tmp_path_factory):
  """Pretrain and SFT runs (tiny, defaults) that the later stages start from, made once
  per test session."""
  def build(root):
    _run_stage('configs/pretrain.py:tiny', str(root / 'pretrain'))
    _run_stage('configs/sft.py:tiny', str(root / 'sft'),
               f'--config.init.run={root / "pretrain"}')
  root = shared_dir(tmp_path_factory, 'chain', build)
  return {name: os.path.join(root, name) for name in ('pretrain', 'sft')}


@pytest.fixture(scope='session')
def reward_run(chain, tmp_path_factory):
  """A tiny reward model (defaults, 150 steps) on the chain's SFT run."""
  def build(root):
    _run_stage('configs/reward_model.py:tiny', str(root / 'rm'),
               f'--config.init.run={chain["sft"]}', '--config.train.steps=150')
  return os.path.join(shared_dir(tmp_path_factory, 'rm', build), 'rm')


@pytest.fixture(scope='session')
def task_warm_start(chain, tmp_path_factory):
  """sft.py:task_tiny as configured (300 steps, eval 128 x 8) from the chain's
  pretraining run: the README's warm start for RL against a verifier, which learns the
  task abruptly and stops part-way on purpose (so its eval sizes stay the config's: the
  eval problems are held out of its demonstrations, and a few rows more or less move the
  step where it learns the task). Shared by the GRPO stage and self-improvement tests."""
  def build(root):  # evaluated at the end only: the same params, two evals fewer
    _run_stage('configs/sft.py:task_tiny', str(root / 'sft'),
               f'--config.init.run={chain["pretrain"]}', '--config.train.eval_every=300')
  return os.path.join(shared_dir(tmp_path_factory, 'task_warm_start', build), 'sft')


# Fixtures that train real runs (of any test module): a test that needs one is an
# end-to-end test.
SLOW_FIXTURES = ('chain', 'reward_run', 'task_warm_start', 'finished_run', 'world_lm',
                 'uninterrupted', 'world_run', 'trained', 'ttt_run', 'grid_root', 'reference')


# The longest test files first (summed seconds of one full run on the 2-core machine), so that
# `-n 2 --dist loadfile` ends on short files instead of leaving one worker idle while the
# other runs a long one (pyproject's --no-loadscope-reorder keeps this order; xdist would
# otherwise order files by their number of tests). The first two do not share a slow
# fixture, so neither worker waits for the other's build of the chain.
LONGEST_FILES = ('test_selfplay_loop', 'test_self_improve', 'test_collapse_loop',
                 'test_failed_run_leaves_dir', 'test_ppo_stage', 'test_feedback_stages',
                 'test_preference_stage', 'test_rlhf_rounds', 'test_resume', 'test_configs',
                 'test_cli_errors', 'test_multihost', 'test_collapse_bigram',
                 'test_collapse_theory', 'test_selfplay_units', 'test_feedback_units',
                 'test_sampling', 'test_grpo_stage', 'test_distill_stage', 'test_ppo',
                 'test_sharding')


# Refusal tests that each start the CLI (about 3 s a case): the quick check runs the first
# QUICK_CASES of their cases, the full suite all of them.
QUICK_CASES = {'test_cai.py::test_bad_input_is_one_line': 2,
               'test_cli_errors.py::test_bad_override': 4,
               'test_cli_errors.py::test_attention_kernel_the_backend_lacks': 1,
               'test_selfplay_loop.py::test_bad_input_fails_with_one_line': 2,
               'test_collapse_loop.py::test_bad_fields': 1,
               'test_lora.py::test_bad_lora_settings_are_refused_in_one_line': 1,
               'test_best_of_n.py::test_experiment_bad_input': 1,
               'test_rlhf_rounds.py::test_bad_loop_fields': 1}


# Tests marked `long` (and `slow`): the multi-process twins of stages whose 2-process runs
# take minutes each on the 2-core machine (on the slowest one, ~15 of the suite's minutes
# together). The full suite skips them, saying so; `--long` runs them too. Multi-process
# stays covered there by pretraining with resume, SFT, the reward model, DPO, PPO and the
# pipeline stopped in PPO, collapse, and the HF import on two processes.
LONG_TESTS = ('test_multihost.py::test_rlhf_rounds_on_two_processes_equal_one',
              'test_multihost.py::test_rl_against_a_verifier_on_two_processes_equals_one',
              'test_multihost.py::test_self_improvement_on_two_processes_equals_one',
              'test_multihost.py::test_distill_on_two_processes_equals_one',
              'test_multihost.py::test_selfplay_on_two_processes_equals_one')


def pytest_addoption(parser):
  parser.addoption('--long', action='store_true',
                   help='also run the tests marked long (conftest.py LONG_TESTS)')


def pytest_collection_modifyitems(config, items):
  """Marks `slow` every test that uses a fixture of SLOW_FIXTURES (the chain alone takes
  minutes) and the cases of QUICK_CASES past their count, besides the tests marked by
  hand, so that the quick check (-m 'not slow') never starts the chain; marks LONG_TESTS
  `long` and skips them without --long; and puts the
  LONGEST_FILES first, in that order (a stable sort: each file's tests keep theirs)."""
  seen = {}
  skip_long = pytest.mark.skip(reason='long: run with --long (conftest.py LONG_TESTS)')
  for item in items:
    if f'{item.path.name}::{item.originalname}' in LONG_TESTS:
      item.add_marker(pytest.mark.long)
      item.add_marker(pytest.mark.slow)
      if not config.getoption('--long'):
        item.add_marker(skip_long)
    if any(name in getattr(item, 'fixturenames', ()) for name in SLOW_FIXTURES):
      item.add_marker(pytest.mark.slow)
    name = f'{item.path.name}::{item.originalname}'
    if name in QUICK_CASES:
      seen[name] = seen.get(name, 0) + 1
      if seen[name] > QUICK_CASES[name]:
        item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


# -- helpers shared by test modules (`from conftest import ...`) ----------------------------

def load_config(name: str = 'pretrain', variant: str = 'tiny'):
  """configs/<name>.py's get_config(variant), loaded by path as absl would."""
  from rlhf_jax.config import load_named
  return load_named(name, variant)


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def read_state(step_dir) -> dict:
  """A checkpoint's train state as host numpy arrays, whatever mesh wrote it."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  path = os.path.join(str(step_dir), 'state')
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
