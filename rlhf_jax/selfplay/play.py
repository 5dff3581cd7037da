"""Batched self-play: a whole batch of games as one fixed-length `lax.scan`, each ply a
search over the batch, so the batch compiles to one computation.

A slot plays exactly one game from the initial position; once its game is over it idles
(pgx leaves a finished state unchanged) and its later plies are marked invalid. Targets:
the search's action weights (pi) and the final outcome for the player to move at that
ply (z in {-1, 0, +1}; 0 for a game still running after `max_moves`).
"""
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Trajectory:
  """A batch of B games over T = max_moves plies; index [t, b] is ply t of game b.
  observation [T, B, H, W, C] (the env's dtype); action [T, B] int32 (the move played);
  policy [T, B, A] float32 (search weights);
  legal_action_mask [T, B, A] bool; value [T, B] float32 (z for the player to move);
  valid [T, B] bool (the game was still on at ply t); outcome [B] float32 (+1 the first
  mover won, -1 lost, 0 draw or unfinished); length [B] int32 plies played;
  finished [B] bool; root_value [T, B] float32 (the search's value at the root)."""
  observation: jax.Array
  action: jax.Array
  policy: jax.Array
  legal_action_mask: jax.Array
  value: jax.Array
  valid: jax.Array
  outcome: jax.Array
  length: jax.Array
  finished: jax.Array
  root_value: jax.Array


def make_selfplay(*, env, search: Callable, num_games: int, max_moves: int,
                  opening_moves: int = 0, constrain: Callable = lambda x: x) -> Callable:
  """Returns `selfplay(params, key) -> Trajectory` for `num_games` games at once.

  opening_moves: each game opens with a number of uniformly random plies drawn uniformly
  from 0..opening_moves (their positions still get the search's targets), so that the
  network also learns positions its own play would never reach, such as those an opponent
  who plays differently leads it into.

  search: `(params, state, key) -> SearchOutput` (rlhf_jax/selfplay/search.py), whose
  `action` is the move played; constrain: applied to every [B, ...] array of the batch
  state (a sharding constraint that lays games along the mesh's data axis).
  """
  init = jax.vmap(env.init)
  step = jax.vmap(env.step)

  def selfplay(params, key):
    k_init, k_open, k_moves = jax.random.split(key, 3)
    state = jax.tree.map(constrain, init(jax.random.split(k_init, num_games)))
    first = state.current_player  # pgx draws which agent id moves first
    opening = jax.random.randint(k_open, (num_games,), 0, opening_moves + 1)

    def ply(state, xs):
      t, key = xs
      k_search, k_random, k_step = jax.random.split(key, 3)
      out = search(params, state, k_search)
      legal = jnp.where(state.legal_action_mask, 0.0, -jnp.inf)
      action = jnp.where(t < opening, jax.random.categorical(k_random, legal), out.action)
      on = ~(state.terminated | state.truncated)
      record = dict(observation=state.observation, action=action, policy=out.action_weights,
                    legal_action_mask=state.legal_action_mask, mover=state.current_player,
                    valid=on, root_value=out.value)
      state = step(state, action, jax.random.split(k_step, num_games))
      state = jax.tree.map(constrain, state)
      return state, (record, state.rewards)

    state, (rec, rewards) = jax.lax.scan(
        ply, state, (jnp.arange(max_moves), jax.random.split(k_moves, max_moves)))
    returns = rewards.sum(axis=0)  # [B, 2]: each agent's outcome
    finished = state.terminated | state.truncated
    games = jnp.arange(num_games)
    z = jnp.take_along_axis(returns[None], rec['mover'][..., None], axis=-1)[..., 0]
    z = jnp.where(rec['valid'] & finished[None], z, 0.0)
    return Trajectory(
        observation=rec['observation'], action=rec['action'].astype(jnp.int32),
        policy=rec['policy'],
        legal_action_mask=rec['legal_action_mask'], value=z.astype(jnp.float32),
        valid=rec['valid'], outcome=returns[games, first].astype(jnp.float32),
        length=rec['valid'].sum(axis=0).astype(jnp.int32), finished=finished,
        root_value=rec['root_value'])

  return selfplay
