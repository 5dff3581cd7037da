"""Test session setup: 8 simulated CPU devices for the sharding tests.

XLA reads the flag when JAX initialises its backend, so it must be set before any test
module imports jax. CLI tests run the package in subprocesses with a plain environment
(one device) unless they ask for more.
"""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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


# -- helpers shared by test modules (`from conftest import ...`) ----------------------------

def load_config(name: str = 'pretrain', variant: str = 'tiny'):
  """configs/<name>.py's get_config(variant), loaded by path as absl would."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f'config_{name}',
                                                os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


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
