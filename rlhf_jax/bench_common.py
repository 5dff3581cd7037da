"""What the decoding benches share: timing a compiled program, its static memory, world
prompts, and a model with a known stopping rate (ragged response lengths)."""
import time

import jax
import numpy as np

from rlhf_jax import sampling
from rlhf_jax.errors import UserError


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def measure(fn, args, *, repeats: int = 1) -> dict:
  """Compile once (timed apart), then the best of `repeats` steady-state calls."""
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(*args))  # warm: first-call allocations
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - t)
  return {'compile_s': compile_s, 'run_s': best, 'out': out, 'compiled': compiled,
          'peak_bytes': peak_bytes(compiled)}


def step_seconds(m: dict, args_at, steps: int) -> float:
  """(time of `steps` decode steps - time of the prefill alone) / steps, best of two."""
  prefill = min(_timed(m['compiled'], args_at(0)) for _ in range(2))
  return (m['run_s'] - prefill) / steps


def _timed(compiled, args) -> float:
  t = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - t


def world_prompts(lang, rows: int, length: int):
  """Prefixes of true sequences of the language `lang`, BOS included, at most `length`
  tokens, left-padded."""
  from rlhf_jax.world import language
  seqs = np.asarray(language.sample(lang, key=jax.random.key(1),
                                    batch_size=rows, seq_len=length))
  return sampling.left_pad([[int(t) for t in row if t > 2 or t == 1][:length] for row in seqs],
                           length=length)


def stop_probability(mean_fraction: float, n: int) -> float:
  """p with E[min(L, n)] = mean_fraction * n for L geometric on 1, 2, ...:
  E = (1 - (1 - p)^n) / p, decreasing in p; by bisection."""
  lo, hi = 1e-9, 1.0
  for _ in range(100):
    p = (lo + hi) / 2
    lo, hi = (p, hi) if (1 - (1 - p) ** n) / p > mean_fraction * n else (lo, p)
  return (lo + hi) / 2


def with_stopping_rate(params, cfg, *, p: float, eos_id: int):
  """params whose model ends a row with probability about p per step (bench_ragged.py says how)."""
  if cfg.tie_embeddings or cfg.norm != 'rms' or cfg.norm_offset:
    raise UserError('the ragged bench sets the stopping rate through untied output weights '
                    'and an RMS final norm (the default model)')
  params = jax.tree.map(lambda x: x, params)
  c, d = 0, cfg.d_model
  b = float(np.log(p / (1 - p) * (cfg.vocab_size - 1)))
  embed = params['embed']['embedding']
  params['embed']['embedding'] = embed.at[:, c].set(1000.0)
  kernel = params['logits']['kernel'].at[c].set(0.0)
  params['logits']['kernel'] = kernel.at[c, eos_id].set(b / d ** 0.5)
  return params
