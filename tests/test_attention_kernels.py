"""model.attention's implementations through our Attention layer against a float64 NumPy
reference of causal attention over packed segments, with padding, MHA and GQA.

On CPU: 'xla', 'dot_product_attention', and the Pallas TPU flash kernel ('pallas_flash')
in Pallas' TPU interpret mode; the cuDNN call's masks through the same
jax.nn.dot_product_attention call with implementation='xla'. The kernels themselves:
'cudnn' when a GPU is present, 'pallas_flash' compiled when a TPU is."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from rlhf_jax.models import attention_kernels
from rlhf_jax.models.transformer import Attention, ModelConfig, attention_mask

from attention_reference import SEGMENTS, reference

def layer(attention: str, heads: int, kv_heads: int, dtype: str = 'float32'):
  """Our Attention layer (learned positions: no rotary, so the reference needs only the
  projections) and random params for it."""
  cfg = ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=heads, n_kv_heads=kv_heads,
                    head_dim_override=8, d_ff=8, attention=attention, positions='learned',
                    dtype=dtype)
  module = Attention(cfg)
  x = jnp.zeros((1, 4, 16))
  # Only the parameter shapes are wanted, and they do not depend on the attention.
  params = jax.eval_shape(Attention(dataclasses.replace(cfg, attention='xla')).init,
                          jax.random.key(0), x, attention_mask(jnp.ones((1, 4), jnp.int32)),
                          None)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.5, p.dtype),
                        nn.meta.unbox(params['params']))
  return cfg, module, params


def layer_reference(params, x, segments, head_dim):
  w = {n: np.asarray(params[n], np.float64) for n in ('query', 'key', 'value', 'out')}
  x = np.asarray(x, np.float64)
  q, k, v = (np.einsum('btd,dhk->bthk', x, w[n]) for n in ('query', 'key', 'value'))
  att = reference(q * head_dim ** -0.5, k, v, segments)
  return np.einsum('bthk,hkd->btd', att, w['out'])


def run_layer(attention, heads, kv_heads, segments, interpret=False):
  cfg, module, params = layer(attention, heads, kv_heads)
  x = jnp.asarray(np.random.default_rng(1).normal(size=segments.shape + (16,)), jnp.float32)
  seg = jnp.asarray(segments)
  mask = seg if attention in attention_kernels.KERNELS else attention_mask(seg)
  apply = jax.jit(lambda p, x: module.apply({'params': p}, x, mask, None))
  if interpret:
    with pltpu.force_tpu_interpret_mode():
      got = apply(params, x)
  else:
    got = apply(params, x)
  return np.asarray(got), layer_reference(params, x, segments, cfg.head_dim)


def check(got, want, segments):
  assert np.isfinite(got).all()  # padding rows too
  real = segments > 0
  np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('heads, kv_heads', [(2, 2), (4, 2), (4, 1)], ids=['mha', 'gqa', 'mqa'])
@pytest.mark.parametrize('attention', ['xla', 'dot_product_attention', 'pallas_flash'])
def test_layer_matches_reference(attention, heads, kv_heads):
  got, want = run_layer(attention, heads, kv_heads, SEGMENTS,
                        interpret=attention == 'pallas_flash')
  check(got, want, SEGMENTS)


@pytest.mark.parametrize('kv_heads', [3, 1])
def test_cudnn_call_masks(kv_heads):
  """The arguments the 'cudnn' path passes (is_causal plus the segment mask, an odd length
  padded to even), run by XLA: the same numbers as the reference."""
  rng = np.random.default_rng(2)
  q = rng.normal(size=(3, 20, 3, 8)).astype(np.float32)
  k, v = (rng.normal(size=(3, 20, kv_heads, 8)).astype(np.float32) for _ in range(2))
  seg = SEGMENTS[:, :19]  # odd length: the padded path
  got = np.asarray(attention_kernels.cudnn_attention(
      q[:, :19], k[:, :19], v[:, :19], segment_ids=jnp.asarray(seg), implementation='xla'))
  check(got, reference(q[:, :19], k[:, :19], v[:, :19], seg), seg)


@pytest.mark.slow  # the interpreted kernel over 2 x 2 tiles, forward and backward
def test_pallas_flash_long_rows_and_gradient():
  """Past one 128-token tile (130 tokens: padded to 256) the kernel still matches the
  reference, and its backward kernels give the gradient of the einsum path."""
  rng = np.random.default_rng(3)
  seg = np.array([[1] * 60 + [2] * 66 + [0] * 4], np.int32)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 130, 2, 8)), jnp.float32) for _ in range(3))
  with pltpu.force_tpu_interpret_mode():
    got = jax.jit(attention_kernels.pallas_flash_attention)(q, k, v, segment_ids=jnp.asarray(seg))
    check(np.asarray(got), reference(q, k, v, seg), seg)
    real = jnp.asarray(seg > 0)[:, :, None, None]
    from rlhf_jax.models.transformer import causal_block_attention
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(real, f(q, k, v), 0.0) ** 2)
    flash = loss(lambda q, k, v: attention_kernels.pallas_flash_attention(
        q, k, v, segment_ids=jnp.asarray(seg)))
    xla = loss(lambda q, k, v: causal_block_attention(
        q, k, v, mask=attention_mask(jnp.asarray(seg)), block=0, dtype=jnp.float32))
    grads = jax.jit(jax.grad(flash, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(xla, argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def test_backend_errors():
  err = attention_kernels.backend_error
  assert err('xla', backend='cpu', head_dim=8) is None
  assert err('dot_product_attention', backend='cpu', head_dim=8) is None
  assert 'GPU' in err('cudnn', backend='cpu', head_dim=8)
  assert 'TPU' in err('pallas_flash', backend='gpu', head_dim=8)
  assert err('cudnn', backend='gpu', head_dim=256, compute_capability='9.0') is None
  assert '128' in err('cudnn', backend='gpu', head_dim=256, compute_capability='8.0')


@pytest.mark.parametrize('fields, mentions', [
    (dict(attention='pallas_flash', attn_softcap=50.0), ('attn_softcap', 'pallas_flash')),
    (dict(attention='cudnn', dtype='bfloat16', attn_softcap=50.0), ('attn_softcap', 'cudnn')),
    (dict(attention='cudnn'), ('bfloat16',)),
    (dict(attention='cudnn', dtype='bfloat16', d_model=48, n_heads=4), ('multiple of 8', '12')),
    (dict(attention='flash'), ("'flash'", 'pallas_flash')),
])
def test_validation_refuses(fields, mentions):
  """What a kernel cannot compute is refused from the config alone, with no device."""
  from rlhf_jax import config as config_lib
  from rlhf_jax.errors import UserError
  m = config_lib.model_block()
  m.update(fields)
  with pytest.raises(UserError) as e:
    config_lib.validate_model(m, seq_len=32)
  for word in mentions:
    assert word in str(e.value), (word, str(e.value))


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')
@pytest.mark.parametrize('kv_heads', [4, 2])
def test_cudnn_on_gpu(kv_heads):
  rng = np.random.default_rng(4)
  q = rng.normal(size=(3, 20, 4, 64)) * 64 ** -0.5
  k, v = (rng.normal(size=(3, 20, kv_heads, 64)) for _ in range(2))
  as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  got = attention_kernels.cudnn_attention(as_bf16(q), as_bf16(k), as_bf16(v),
                                          segment_ids=jnp.asarray(SEGMENTS))
  bf = lambda x: np.asarray(as_bf16(x), np.float64)
  check_bf16 = np.asarray(got, np.float32)
  assert np.isfinite(check_bf16).all()
  real = SEGMENTS > 0
  np.testing.assert_allclose(check_bf16[real], reference(bf(q), bf(k), bf(v), SEGMENTS)[real],
                             atol=2e-2)


@pytest.mark.skipif(jax.default_backend() != 'tpu', reason='the compiled kernel needs a TPU')
@pytest.mark.parametrize('heads, kv_heads', [(2, 2), (4, 1)])
def test_pallas_flash_on_tpu(heads, kv_heads):
  got, want = run_layer('pallas_flash', heads, kv_heads, SEGMENTS)
  np.testing.assert_allclose(got[SEGMENTS > 0], want[SEGMENTS > 0], atol=1e-2)
