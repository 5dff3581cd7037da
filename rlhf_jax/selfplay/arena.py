"""The arena: batched, jitted matches between two players, and their win/draw/loss tally.

A player is `act(params, state, key) -> action [B]` over a batch of pgx states
(`make_actor`): 'random' (uniform over legal moves), 'perfect' (the exact tic-tac-toe
solver, rlhf_jax/selfplay/minimax.py; uniform among optimal moves), 'net' (the network's
most likely legal move, no search) and 'search' (the move a deterministic search picks:
gumbel_muzero with no Gumbel noise, or muzero with no root noise, greedy in visits).
In a match, player A moves first in the first half of the games and second in the other
half (each player searches only the half where it is to move); the first `opening_moves` plies of every game are uniformly random, which makes
games between two deterministic players differ.
"""
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.selfplay import minimax

ACTORS = ('random', 'perfect', 'net', 'search')


@flax.struct.dataclass
class MatchResult:
  """score [G] float32: A's outcome (+1 win, 0 draw or unfinished, -1 loss);
  a_first [G] bool: A made the first move; length [G] int32 plies played."""
  score: jax.Array
  a_first: jax.Array
  length: jax.Array


def random_action(state, key) -> jax.Array:
  return jax.random.categorical(
      key, jnp.where(state.legal_action_mask, 0.0, -jnp.inf)).astype(jnp.int32)


def make_actor(kind: str, *, game: str = '', apply_fn: Callable | None = None,
               search: Callable | None = None) -> Callable:
  """`act(params, state, key) -> action [B] int32` for player `kind` (one of ACTORS);
  params are ignored by 'random' and 'perfect'."""
  if kind == 'random':
    return lambda params, state, key: random_action(state, key)
  if kind == 'perfect':
    if game != 'tic_tac_toe':
      raise UserError(f'the perfect player is only known for tic_tac_toe, not {game!r}')
    return lambda params, state, key: minimax.table_action(observation=state.observation,
                                                           key=key)

  if kind == 'net':
    def act(params, state, key):
      logits, _ = apply_fn(params, state.observation)
      return jnp.argmax(jnp.where(state.legal_action_mask, logits, -jnp.inf),
                        axis=-1).astype(jnp.int32)
    return act
  if kind == 'search':
    return lambda params, state, key: search(params, state, key).action
  raise UserError(f'unknown player {kind!r}; choose one of {", ".join(ACTORS)}')


def make_match(*, env, act_a: Callable, act_b: Callable, num_games: int, max_moves: int,
               opening_moves: int = 0, constrain: Callable = lambda x: x) -> Callable:
  """Returns `match(params_a, params_b, key) -> MatchResult` for `num_games` (even) games
  played at once: A moves first in the first half of them.

  Turns alternate in every game here (games.GAMES), so on each ply one half of the batch
  has A to move and the other B: each player runs on its half only, not on all games."""
  init = jax.vmap(env.init)
  step = jax.vmap(env.step)
  half = num_games // 2
  a_first = jnp.arange(num_games) < half

  def match(params_a, params_b, key):
    k_init, k_moves = jax.random.split(key)
    state = jax.tree.map(constrain, init(jax.random.split(k_init, num_games)))
    # pgx draws which agent id moves first; A takes that id in the first half of the games.
    a_id = jnp.where(a_first, state.current_player, 1 - state.current_player)
    games = jnp.arange(num_games)

    def ply(carry, xs):
      state, score = carry
      t, key = xs
      k_a, k_b, k_open, k_step = jax.random.split(key, 4)
      a_on_first = t % 2 == 0  # A is to move in the first half on even plies
      pick = lambda x, y: jax.tree.map(lambda u, v: jnp.where(a_on_first, u, v), x, y)
      first = jax.tree.map(lambda x: x[:half], state)
      second = jax.tree.map(lambda x: x[half:], state)
      a_action = act_a(params_a, pick(first, second), k_a)
      b_action = act_b(params_b, pick(second, first), k_b)
      action = jnp.concatenate([pick(a_action, b_action), pick(b_action, a_action)])
      action = jnp.where(t < opening_moves, random_action(state, k_open), action)
      on = ~(state.terminated | state.truncated)
      state = jax.tree.map(constrain, step(state, action, jax.random.split(k_step, num_games)))
      return (state, score + state.rewards[games, a_id]), on

    (state, score), on = jax.lax.scan(
        ply, (state, jnp.zeros(num_games, jnp.float32)),
        (jnp.arange(max_moves), jax.random.split(k_moves, max_moves)))
    return MatchResult(score=score, a_first=a_first, length=on.sum(0).astype(jnp.int32))

  return match


def tally(result: MatchResult) -> dict:
  """Win, draw and loss rates of A overall, and its win and loss rates as first and as
  second mover."""
  score, first = np.asarray(result.score), np.asarray(result.a_first)
  out = {'win': float(np.mean(score > 0)), 'draw': float(np.mean(score == 0)),
         'loss': float(np.mean(score < 0))}
  for name, side in (('first', first), ('second', ~first)):
    for outcome, sign in (('win', 1), ('loss', -1)):
      out[f'{outcome}_as_{name}'] = float(np.mean(np.sign(score[side]) == sign)) \
          if side.any() else 0.0
  return out
