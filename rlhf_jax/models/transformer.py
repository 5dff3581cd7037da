"""Decoder-only Transformer: pre-norm blocks, causal attention, a gated or plain MLP.

The defaults are our own model (RMSNorm, rotary positions, multi-head attention, SwiGLU,
no biases). Config fields give what the released checkpoint families need, each off by
default:
- `n_kv_heads`: grouped-query attention (Llama 2 70B, Llama 3, Mistral, Qwen2; 1: MQA);
- `head_dim`: a head width other than d_model / n_heads (Gemma);
- `norm='layer'`: LayerNorm with a bias (GPT-2); `norm_offset=1`: RMSNorm scaled by
  1 + scale (Gemma); `post_norms`: a norm on each sub-block's output too (Gemma 2);
- `positions='learned'`: absolute position embeddings of `max_positions` rows (GPT-2);
- `rope_scaling='llama3'` (Llama 3.1's frequency-dependent stretch) or 'linear';
- `qkv_bias`, `attn_out_bias`, `mlp_bias`: biases (Qwen2: qkv; GPT-2: all);
- `qk_norm`: RMSNorm over head_dim on queries and keys (Qwen3, Gemma 3);
- `attn_softcap`, `logit_softcap`: cap * tanh(x / cap) on scores and logits (Gemma 2);
- `embed_scale`: embeddings times sqrt(d_model) (Gemma);
- `tie_embeddings` with `tied_scale=False`: logits = hidden @ embed^T, unscaled, as
  released checkpoints are (ours scale them by d_model^-0.5);
- `mlp='geglu'`: the gated MLP with tanh-GELU (Gemma).

`attention`, the uncached forward's (every stage trains through it): 'xla' (our einsum
`causal_block_attention`), 'dot_product_attention' (jax.nn), or a kernel of
models/attention_kernels.py: 'cudnn' (GPU), 'pallas_flash' (TPU). Decoding: the einsum.

With `lora_rank` > 0 (set from a stage's `lora` block by models/lora.py adapt, never from
the model block) each kernel named in `lora_targets` gets low-rank adapters A, B beside it
and its output gains (lora_alpha / lora_rank) (x A) B, on the cached path too.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`;
key and value heads use `heads` too, so with GQA n_kv_heads must divide like n_heads);
activations are constrained with `batch`, `length`, `act_*` names. The mapping of names to
mesh axes lives in `config.mesh.rules`, never here.
"""
import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.models import attention_kernels

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
  n_kv_heads: int = 0            # 0: n_heads
  head_dim_override: int = 0     # config field `head_dim`; 0: d_model // n_heads
  norm: str = 'rms'              # 'rms' | 'layer'
  norm_eps: float = 1e-6
  norm_offset: float = 0.0       # RMSNorm multiplies by (norm_offset + scale)
  post_norms: bool = False
  positions: str = 'rope'        # 'rope' | 'learned'
  max_positions: int = 0         # rows of the learned position table
  rope_scaling: str = 'none'     # 'none' | 'linear' | 'llama3'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  qkv_bias: bool = False
  attn_out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  attn_softcap: float = 0.0      # 0: off
  logit_softcap: float = 0.0
  embed_scale: bool = False
  tied_scale: bool = True
  lora_rank: int = 0             # 0: no adapters (models/lora.py)
  lora_alpha: float = 16.0
  lora_targets: tuple = ()

  @classmethod
  def from_config(cls, block) -> 'ModelConfig':
    """From a config's model block; a field the block lacks (a run written before the
    field existed) takes its default, which is the behaviour that run had."""
    names = {'head_dim_override': 'head_dim'}
    values = {}
    for f in dataclasses.fields(cls):
      key = names.get(f.name, f.name)
      if key in block:
        values[f.name] = block[key]
    return cls(**values)

  @property
  def head_dim(self) -> int:
    return self.head_dim_override or self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def gated(self) -> bool:
    return self.mlp in ('swiglu', 'geglu')

  def _matmul_params(self) -> tuple[int, int]:
    """(attention, MLP) kernel parameters of one layer."""
    d, h = self.d_model, self.head_dim
    attention = d * h * (2 * self.n_heads + 2 * self.kv_heads)
    return attention, (3 if self.gated else 2) * d * self.d_ff

  def num_params(self) -> int:
    """Parameter count, embeddings included."""
    d, h = self.d_model, self.head_dim
    attention, mlp = self._matmul_params()
    norms = (2 + 2 * self.post_norms) * d * (2 if self.norm == 'layer' else 1)
    biases = (self.qkv_bias * h * (self.n_heads + 2 * self.kv_heads) + self.attn_out_bias * d
              + self.mlp_bias * ((2 if self.gated else 1) * self.d_ff + d))
    per_layer = attention + mlp + norms + biases + 2 * h * self.qk_norm
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    emb += self.max_positions * d if self.positions == 'learned' else 0
    return self.n_layers * per_layer + emb + d * (2 if self.norm == 'layer' else 1)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (non-embedding matmul params + output projection)
    plus causal attention scores and values, forward and backward (PaLM appendix B, with
    the causal half counted)."""
    attention, mlp = self._matmul_params()
    matmul_params = self.n_layers * (attention + mlp) + self.vocab_size * self.d_model
    # 12 * L * T * (query width), halved for causality
    scores = 6 * self.n_layers * seq_len * self.n_heads * self.head_dim
    return 6.0 * matmul_params + scores


def _dense_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in ** -0.5)


def lora_delta(module: nn.Module, cfg: 'ModelConfig', name: str, x, shape: tuple,
               axes: tuple, n_in: int):
  """(alpha / r) (x A) B for the kernel `name` of `shape` with logical `axes`, whose first
  n_in axes contract with x's last n_in; None when the kernel carries no adapter.

  A [*in, r] is Gaussian with std 1/sqrt(fan_in) and shares W's input axes; B [r, *out]
  starts at zero and shares W's output axes, so each adapter shards like its kernel and
  the adapted model starts exactly at the base one."""
  if cfg.lora_rank <= 0 or name not in cfg.lora_targets:
    return None
  dtype, pdtype, r = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype], cfg.lora_rank
  a = module.param(f'{name}_lora_a', nn.with_logical_partitioning(
      _dense_init(math.prod(shape[:n_in])), tuple(axes[:n_in]) + (None,)),
                   tuple(shape[:n_in]) + (r,), pdtype)
  b = module.param(f'{name}_lora_b', nn.with_logical_partitioning(
      nn.initializers.zeros, (None,) + tuple(axes[n_in:])), (r,) + tuple(shape[n_in:]), pdtype)
  xa = jnp.tensordot(x, a.astype(dtype), axes=n_in)
  return jnp.tensordot(xa, b.astype(dtype), axes=1) * jnp.asarray(cfg.lora_alpha / r, dtype)


def _plus(y, d):
  return y if d is None else y + d


class RMSNorm(nn.Module):
  """RMSNorm (norm_offset 0: x * scale; 1: x * (1 + scale), scale starting at 0) or, with
  kind='layer', LayerNorm with a bias. Statistics in float32."""
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  eps: float = 1e-6
  kind: str = 'rms'
  offset: float = 0.0

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param('scale', nn.with_logical_partitioning(init, ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if self.kind == 'layer':
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    y = y * (self.offset + scale.astype(jnp.float32))
    if self.kind == 'layer':
      y = y + self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
                         (x.shape[-1],), self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype)


def _norm(cfg: 'ModelConfig', name: str) -> RMSNorm:
  return RMSNorm(_DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype], cfg.norm_eps, cfg.norm,
                 cfg.norm_offset, name=name)


def rotary_frequencies(cfg: 'ModelConfig') -> jax.Array:
  """[head_dim / 2] float32 angular frequencies theta^(-2i/D), stretched by the scaling:
  'linear' divides all by rope_factor; 'llama3' (Llama 3.1) divides those whose wavelength
  exceeds original_max / low_freq_factor by rope_factor, keeps those shorter than
  original_max / high_freq_factor, and interpolates linearly in original_max / wavelength
  between the two."""
  half = cfg.head_dim // 2
  freq = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if cfg.rope_scaling == 'linear':
    return freq / cfg.rope_factor
  if cfg.rope_scaling == 'llama3':
    wavelength = 2 * math.pi / freq
    ratio = cfg.rope_original_max_positions / wavelength
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    smooth = jnp.clip((ratio - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * freq / cfg.rope_factor + smooth * freq
  return freq


def rotary_angles(positions: jax.Array, cfg: 'ModelConfig'):
  """(sin, cos), each [B, T, 1, D/2], computed once per forward and shared by all layers."""
  angle = positions[..., None].astype(jnp.float32) * rotary_frequencies(cfg)
  # Left to itself XLA fuses sin and cos into every layer's rotary of queries and keys,
  # forward and backward, and evaluates them for each element of [B, T, H, D]: H times
  # over, in 4 * n_layers fusions. Stacked and passed through a float32 reduce_precision
  # (the identity on float32 values), they are computed once, as one [2, B, T, D/2] array
  # that the rotaries read: the simplifier cannot fold the slices of that array back into
  # sin and cos (XLA:CPU strips optimization_barrier before fusion, so a barrier does not
  # do this). On the 2-core CPU it takes the rotaries from ~3% of a `small` step to <1%.
  table = jax.lax.reduce_precision(jnp.stack([jnp.sin(angle), jnp.cos(angle)]),
                                   exponent_bits=8, mantissa_bits=23)
  return table[0][:, :, None, :], table[1][:, :, None, :]


def softcap(x: jax.Array, cap: float) -> jax.Array:
  return x if not cap else cap * jnp.tanh(x / cap)


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


def _attend(q, k, v, mask, dtype, cap: float = 0.0):
  """q [B, H, Tq, D] over k, v [B, K, Tk, D] under mask [B, 1, Tq, Tk] -> [B, H, Tq, D].
  K divides H: query head h reads key head h // (H / K) (grouped-query attention)."""
  b, h, tq, d = q.shape
  kh = k.shape[1]
  q = q.reshape(b, kh, h // kh, tq, d)
  scores = softcap(jnp.einsum('bkgqd,bkjd->bkgqj', q, k).astype(jnp.float32), cap)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum('bkgqj,bkjd->bkgqd', probs, v).reshape(b, h, tq, d)


def _attend_parts(q, parts, dtype, cap: float = 0.0):
  """_attend over keys given in parts [(k, v, mask), ...], one softmax across all of
  them: the same numbers as attending over the parts' keys laid end to end, without
  building that concatenation."""
  b, h, tq, d = q.shape
  kh = parts[0][0].shape[1]
  q = q.reshape(b, kh, h // kh, tq, d)
  scores = [jnp.where(m[:, :, None], softcap(jnp.einsum('bkgqd,bkjd->bkgqj', q, k).astype(
      jnp.float32), cap), jnp.finfo(jnp.float32).min) for k, _, m in parts]
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(dtype)
  out, start = 0, 0
  for (k, v, _), s in zip(parts, scores):
    width = s.shape[-1]
    out = out + jnp.einsum('bkgqj,bkjd->bkgqd', probs[..., start:start + width], v)
    start += width
  return out.reshape(b, h, tq, d)


def causal_block_attention(q, k, v, *, mask, block: int, dtype, cap: float = 0.0) -> jax.Array:
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
                  dtype, cap)
          for start in range(0, t, block)]
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out.transpose(0, 2, 1, 3)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for the slots decoded so far (one slot per token).

  keys, values: tuple over layers of a tuple over chunks of [B, K, C_j, D] (K: key/value
  heads): S = sum C_j slots, chunk j holding slots [sum C_<j, sum C_<=j), each chunk its
  own buffer so that a step reading only the first chunks reads them in place (a slice of
  one [.., S, ..] buffer would be copied). segment_ids: [B, S] int32 of the token in each
  slot (0: padding or not yet written); index: [] int32, the first free slot, or [B], one
  per row (continuous batching: rows at different steps; one chunk only). Slots are filled
  left to right, so slot order is token order: a query at slot s sees keys at slots <= s
  of its own segment.
  """
  keys: tuple
  values: tuple
  segment_ids: jax.Array
  index: jax.Array

  @classmethod
  def empty(cls, cfg: 'ModelConfig', *, batch: int, length: int,
            chunks: tuple = ()) -> 'KVCache':
    """chunks: the slots C_j of each chunk, summing to length (empty: one chunk)."""
    chunks = tuple(chunks) or (length,)
    if sum(chunks) != length or min(chunks) < 1:
      raise ValueError(f'cache chunks {chunks} do not split {length} slots')
    zeros = lambda: tuple(
        tuple(jnp.zeros((batch, cfg.kv_heads, c, cfg.head_dim), _DTYPES[cfg.dtype])
              for c in chunks) for _ in range(cfg.n_layers))
    return cls(keys=zeros(), values=zeros(), segment_ids=jnp.zeros((batch, length), jnp.int32),
               index=jnp.zeros((), jnp.int32))


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, mask, angles, kv=None, index=None, chunks: int = 0):
    """x [B, T, D]. Without `kv`, self-attention under mask [B, 1, T, T]. With kv = (keys,
    values) of this layer, each a tuple of chunks [B, K, C_j, D] (KVCache), attends over
    the first `chunks` chunks (0: all), W slots in all, under mask [B, 1, T, W], having
    written this call's keys and values at slots index..index+T-1, which the caller
    guarantees lie in the last of those chunks; returns (out, (keys, values))."""
    cfg = self.cfg
    dtype, pdtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    axes = ('embed', 'heads', 'kv')
    init = nn.with_logical_partitioning(_dense_init(cfg.d_model), axes)
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ('heads', 'kv'))

    def proj(name, heads):
      shape = (cfg.d_model, heads, cfg.head_dim)
      w = self.param(name, init, shape, pdtype)
      y = _plus(jnp.einsum('btd,dhk->bthk', x, w.astype(dtype)),
                lora_delta(self, cfg, name, x, shape, axes, 1))
      if cfg.qkv_bias:
        y = y + self.param(f'{name}_bias', zeros, (heads, cfg.head_dim), pdtype).astype(dtype)
      return y

    q, k, v = proj('query', cfg.n_heads), proj('key', cfg.kv_heads), proj('value', cfg.kv_heads)
    if cfg.qk_norm:
      q, k = _norm(cfg, 'query_norm')(q), _norm(cfg, 'key_norm')(k)
    if cfg.positions == 'rope':
      q, k = rotary(q, *angles), rotary(k, *angles)
    names = ('batch', 'length', 'act_heads', 'kv')
    q, k, v = (nn.with_logical_constraint(t, names) for t in (q, k, v))
    q = q * cfg.head_dim ** -0.5
    if kv is not None:
      # The cache is heads-major, so each step transposes only its new keys and values,
      # never the whole cache.
      heads_major = lambda t: t.transpose(0, 2, 1, 3)
      n = chunks or len(kv[0])
      sizes = [c.shape[2] for c in kv[0][:n]]
      last = sum(sizes[:-1])  # the first slot of the chunk written to
      write = lambda cache, new: cache[:n - 1] + (nn.with_logical_constraint(
          write_slots(cache[n - 1], heads_major(new).astype(cache[0].dtype), index - last, 2),
          ('batch', 'act_heads', 'length', 'kv')),) + cache[n:]
      kv = (write(kv[0], k), write(kv[1], v))
      bounds = [sum(sizes[:j]) for j in range(n + 1)]
      parts = [(kv[0][j], kv[1][j], mask[..., bounds[j]:bounds[j + 1]]) for j in range(n)]
      out = heads_major(_attend_parts(heads_major(q), parts, dtype, cfg.attn_softcap))
    elif cfg.attention in attention_kernels.KERNELS:  # here mask is the [B, T] segment ids
      out = attention_kernels.KERNELS[cfg.attention](q, k, v, segment_ids=mask)
    elif cfg.attention == 'dot_product_attention':
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0)
    else:
      out = causal_block_attention(q, k, v, mask=mask, block=cfg.attention_block, dtype=dtype,
                                   cap=cfg.attn_softcap)
    out = nn.with_logical_constraint(out, names)
    out_shape, out_axes = (cfg.n_heads, cfg.head_dim, cfg.d_model), ('heads', 'kv', 'embed')
    w_out = self.param('out', nn.with_logical_partitioning(_dense_init(cfg.d_model), out_axes),
                       out_shape, pdtype)
    out = _plus(jnp.einsum('bthk,hkd->btd', out, w_out.astype(dtype)),
                lora_delta(self, cfg, 'out', out, out_shape, out_axes, 2))
    if cfg.attn_out_bias:
      out = out + self.param('out_bias', nn.with_logical_partitioning(
          nn.initializers.zeros, ('embed',)), (cfg.d_model,), pdtype).astype(dtype)
    return out if kv is None else (out, kv)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    bias = lambda name, shape, axes: self.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape,
        pdtype).astype(dtype)
    if cfg.gated:
      # Gate and up projections as one [D, 2, F] matmul: one read of x, one bigger GEMM.
      shape, axes = (cfg.d_model, 2, cfg.d_ff), ('embed', None, 'mlp')
      w_in = self.param('gate_up', nn.with_logical_partitioning(_dense_init(cfg.d_model), axes),
                        shape, pdtype)
      gate_up = _plus(jnp.einsum('btd,dcf->btcf', x, w_in.astype(dtype)),
                      lora_delta(self, cfg, 'gate_up', x, shape, axes, 1))
      if cfg.mlp_bias:
        gate_up = gate_up + bias('gate_up_bias', (2, cfg.d_ff), (None, 'mlp'))
      act = nn.silu if cfg.mlp == 'swiglu' else nn.gelu  # nn.gelu: the tanh approximation
      h = act(gate_up[:, :, 0]) * gate_up[:, :, 1]
    else:
      shape, axes = (cfg.d_model, cfg.d_ff), ('embed', 'mlp')
      w_in = self.param('up', nn.with_logical_partitioning(_dense_init(cfg.d_model), axes),
                        shape, pdtype)
      h = _plus(jnp.einsum('btd,df->btf', x, w_in.astype(dtype)),
                lora_delta(self, cfg, 'up', x, shape, axes, 1))
      if cfg.mlp_bias:
        h = h + bias('up_bias', (cfg.d_ff,), ('mlp',))
      h = nn.gelu(h)
    h = nn.with_logical_constraint(h, ('batch', 'length', 'act_mlp'))
    shape, axes = (cfg.d_ff, cfg.d_model), ('mlp', 'embed')
    w_out = self.param('down', nn.with_logical_partitioning(_dense_init(cfg.d_ff), axes),
                       shape, pdtype)
    out = _plus(jnp.einsum('btf,fd->btd', h, w_out.astype(dtype)),
                lora_delta(self, cfg, 'down', h, shape, axes, 1))
    return out + bias('down_bias', (cfg.d_model,), ('embed',)) if cfg.mlp_bias else out


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, mask, angles, kv=None, index=None, chunks: int = 0):
    cfg = self.cfg
    post = lambda name, y: _norm(cfg, name)(y) if cfg.post_norms else y
    h = _norm(cfg, 'attn_norm')(x)
    attn = Attention(cfg, name='attn')
    if kv is None:
      x = x + post('post_attn_norm', attn(h, mask, angles))
    else:
      out, kv = attn(h, mask, angles, kv, index, chunks)
      x = x + post('post_attn_norm', out)
    x = x + post('post_mlp_norm', Mlp(cfg, name='mlp')(_norm(cfg, 'mlp_norm')(x)))
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    return x if kv is None else (x, kv)


@flax.struct.dataclass
class ModelOutput:
  """logits: [B, T, V] float32; hidden: [B, T, D] final-norm hidden states (or None);
  cache: the KVCache after this call's tokens were written (None without a cache)."""
  logits: jax.Array
  hidden: jax.Array | None
  cache: KVCache | None = None


def write_slots(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
  """buf [B, ...] with `new` written from slot `index` on along `axis`: one index for all
  rows ([]), or one per row ([B], the continuous-batching sampler's rows each at its own
  step)."""
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice_in_dim(buf, new, index, axis)
  return jax.vmap(lambda b, x, i: jax.lax.dynamic_update_slice_in_dim(b, x, i, axis - 1))(
      buf, new, index)


def cache_mask(cache: KVCache, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mask [B, 1, T, S], slot segment ids [B, S]) for T new tokens written at cache.index
  ([] or one per row [B]): a query sees written slots up to its own, in its own segment."""
  t, s = segment_ids.shape[1], cache.segment_ids.shape[1]
  slot_segments = write_slots(cache.segment_ids, segment_ids.astype(jnp.int32), cache.index, 1)
  query_slot = jnp.reshape(cache.index, (-1, 1)) + jnp.arange(t)  # [1 | B, T]
  causal = jnp.arange(s)[None, None, :] <= query_slot[:, :, None]  # [1 | B, T, S]
  same = segment_ids[:, :, None] == slot_segments[:, None, :]
  mask = causal & same & (slot_segments[:, None, :] > 0)
  return mask[:, None], slot_segments


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs, *, segment_ids, positions, return_hidden: bool = False,
               cache: KVCache | None = None, cache_chunks: int = 0, token_types=None):
    """inputs, segment_ids, positions: [B, T] int32. With `cache`, the T tokens continue
    the cached ones (a prompt to prefill, or one new token per row) and the output carries
    the updated cache; the numbers equal a full forward over all tokens so far.

    cache_chunks (static): attention reads only the cache's first `cache_chunks` chunks
    (0: all), which must hold every slot written so far, and whose last chunk must hold
    this call's slots (the sampler's length buckets: a decode step reads the filled part
    of the cache, not all of it).

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
    if cfg.embed_scale:
      x = x * jnp.asarray(cfg.d_model ** 0.5, dtype)
    if cfg.positions == 'learned':
      x = x + nn.Embed(cfg.max_positions, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                       embedding_init=nn.with_logical_partitioning(
                           nn.initializers.normal(stddev=0.02), (None, 'embed')),
                       name='pos_embed')(positions)
    if token_types is not None:
      x = x + nn.Embed(2, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                       embedding_init=nn.with_logical_partitioning(
                           nn.initializers.zeros, (None, 'embed')),
                       name='type_embed')(token_types)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    angles = rotary_angles(positions, cfg) if cfg.positions == 'rope' else None
    if cache is None:
      kernel = cfg.attention in attention_kernels.KERNELS  # segment ids, no [T, T] mask
      mask = segment_ids if kernel else attention_mask(segment_ids)
      block = Block
      if cfg.remat != 'none':
        policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                  if cfg.remat == 'dots' else None)
        block = nn.remat(Block, policy=policy)
      for i in range(cfg.n_layers):
        x = block(cfg, name=f'layer_{i}')(x, mask, angles)
    else:
      mask, slot_segments = cache_mask(cache, segment_ids)
      if cache_chunks:
        mask = mask[..., :sum(c.shape[2] for c in cache.keys[0][:cache_chunks])]
      keys, values = [], []
      for i in range(cfg.n_layers):
        x, (k, v) = Block(cfg, name=f'layer_{i}')(
            x, mask, angles, (cache.keys[i], cache.values[i]), cache.index, cache_chunks)
        keys.append(k)
        values.append(v)
      cache = KVCache(keys=tuple(keys), values=tuple(values), segment_ids=slot_segments,
                      index=cache.index + inputs.shape[1])
    hidden = _norm(cfg, 'final_norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(hidden) * (cfg.d_model ** -0.5 if cfg.tied_scale else 1.0)
    else:
      logits = nn.Dense(cfg.vocab_size, dtype=dtype, param_dtype=pdtype, use_bias=False,
                        kernel_init=nn.with_logical_partitioning(
                            _dense_init(cfg.d_model), ('embed', 'vocab')),
                        name='logits')(hidden)
    logits = nn.with_logical_constraint(softcap(logits.astype(jnp.float32), cfg.logit_softcap),
                                        ('batch', 'length', 'act_vocab'))
    return ModelOutput(logits=logits, hidden=hidden if return_hidden else None, cache=cache)
