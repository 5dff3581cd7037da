"""The train step gives the same numbers on any mesh: (8,1,1), (2,2,2), (1,4,2) vs 1 device."""

import jax
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.stages.pretrain import Setup

from conftest import load_config

def small_config(mesh, grad_accum=1):
  config = load_config('pretrain', 'tiny')
  config.model.update(d_model=32, n_heads=4, d_ff=64)
  config.train.update(batch_size=16, seq_len=16)
  config.optim.update(grad_accum=grad_accum, warmup_steps=1)
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return config


def assert_params_close(got, ref):
  """Per tensor, ||got - ref|| <= 1e-5 ||ref||: float32 reductions run in a different order
  on each mesh, and Adam's m / sqrt(v) amplifies that noise in single near-zero entries,
  so an entrywise bound would test rounding, not sharding."""
  got = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(got)))
  for path, r in jax.tree_util.tree_leaves_with_path(jax.device_get(ref)):
    g = got[path]
    assert g.shape == r.shape
    err = np.linalg.norm(np.asarray(g, np.float64) - r) / np.linalg.norm(np.asarray(r, np.float64))
    assert err <= 1e-5, f'{jax.tree_util.keystr(path)}: relative error {err:.2e}'


def run_steps(mesh, devices, tmp_path, steps=3, grad_accum=1):
  setup = Setup(small_config(mesh, grad_accum), workdir=str(tmp_path), devices=devices)
  state, losses = setup.state, []
  with sharding.activate(setup.mesh, setup.config.mesh):
    for _ in range(steps):
      state, metrics = setup.step(state, setup.put_batch(setup.source.next_batch()))
      losses.append(float(metrics['train/loss']))
  return state, np.array(losses)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  assert jax.device_count() == 8, 'conftest sets 8 simulated CPU devices'
  return run_steps((1, 1, 1), jax.devices()[:1], tmp_path_factory.mktemp('ref'))


@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_mesh_matches_single_device(mesh, reference, tmp_path):
  ref_state, ref_losses = reference
  state, losses = run_steps(mesh, jax.devices(), tmp_path)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]  # it trained, so the params below moved
  assert_params_close(state.params, ref_state.params)


@pytest.mark.slow  # over 5 s: left out of the quick check
def test_parameters_are_sharded_not_replicated(tmp_path):
  setup = Setup(small_config((2, 2, 2)), workdir=str(tmp_path), devices=jax.devices())
  up = setup.state.params['layer_0']['mlp']['gate_up']  # logical ('embed', None, 'mlp')
  shard = up.addressable_shards[0].data.shape
  assert shard == (up.shape[0] // 2, 2, up.shape[2] // 2)  # embed over fsdp, mlp over tensor
  mu = setup.state.opt_state[1][0].mu['layer_0']['mlp']['gate_up']
  assert mu.sharding == up.sharding  # optimiser moments live with their parameter


def test_gradient_accumulation_equals_one_big_batch(reference, tmp_path):
  """2 microbatches of 8 rows give the update of one batch of 16 (token-weighted mean)."""
  ref_state, ref_losses = reference
  state, losses = run_steps((2, 2, 2), jax.devices(), tmp_path, grad_accum=2)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_params_close(state.params, ref_state.params)
