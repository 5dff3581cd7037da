"""TrainState, the optimiser, and creating the state already sharded on the mesh."""
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from rlhf_jax import sharding


@flax.struct.dataclass
class TrainState:
  """step: [] int32 optimiser updates done; params/opt_state: pytrees; rng: [2] uint32 root
  key of the run (a step derives its keys with fold_in(rng, step), so it never changes)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def make_schedule(optim, total_steps: int) -> optax.Schedule:
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.end_lr_ratio)


def member_norms(tree) -> jax.Array:
  """[K] the global norm of each ensemble member's part of `tree`, whose every leaf holds
  member k at [k] (params stacked on a leading member axis)."""
  squares = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
             for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares))


def clip_by_member_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm for each member of an ensemble on its own (leaf[k] is member
  k's), so one member's gradient never rescales another's update. Its state is empty, as
  clip_by_global_norm's is, so the optimiser state has the same shape either way."""
  def update(updates, state, params=None):
    del params
    norms = member_norms(updates)

    def clip(t):
      n = norms.reshape((-1,) + (1,) * (t.ndim - 1))
      return jnp.where(n < max_norm, t, (t / n.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(optim, total_steps: int, *, members: int = 0) -> optax.GradientTransformation:
  """AdamW with warmup + cosine; global-norm clipping; no decay on norms (vectors).

  members > 0: the params are an ensemble stacked on a leading axis of that many members
  (a reward model's), trained as independent models: each member's gradient is clipped by
  its own global norm and the decay mask looks at a member's own leaf shape. (AdamW itself
  is elementwise, so it keeps members apart unaided.)"""
  member_axis = 1 if members > 0 else 0
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim - member_axis >= 2, params)
  clip = clip_by_member_norm if members > 0 else optax.clip_by_global_norm
  parts = [clip(optim.clip_norm)] if optim.clip_norm > 0 else []
  parts.append(optax.adamw(make_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2,
                           eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def abstract_sharded(*, init_params: Callable[[jax.Array], Any],
                     tx: optax.GradientTransformation, rng: jax.Array, mesh,
                     mesh_config) -> tuple[TrainState, Any]:
  """The train state's shapes (`jax.ShapeDtypeStruct`s, nothing allocated) and its
  shardings: layouts come from the parameters' logical axis names, optimiser moments
  live with their parameter. init_params(rng) returns params with partitioning boxes."""
  boxed = jax.eval_shape(init_params, rng)
  param_specs = nn.get_partition_spec(boxed)
  abstract_params = nn.meta.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, abstract_opt, param_specs,
                                    transform_non_params=lambda _: PartitionSpec())
  specs = TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs,
                     rng=PartitionSpec())
  shardings = sharding.logical_shardings(specs, mesh, mesh_config)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt, rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype))
  return abstract, shardings


def create_sharded(*, init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                   rng: jax.Array, mesh, mesh_config) -> tuple[TrainState, Any]:
  """Builds the state directly in its sharded layout: shapes and shardings from
  `abstract_sharded`, then one jitted init with `out_shardings` writes every shard where
  it lives (no full copy on one device). Returns (state, state_shardings)."""
  _, shardings = abstract_sharded(init_params=init_params, tx=tx, rng=rng, mesh=mesh,
                                  mesh_config=mesh_config)

  def init(rng):
    params = nn.meta.unbox(init_params(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng)

  with sharding.activate(mesh, mesh_config):
    state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def state_from_params(params, *, tx: optax.GradientTransformation, rng: jax.Array,
                      shardings) -> TrainState:
  """A step-0 state holding `params` (e.g. loaded from an earlier run) with a fresh
  optimiser state, laid out as `shardings` (a TrainState of shardings) say."""
  def make(params, rng):
    # A copy, so that donating the state never frees the caller's params (jit forwards an
    # argument returned unchanged, buffer and all).
    params = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng)
  return jax.jit(make, out_shardings=shardings)(params, rng)
