"""The replay buffer: the positions of the last K iterations of self-play, on device.

Slot k holds one iteration's whole trajectory, flattened game-major ([B, T] -> B * T, so
that games laid along the mesh's data axis stay in contiguous blocks), plus its validity
mask; slots are overwritten in turn. Training samples uniformly among the valid positions
of every slot (`sample`), so an idle ply of a finished game is never a target.
"""
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.selfplay.play import Trajectory


@flax.struct.dataclass
class Replay:
  """K slots of N = B * T positions. observation [K, N, H, W, C]; policy [K, N, A] float32;
  legal_action_mask [K, N, A] bool; value [K, N] float32; valid [K, N] bool."""
  observation: jax.Array
  policy: jax.Array
  legal_action_mask: jax.Array
  value: jax.Array
  valid: jax.Array


@flax.struct.dataclass
class Batch:
  """A training batch of M positions: observation [M, H, W, C]; policy [M, A];
  legal_action_mask [M, A]; value [M]."""
  observation: jax.Array
  policy: jax.Array
  legal_action_mask: jax.Array
  value: jax.Array


def _positions(x: jax.Array) -> jax.Array:
  """[T, B, ...] -> [B * T, ...], game-major."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def empty(*, slots: int, positions: int, observation_shape, observation_dtype,
          num_actions: int) -> Replay:
  return Replay(
      observation=jnp.zeros((slots, positions, *observation_shape), observation_dtype),
      policy=jnp.zeros((slots, positions, num_actions), jnp.float32),
      legal_action_mask=jnp.zeros((slots, positions, num_actions), bool),
      value=jnp.zeros((slots, positions), jnp.float32),
      valid=jnp.zeros((slots, positions), bool))


def add(replay: Replay, trajectory: Trajectory, *, slot) -> Replay:
  """`replay` with slot `slot` (a scalar, may be traced) replaced by `trajectory`."""
  def put(buffer, x):
    return jax.lax.dynamic_update_index_in_dim(buffer, _positions(x), slot, axis=0)
  return Replay(observation=put(replay.observation, trajectory.observation),
                policy=put(replay.policy, trajectory.policy),
                legal_action_mask=put(replay.legal_action_mask, trajectory.legal_action_mask),
                value=put(replay.value, trajectory.value),
                valid=put(replay.valid, trajectory.valid))


def sample(replay: Replay, key: jax.Array, *, batch_size: int) -> Batch:
  """`batch_size` positions drawn uniformly, with replacement, from the valid ones."""
  valid = replay.valid.reshape(-1)
  p = valid / jnp.maximum(valid.sum(), 1)
  index = jax.random.choice(key, valid.shape[0], (batch_size,), p=p)
  take = lambda x: x.reshape(-1, *x.shape[2:])[index]
  return Batch(observation=take(replay.observation), policy=take(replay.policy),
               legal_action_mask=take(replay.legal_action_mask), value=take(replay.value))
