"""The PyTorch mirror that `rlhf_jax.bench` times beside our step is the same model: from our
initial parameters it gives our logits (float32, within 1e-4), and a config it cannot
express is named, never timed as a different model. Needs torch (never a dependency):
skipped without it, except the refusal, which is plain Python."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import bench_torch
from rlhf_jax.models.transformer import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48)


def test_unsupported_configs_are_named():
  assert bench_torch.unsupported(CFG) == ''
  why = bench_torch.unsupported(dataclasses.replace(CFG, tie_embeddings=True, n_kv_heads=2))
  assert 'tie_embeddings=True' in why and 'grouped-query' in why
  assert 'mlp=' in bench_torch.unsupported(dataclasses.replace(CFG, mlp='gelu'))


def test_torch_mirror_gives_our_logits():
  torch = pytest.importorskip('torch')
  b, t = 3, 20
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (b, t), 3, CFG.vocab_size))
  model = Transformer(CFG)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = jnp.ones((b, t), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tokens, segment_ids=segments,
                               positions=positions)['params'])
  # Norm scales start at one; random ones check that each lands on its own layer.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1 + 0.3 * jax.random.normal(jax.random.key(len(str(path))), x.shape))
      if 'scale' in str(path) else x, params)
  ours = np.asarray(model.apply({'params': params}, tokens, segment_ids=segments,
                                positions=positions).logits, np.float64)
  mirror = bench_torch.build(CFG, jax.device_get(params))
  with torch.no_grad():
    theirs = mirror(torch.from_numpy(tokens.astype(np.int64))).double().numpy()
  assert np.abs(ours).max() > 0.1
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
