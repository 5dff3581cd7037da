"""Accelerator attention kernels for the uncached forward, chosen by `model.attention`.

Both take our layout, q, k, v [B, T, H|K, D] with q already scaled, and the [B, T] segment
ids of packed rows (0: padding), and compute what `causal_block_attention` computes:
causal attention within one segment. Neither builds the XLA fallback: a kernel the
backend cannot run is refused before any compute (`check_backend`, called at setup).

- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's flash attention
  (GPU; fp16/bf16 only). The API has no segment-id argument (query_seq_lengths /
  key_value_seq_lengths describe one sequence per row, not several), so the segments go
  in as a boolean mask, which it turns into an additive bias, beside is_causal.
- 'pallas_flash': the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.flash_attention`
  with `SegmentIds` and causal=True. It wants equal head counts, so key/value heads are
  repeated for grouped-query attention. It runs on CPU only in Pallas' TPU interpret mode
  (`pltpu.force_tpu_interpret_mode()`), which the tests use.

Padding tokens (segment 0) attend to the padding before them, never to a real token, and
no real token attends to them: every row has its own diagonal, so no row is all-masked and
nothing is NaN; padding outputs feed nothing.
"""
import jax
import jax.numpy as jnp

# attention name -> the jax.default_backend() that can run it
BACKENDS = {'cudnn': 'gpu', 'pallas_flash': 'tpu'}
# cuDNN's flash attention: the dtypes it takes, the largest head dim (Hopper and later; 128
# before) and the head-dim multiple (jax/_src/cudnn/fused_attention_stablehlo.py checks).
CUDNN_DTYPES = ('bfloat16',)
CUDNN_MAX_HEAD_DIM = 256
_FLASH_BLOCK = 128  # the TPU kernel's default tile


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, 1, T, T] bool: causal and within one segment (padding is a segment of its own)."""
  t = segment_ids.shape[1]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (jnp.tril(jnp.ones((t, t), bool))[None] & same)[:, None]


def _pad_length(x: jax.Array, length: int) -> jax.Array:
  """Pads axis 1 of x ([B, T, ...]) with zeros to `length` (segment 0: padding)."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad)


def cudnn_attention(q, k, v, *, segment_ids, implementation: str = 'cudnn') -> jax.Array:
  """cuDNN flash attention under causal + packed-segment masks; [B, T, H, D] out.
  `implementation='xla'` runs the same call through XLA (how CPU tests check the masks)."""
  t = q.shape[1]
  # cuDNN trains with a bias only for even lengths; one padding token makes any T even.
  length = t + t % 2
  q, k, v, segment_ids = (_pad_length(x, length) for x in (q, k, v, segment_ids))
  out = jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), is_causal=True,
                                     scale=1.0, implementation=implementation)
  return out[:, :t]


def pallas_flash_attention(q, k, v, *, segment_ids) -> jax.Array:
  """The Pallas TPU flash-attention kernel under causal + packed-segment masks; GQA by
  repeating key/value heads. [B, T, H, D] out."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, t, h, d = q.shape
  group = h // k.shape[2]
  if group > 1:  # query head i reads key head i // group, as in _attend
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  # With segment ids the key tile must be a multiple of 128 tokens, and tiles must divide
  # the length: rows are padded to a multiple of 128 (padding: segment 0, seen by none).
  block = _FLASH_BLOCK
  length = -(-t // block) * block
  q, k, v, segment_ids = (_pad_length(x, length) for x in (q, k, v, segment_ids))
  sizes = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                        block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block,
                        block_q_dkv=block, block_k_major_dq=block, block_k_dq=block,
                        block_q_dq=block)
  segments = segment_ids.astype(jnp.int32)
  heads_major = lambda x: x.transpose(0, 2, 1, 3)
  out = fa.flash_attention(heads_major(q), heads_major(k), heads_major(v),
                           segment_ids=fa.SegmentIds(q=segments, kv=segments), causal=True,
                           sm_scale=1.0, block_sizes=sizes)
  return heads_major(out)[:, :t]


KERNELS = {'cudnn': cudnn_attention, 'pallas_flash': pallas_flash_attention}


def backend_error(attention: str, *, backend: str, head_dim: int,
                  compute_capability: str | None = None) -> str | None:
  """Why `attention` cannot run here (None: it can). No fallback: a kernel asked for and
  not runnable is an error, never a quiet switch to other numerics."""
  need = BACKENDS.get(attention)
  if need is None:
    return None
  if backend != need:
    return (f"model.attention={attention!r} runs on a {need.upper()} backend; this one is "
            f"{backend!r} (use model.attention='xla' or 'dot_product_attention')")
  if attention == 'cudnn' and compute_capability is not None:
    major = int(str(compute_capability).split('.')[0])
    if major < 9 and head_dim > 128:
      return (f'model.attention=\'cudnn\' on compute capability {compute_capability} takes '
              f'head_dim <= 128 (Hopper and later: {CUDNN_MAX_HEAD_DIM}); this model has '
              f'{head_dim}')
  return None
