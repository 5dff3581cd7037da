"""rlhf_jax: the whole RLHF feedback loop in JAX/Flax, measured against a ground-truth world."""
from rlhf_jax import xla_defaults as _xla_defaults

_xla_defaults.apply()
