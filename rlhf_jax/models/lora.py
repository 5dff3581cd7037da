"""LoRA adapters as parameter trees: which kernels can carry them, splitting a model's params
into what trains and what stays frozen, and merging adapters back into their kernels.

A targeted kernel W [*in, *out] (its input axes first, as every Transformer kernel is laid
out) gets A [*in, r] (random) and B [r, *out] (zeros) beside it, named `<kernel>_lora_a`
and `<kernel>_lora_b`; the forward adds (alpha / r) (x A) B to x W (models/transformer.py),
which at init is exactly 0. Merged, the kernel is W + (alpha / r) A B.

Parameter trees are nested dicts of arrays (or of partitioning boxes: a box is a leaf here),
so the same functions split abstract, boxed and concrete trees alike.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

# Kernels by their parameter names in models/transformer.py: attention [D, heads, head_dim]
# (query, key, value) and [heads, head_dim, D] (out); MLP [D, 2, F] (gate_up, gated MLPs),
# [D, F] (up, plain MLPs), [F, D] (down).
TARGETS = ('query', 'key', 'value', 'out', 'gate_up', 'up', 'down')
A_SUFFIX, B_SUFFIX = '_lora_a', '_lora_b'
# Parameters inside a Transformer that its base checkpoint does not have, so they train
# with the adapters: a reward model's prompt/response type embedding (zero at init).
NOT_IN_BASE = ('type_embed',)


def is_adapter(name: str) -> bool:
  return name.endswith(A_SUFFIX) or name.endswith(B_SUFFIX)


def targets_of(block) -> tuple:
  """lora.targets (a comma-separated string, as a command line gives it) as a tuple."""
  return tuple(t.strip() for t in str(block.targets).split(',') if t.strip())


def enabled(config) -> bool:
  """Whether `config` (a stage's) trains adapters: its lora block has rank > 0."""
  return 'lora' in config and config.lora.rank > 0


def adapt(cfg, block):
  """The ModelConfig `cfg` with the adapters of the lora block `block` (rank 0: unchanged)."""
  if block.rank <= 0:
    return cfg
  return dataclasses.replace(cfg, lora_rank=int(block.rank), lora_alpha=float(block.alpha),
                             lora_targets=targets_of(block))


def kernels_of(cfg) -> tuple:
  """The kernel names a model of ModelConfig `cfg` has (TARGETS it can adapt)."""
  return ('query', 'key', 'value', 'out') + (('gate_up',) if cfg.gated else ('up',)) + ('down',)


def _split_lm(tree: dict) -> tuple[dict, dict]:
  trainable, frozen = {}, {}
  for k, v in tree.items():
    if isinstance(v, dict) and k not in NOT_IN_BASE:
      t, f = _split_lm(v)
      if t:
        trainable[k] = t
      if f:
        frozen[k] = f
    elif is_adapter(k) or k in NOT_IN_BASE:
      trainable[k] = v
    else:
      frozen[k] = v
  return trainable, frozen


def split(params: dict, *, lm_keys: tuple | None = None) -> tuple[dict, dict]:
  """(trainable, frozen) parts of a params tree. lm_keys None: the tree is a Transformer's;
  else the top-level entries lm_keys name are Transformers (a reward model's 'trunk', a PPO
  learner's 'policy' and 'critic') and every other entry (heads) trains whole. Inside a
  Transformer the adapters (and NOT_IN_BASE) train, everything else is frozen."""
  if lm_keys is None:
    return _split_lm(dict(params))
  trainable, frozen = {}, {}
  for k, v in params.items():
    if k in lm_keys:
      trainable[k], frozen[k] = _split_lm(dict(v))
    else:
      trainable[k] = v
  return trainable, frozen


def combine(trainable, frozen):
  """The full params tree from split's two parts (frozen None: trainable as it is)."""
  if frozen is None:
    return trainable
  out = dict(frozen)
  for k, v in trainable.items():
    if k in out:
      if not (isinstance(v, dict) and isinstance(out[k], dict)):
        raise ValueError(f'{k!r} is in both the trainable and the frozen params')
      out[k] = combine(v, out[k])
    else:
      out[k] = v
  return out


def delta(a, b, *, scale: float, like):
  """scale * A B shaped like the kernel `like` [*lead, *in, *out], from A [*lead, *in, r]
  and B [*lead, r, *out] (lead: e.g. an ensemble's member axis), in float32."""
  lead = a.ndim + b.ndim - 2 - like.ndim
  r = a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(a.shape[:lead] + (-1, r))
  b2 = b.astype(jnp.float32).reshape(b.shape[:lead] + (r, -1))
  return (scale * jnp.matmul(a2, b2)).reshape(like.shape)


def merge(params: dict, *, scale: float) -> dict:
  """params with every adapted kernel replaced by W + scale * A B (in float32, cast back to
  W's dtype) and the adapters dropped: the tree of the same model without LoRA."""
  out = {}
  for k, v in params.items():
    if is_adapter(k):
      continue
    if isinstance(v, dict):
      out[k] = merge(v, scale=scale)
    elif k + A_SUFFIX in params:
      a, b = params[k + A_SUFFIX], params[k + B_SUFFIX]
      out[k] = (v.astype(jnp.float32) + delta(a, b, scale=scale, like=v)).astype(v.dtype)
    else:
      out[k] = v
  return out


def strip(params: dict) -> dict:
  """params without their adapters (the base model's tree, adapters ignored)."""
  return {k: strip(v) if isinstance(v, dict) else v for k, v in params.items()
          if not is_adapter(k)}


def count(tree) -> tuple[int, int]:
  """(elements, bytes) of the array leaves (or ShapeDtypeStructs) of a pytree."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, 'shape') and hasattr(x, 'dtype')]
  return (sum(math.prod(x.shape) for x in leaves),
          sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))
