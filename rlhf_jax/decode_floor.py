"""The floor of a cached decode step, measured on this machine in the same run as the step.

A decode step of B rows must at least (a) run the step's matmuls, every kernel of every
layer and the output projection on B one-token activations, which also reads every weight
once, and (b) read the filled part of the KV cache, 2 (keys, values) x layers x B x
kv_heads x filled slots x head_dim elements. Attention's own arithmetic on one query is
2 flops per cache element read, far below what the bytes cost, so (b) is priced at the
machine's streaming read rate, measured here by a jitted sum over an array larger than the
caches. The floor of a step whose cache holds `filled` slots:

  floor(filled) = t_matmul + cache_bytes(filled) / read_bytes_per_s

t_matmul is timed as `steps` chained matmul-only steps in one compiled loop (no dispatch
between steps, as in the sampler's while loop), divided by `steps`.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.transformer import ModelConfig


def _kernels(params, cfg: ModelConfig):
  """Per layer (q, k, v, out, mlp_in, down) as 2-D [fan_in, fan_out] matrices, and the
  output projection [D, V]."""
  d = cfg.d_model
  layers = []
  for i in range(cfg.n_layers):
    a, m = params[f'layer_{i}']['attn'], params[f'layer_{i}']['mlp']
    mlp_in = m['gate_up'] if cfg.gated else m['up']
    # 2-D [fan_in, fan_out]: out [H, Dh, D] and down [F, D] take their inputs first
    flat = lambda name, w: w.reshape(-1, d) if name in ('out', 'down') else w.reshape(d, -1)
    named = (('q', a['query']), ('k', a['key']), ('v', a['value']), ('out', a['out']),
             ('in', mlp_in), ('down', m['down']))
    layers.append(tuple(flat(name, w) for name, w in named))
  head = params['embed']['embedding'].T if cfg.tie_embeddings else params['logits']['kernel']
  return layers, head


def matmul_step_seconds(params, cfg: ModelConfig, *, batch: int, steps: int) -> float:
  """Seconds per step of `steps` chained matmul-only decode steps on `batch` rows."""
  dtype = jnp.bfloat16 if cfg.dtype == 'bfloat16' else jnp.float32
  layers, head = _kernels(params, cfg)
  f = cfg.d_ff

  @jax.jit
  def run(x, layers, head):
    def step(_, x):
      for q, k, v, out, mlp_in, down in layers:
        qx = x @ q.astype(dtype)
        kv = (x @ k.astype(dtype)).sum(-1, keepdims=True) + (x @ v.astype(dtype)).sum(
            -1, keepdims=True)
        h = x @ mlp_in.astype(dtype)
        x = x + qx @ out.astype(dtype) + h[:, :f] @ down.astype(dtype) + kv
      logits = x @ head.astype(dtype)
      # Feeds the logits back so no step's work can be hoisted or skipped.
      return x * 0.5 + logits.mean(-1, keepdims=True).astype(dtype)
    return jax.lax.fori_loop(0, steps, step, x)

  x = jnp.ones((batch, cfg.d_model), dtype) * 0.01
  compiled = run.lower(x, layers, head).compile()
  jax.block_until_ready(compiled(x, layers, head))
  t = time.perf_counter()
  jax.block_until_ready(compiled(x, layers, head))
  return (time.perf_counter() - t) / steps


def read_bytes_per_second(nbytes: int = 1 << 29, repeats: int = 5) -> float:
  """The streaming read rate: the best of `repeats` jitted sums over `nbytes` of float32."""
  a = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(a))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(total(a))
    best = min(best, time.perf_counter() - t)
  return nbytes / best


def cache_bytes(cfg: ModelConfig, *, batch: int, filled: int) -> int:
  """Bytes of keys and values a step reads when `filled` slots hold tokens."""
  itemsize = 2 if cfg.dtype == 'bfloat16' else 4
  return 2 * cfg.n_layers * batch * cfg.kv_heads * filled * cfg.head_dim * itemsize


def weight_bytes(params) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params)))
