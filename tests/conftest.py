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
