"""The Transformer's pieces against float64 NumPy references: block-skipping causal attention
under packed-segment masks, rotary embeddings, and the whole model on packed rows (a
document's logits do not depend on what else is packed beside it)."""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from rlhf_jax.models.transformer import (ModelConfig, Transformer, attention_mask,
                                         causal_block_attention, rotary, rotary_angles)

from attention_reference import SEGMENTS, reference

@pytest.mark.parametrize('block', [0, 4, 7, 20, 64])
def test_block_attention_matches_reference(block):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(3, 20, 2, 4)).astype(np.float32) for _ in range(3))
  mask = attention_mask(jnp.asarray(SEGMENTS))
  got = np.asarray(causal_block_attention(q, k, v, mask=mask, block=block,
                                          dtype=jnp.float32))
  want = reference(q, k, v, SEGMENTS)
  real = SEGMENTS > 0  # padding rows attend to nothing; their outputs are unused
  np.testing.assert_allclose(got[real], want[real], atol=2e-6, rtol=2e-6)


def test_rotary_matches_reference():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4], [7, 0, 1, 30, 2]], np.int32)
  theta = 10000.0
  cfg = ModelConfig(vocab_size=3, d_model=24, n_layers=1, n_heads=3, d_ff=4, rope_theta=theta)
  got = np.asarray(rotary(jnp.asarray(x), *rotary_angles(jnp.asarray(positions), cfg)))
  want = np.zeros_like(x, dtype=np.float64)
  for i in range(4):  # pair (i, i + 4) turns by position * theta**(-i/4)
    angle = positions[:, :, None] * theta ** (-i / 4)
    a, b = x[..., i].astype(np.float64), x[..., i + 4].astype(np.float64)
    want[..., i] = a * np.cos(angle) - b * np.sin(angle)
    want[..., i + 4] = b * np.cos(angle) + a * np.sin(angle)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The point of rotary: a query-key product depends only on the distance.
  q, k = rng.normal(size=8), rng.normal(size=8)
  def dot_at(m, n):
    pos = jnp.array([[m, n]], jnp.int32)
    both = rotary(jnp.asarray(np.stack([q, k])[None, :, None], jnp.float32),
                  *rotary_angles(pos, cfg))
    return float(both[0, 0, 0] @ both[0, 1, 0])
  assert abs(dot_at(9, 4) - dot_at(25, 20)) < 1e-4


def make_model(attention: str, block: int = 4):
  cfg = ModelConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=2, d_ff=24,
                    attention=attention, attention_block=block)
  model = Transformer(cfg)
  ids = jnp.ones((1, 20), jnp.int32)
  # Jitted, from an RBG key: op by op the init took 11 s on CPU, and jitted with a threefry
  # key it spends about as long compiling threefry (any random params serve these tests).
  params = jax.jit(lambda k: model.init(k, ids, segment_ids=ids,
                                        positions=jnp.zeros_like(ids))['params'])(
                                            jax.random.key(0, impl='rbg'))
  return model, nn.meta.unbox(params)


@pytest.mark.slow
@pytest.mark.parametrize('attention', ['xla', 'dot_product_attention', 'pallas_flash'])
def test_packed_documents_do_not_see_each_other(attention):
  """Row 2 packs three documents with positions restarting at 0; each document's logits
  equal those of the document run alone. The TPU kernel runs in Pallas' TPU interpreter."""
  interpret = contextlib.nullcontext()
  if attention == 'pallas_flash':
    interpret = pltpu.force_tpu_interpret_mode()
  with interpret:
    _packed_documents_do_not_see_each_other(attention)


def _packed_documents_do_not_see_each_other(attention):
  model, params = make_model(attention)
  rng = np.random.default_rng(2)
  tokens = rng.integers(3, 13, size=(1, 20)).astype(np.int32)
  seg = SEGMENTS[2:3]
  positions = np.concatenate([np.arange(5), np.arange(11), np.arange(4)])[None]
  apply = jax.jit(model.apply)  # op by op, the four forwards took 9 s on CPU
  packed = apply({'params': params}, jnp.asarray(tokens), segment_ids=jnp.asarray(seg),
                 positions=jnp.asarray(positions)).logits
  for doc in (1, 2, 3):
    cols = np.where(seg[0] == doc)[0]
    alone_tokens = tokens[:, cols]
    alone = apply({'params': params}, jnp.asarray(alone_tokens),
                  segment_ids=jnp.ones_like(alone_tokens),
                  positions=jnp.arange(len(cols))[None]).logits
    np.testing.assert_allclose(np.asarray(packed)[:, cols], np.asarray(alone), atol=1e-5)


@pytest.mark.slow  # over 8 s: left out of the quick check
def test_hidden_states_give_the_logits():
  """return_hidden exposes the final-norm hidden states that value and reward heads use:
  the logits are exactly their projection by the output matrix."""
  model, params = make_model('xla')
  tokens = jnp.asarray(np.random.default_rng(3).integers(3, 13, size=(2, 20)), jnp.int32)
  out = jax.jit(model.apply, static_argnames='return_hidden')(
      {'params': params}, tokens, segment_ids=jnp.ones_like(tokens),
      positions=jnp.broadcast_to(jnp.arange(20), (2, 20)), return_hidden=True)
  want = np.asarray(out.hidden, np.float64) @ np.asarray(params['logits']['kernel'], np.float64)
  np.testing.assert_allclose(np.asarray(out.logits), want, atol=1e-5)
