"""Decoder-only Transformer: RMSNorm, rotary positions, causal attention, SwiGLU/GELU MLP.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`);
activations are constrained with `batch`, `length`, `act_*` names. The mapping of names to
mesh axes lives in `config.mesh.rules`, never here.
"""
import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  mlp: str = 'swiglu'
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  attention: str = 'xla'
  attention_block: int = 64
  remat: str = 'none'

  @classmethod
  def from_config(cls, block) -> 'ModelConfig':
    return cls(**{f.name: block[f.name] for f in dataclasses.fields(cls)})

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def num_params(self) -> int:
    """Parameter count, embeddings included."""
    d, f = self.d_model, self.d_ff
    mlp = (3 if self.mlp == 'swiglu' else 2) * d * f
    per_layer = 4 * d * d + mlp + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * per_layer + emb + d

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (non-embedding matmul params + output projection)
    plus causal attention scores and values, forward and backward (PaLM appendix B, with
    the causal half counted)."""
    d, f = self.d_model, self.d_ff
    mlp = (3 if self.mlp == 'swiglu' else 2) * d * f
    matmul_params = self.n_layers * (4 * d * d + mlp) + self.vocab_size * d
    attention = 6 * self.n_layers * seq_len * d  # 12 * L * T * d, halved for causality
    return 6.0 * matmul_params + attention


def _dense_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in ** -0.5)


class RMSNorm(nn.Module):
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rotary_angles(positions: jax.Array, head_dim: int, theta: float):
  """(sin, cos), each [B, T, 1, D/2], computed once per forward and shared by all layers."""
  half = head_dim // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None].astype(jnp.float32) * freq
  return jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]


def rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + D/2]) by position-dependent angles; x: [B, T, H, D]."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, 1, T, T] bool: causal, within one segment, never to padding (segment 0)."""
  t = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same & (segment_ids[:, None, :] > 0))[:, None]


def _attend(q, k, v, mask, dtype):
  """q [B, H, Tq, D] over k, v [B, H, Tk, D] under mask [B, 1, Tq, Tk] -> [B, H, Tq, D]."""
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum('bhqk,bhkd->bhqd', probs, v)


def causal_block_attention(q, k, v, *, mask, block: int, dtype) -> jax.Array:
  """Softmax attention of q over k, v ([B, T, H, D], q already scaled) under `mask`
  [B, 1, T, T], which must include the causal mask.

  Queries are cut into blocks of `block` rows (0: one block); block i attends only to
  keys [0, end of block i), since every later key is masked anyway. With blocks of T/4
  this skips 3/8 of the score matrix, its softmax and their gradients, which on a CPU
  cost more than the attention matmuls themselves. Each block's softmax covers all of
  its unmasked keys, so the result equals full attention; rows with no unmasked key
  (padding) average over the prefix instead of all keys, and feed nothing.
  """
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, T, D]: contiguous heads
  t = q.shape[2]
  block = t if block <= 0 else min(block, t)
  outs = [_attend(q[:, :, start:start + block], k[:, :, :start + block],
                  v[:, :, :start + block], mask[:, :, start:start + block, :start + block],
                  dtype)
          for start in range(0, t, block)]
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out.transpose(0, 2, 1, 3)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for the slots decoded so far (one slot per token).

  keys, values: tuple over layers of [B, H, S, D]; segment_ids: [B, S] int32 of the token
  in each slot (0: padding or not yet written); index: [] int32, the first free slot.
  Slots are filled left to right, so slot order is token order: a query at slot s sees
  keys at slots <= s of its own segment.
  """
  keys: tuple
  values: tuple
  segment_ids: jax.Array
  index: jax.Array

  @classmethod
  def empty(cls, cfg: 'ModelConfig', *, batch: int, length: int) -> 'KVCache':
    shape = (batch, cfg.n_heads, length, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, _DTYPES[cfg.dtype]) for _ in range(cfg.n_layers))
    return cls(keys=zeros(), values=zeros(), segment_ids=jnp.zeros((batch, length), jnp.int32),
               index=jnp.zeros((), jnp.int32))


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, mask, angles, kv=None, index=None):
    """x [B, T, D]. Without `kv`, self-attention under mask [B, 1, T, T]. With kv = (keys,
    values) [B, H, S, D] of this layer, writes this call's keys and values at slots
    index..index+T-1 and attends over all S slots under mask [B, 1, T, S]; returns
    (out, (keys, values))."""
    cfg = self.cfg
    dtype, pdtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    shape = (cfg.d_model, cfg.n_heads, cfg.head_dim)
    init = nn.with_logical_partitioning(_dense_init(cfg.d_model), ('embed', 'heads', 'kv'))
    proj = lambda name: jnp.einsum(
        'btd,dhk->bthk', x, self.param(name, init, shape, pdtype).astype(dtype))
    q, k, v = proj('query'), proj('key'), proj('value')
    q, k = rotary(q, *angles), rotary(k, *angles)
    names = ('batch', 'length', 'act_heads', 'kv')
    q, k, v = (nn.with_logical_constraint(t, names) for t in (q, k, v))
    q = q * cfg.head_dim ** -0.5
    if kv is not None:
      # The cache is heads-major, so each step transposes only its new keys and values,
      # never the whole cache.
      heads_major = lambda t: t.transpose(0, 2, 1, 3)
      write = lambda cache, new: nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(cache, heads_major(new).astype(cache.dtype),
                                       (0, 0, index, 0)), ('batch', 'act_heads', 'length', 'kv'))
      k, v = kv = (write(kv[0], k), write(kv[1], v))
      out = heads_major(_attend(heads_major(q), k, v, mask, dtype))
    elif cfg.attention == 'dot_product_attention':
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0)
    else:
      out = causal_block_attention(q, k, v, mask=mask, block=cfg.attention_block, dtype=dtype)
    out = nn.with_logical_constraint(out, names)
    w_out = self.param('out', nn.with_logical_partitioning(_dense_init(cfg.d_model),
                                                           ('heads', 'kv', 'embed')),
                       (cfg.n_heads, cfg.head_dim, cfg.d_model), pdtype)
    out = jnp.einsum('bthk,hkd->btd', out, w_out.astype(dtype))
    return out if kv is None else (out, kv)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    if cfg.mlp == 'swiglu':
      # Gate and up projections as one [D, 2, F] matmul: one read of x, one bigger GEMM.
      w_in = self.param('gate_up', nn.with_logical_partitioning(
          _dense_init(cfg.d_model), ('embed', None, 'mlp')), (cfg.d_model, 2, cfg.d_ff), pdtype)
      gate_up = jnp.einsum('btd,dcf->btcf', x, w_in.astype(dtype))
      h = nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    else:
      w_in = self.param('up', nn.with_logical_partitioning(
          _dense_init(cfg.d_model), ('embed', 'mlp')), (cfg.d_model, cfg.d_ff), pdtype)
      h = nn.gelu(jnp.einsum('btd,df->btf', x, w_in.astype(dtype)))
    h = nn.with_logical_constraint(h, ('batch', 'length', 'act_mlp'))
    w_out = self.param('down', nn.with_logical_partitioning(
        _dense_init(cfg.d_ff), ('mlp', 'embed')), (cfg.d_ff, cfg.d_model), pdtype)
    return jnp.einsum('btf,fd->btd', h, w_out.astype(dtype))


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, mask, angles, kv=None, index=None):
    dtype, pdtype = _DTYPES[self.cfg.dtype], _DTYPES[self.cfg.param_dtype]
    h = RMSNorm(dtype, pdtype, name='attn_norm')(x)
    attn = Attention(self.cfg, name='attn')
    if kv is None:
      x = x + attn(h, mask, angles)
    else:
      out, kv = attn(h, mask, angles, kv, index)
      x = x + out
    x = x + Mlp(self.cfg, name='mlp')(RMSNorm(dtype, pdtype, name='mlp_norm')(x))
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    return x if kv is None else (x, kv)


@flax.struct.dataclass
class ModelOutput:
  """logits: [B, T, V] float32; hidden: [B, T, D] final-norm hidden states (or None);
  cache: the KVCache after this call's tokens were written (None without a cache)."""
  logits: jax.Array
  hidden: jax.Array | None
  cache: KVCache | None = None


def cache_mask(cache: KVCache, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mask [B, 1, T, S], slot segment ids [B, S]) for T new tokens written at cache.index:
  a query sees written slots up to its own, in its own segment."""
  t, s = segment_ids.shape[1], cache.segment_ids.shape[1]
  slot_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                               (0, cache.index))
  query_slot = cache.index + jnp.arange(t)
  causal = jnp.arange(s)[None, :] <= query_slot[:, None]  # [T, S]
  same = segment_ids[:, :, None] == slot_segments[:, None, :]
  mask = causal[None] & same & (slot_segments[:, None, :] > 0)
  return mask[:, None], slot_segments


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs, *, segment_ids, positions, return_hidden: bool = False,
               cache: KVCache | None = None, token_types=None):
    """inputs, segment_ids, positions: [B, T] int32. With `cache`, the T tokens continue
    the cached ones (a prompt to prefill, or one new token per row) and the output carries
    the updated cache; the numbers equal a full forward over all tokens so far.

    token_types: [B, T] int32 in {0, 1} (prompt, response) for models that must know where
    a response starts (reward models); it adds a learned type embedding, a parameter only
    such models have, zero at init."""
    cfg = self.cfg
    dtype, pdtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(stddev=1.0), ('vocab', 'embed')),
                     name='embed')
    x = embed(inputs)
    if token_types is not None:
      x = x + nn.Embed(2, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                       embedding_init=nn.with_logical_partitioning(
                           nn.initializers.zeros, (None, 'embed')),
                       name='type_embed')(token_types)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    angles = rotary_angles(positions, cfg.head_dim, cfg.rope_theta)
    if cache is None:
      mask = attention_mask(segment_ids)
      block = Block
      if cfg.remat != 'none':
        policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                  if cfg.remat == 'dots' else None)
        block = nn.remat(Block, policy=policy)
      for i in range(cfg.n_layers):
        x = block(cfg, name=f'layer_{i}')(x, mask, angles)
    else:
      mask, slot_segments = cache_mask(cache, segment_ids)
      keys, values = [], []
      for i in range(cfg.n_layers):
        x, (k, v) = Block(cfg, name=f'layer_{i}')(
            x, mask, angles, (cache.keys[i], cache.values[i]), cache.index)
        keys.append(k)
        values.append(v)
      cache = KVCache(keys=tuple(keys), values=tuple(values), segment_ids=slot_segments,
                      index=cache.index + inputs.shape[1])
    hidden = RMSNorm(dtype, pdtype, name='final_norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(hidden) * cfg.d_model ** -0.5
    else:
      logits = nn.Dense(cfg.vocab_size, dtype=dtype, param_dtype=pdtype, use_bias=False,
                        kernel_init=nn.with_logical_partitioning(
                            _dense_init(cfg.d_model), ('embed', 'vocab')),
                        name='logits')(hidden)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32),
                                        ('batch', 'length', 'act_vocab'))
    return ModelOutput(logits=logits, hidden=hidden if return_hidden else None, cache=cache)
