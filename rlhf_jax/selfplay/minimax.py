"""An exact tic-tac-toe solver, computed by the project, and the perfect player built on it.

Board encoding (ours). A board is a tuple of 9 ints, cell i in row-major order
(0 1 2 / 3 4 5 / 6 7 8, the same cell numbering as pgx's action index):
0 = empty, 1 = X (the first mover), 2 = O. The side to move follows from the counts
(X when #X == #O), so a board alone is a position. Its code is sum_i cell_i * 3**i,
in [0, 3**9 = 19683).

Mapping from pgx's `tic_tac_toe` (pgx 2.6, `pgx/_src/games/tic_tac_toe.py`):
- `state._x.board` [9] int32 holds -1 (empty), 0 (colour 0 = X, who always moves first)
  and 1 (O), so our cell = pgx cell + 1. `state._x.color` is the colour to move.
- `state.current_player` (0/1) is the *agent* id and is drawn at random by `env.init`; it
  says nothing about X or O, so it is not used here.
- `state.observation` [3, 3, 2] bool is from the mover's view: plane 0 = the mover's stones,
  plane 1 = the opponent's. The mover is X iff both planes hold as many stones, which is
  how `board_code_from_observation` recovers our absolute encoding without the private
  `_x` field.
- An action is the cell index 0..8, the same as ours.

Values are from the side to move: +1 it wins, 0 draw, -1 it loses, under optimal play by
both sides. There are 5478 reachable positions (terminal ones included), so the whole
game is solved by memoised negamax on first use (well under a second), not at import.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

NUM_CELLS = 9
NUM_CODES = 3 ** NUM_CELLS
LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8),
         (2, 4, 6))
EMPTY_BOARD = (0,) * NUM_CELLS
_POWERS = 3 ** np.arange(NUM_CELLS)


def board_code(*, board) -> int:
  """Base-3 code of a board (9 cells in {0, 1, 2})."""
  return int(np.dot(np.asarray(board, np.int64), _POWERS))


def board_from_code(*, code: int) -> tuple:
  return tuple((code // 3 ** i) % 3 for i in range(NUM_CELLS))


def to_move(board) -> int:
  """1 (X) or 2 (O): whose turn it is on `board`."""
  return 1 if board.count(1) == board.count(2) else 2


def winner(board) -> int:
  """1 or 2 if that side has three in a line, else 0."""
  for a, b, c in LINES:
    if board[a] != 0 and board[a] == board[b] == board[c]:
      return board[a]
  return 0


def is_terminal(board) -> bool:
  return winner(board) != 0 or 0 not in board


def play(board, action: int) -> tuple:
  assert board[action] == 0, (board, action)
  return board[:action] + (to_move(board),) + board[action + 1:]


@functools.cache
def value(board) -> int:
  """Game value of `board` (a tuple) for the side to move, by memoised negamax."""
  if winner(board):
    # Only the player who just moved can have a line, so the mover has lost.
    return -1
  if 0 not in board:
    return 0
  return max(-value(play(board, a)) for a in range(NUM_CELLS) if board[a] == 0)


def optimal_actions(*, board) -> tuple:
  """The moves that keep the mover's game value, in increasing cell order; () if terminal."""
  board = tuple(board)
  if is_terminal(board):
    return ()
  v = value(board)
  return tuple(a for a in range(NUM_CELLS) if board[a] == 0 and -value(play(board, a)) == v)


def perfect_action(*, board) -> int:
  """One optimal move (the lowest-numbered) on a non-terminal board in our encoding.

  Against pgx: `perfect_action(board=tuple(int(c) + 1 for c in state._x.board))`, or
  batched and jitted, `table_action(observation=state.observation)`.
  """
  actions = optimal_actions(board=board)
  if not actions:
    raise ValueError(f'no move on a terminal board: {board}')
  return actions[0]


@functools.cache
def reachable_boards() -> tuple:
  """Every position reachable from the empty board by legal play, terminal ones included,
  in depth-first order."""
  seen, stack, order = {EMPTY_BOARD}, [EMPTY_BOARD], []
  while stack:
    board = stack.pop()
    order.append(board)
    if is_terminal(board):
      continue
    for a in range(NUM_CELLS):
      if board[a] == 0:
        child = play(board, a)
        if child not in seen:
          seen.add(child)
          stack.append(child)
  return tuple(order)


@functools.cache
def tables() -> dict:
  """NumPy tables indexed by board code (entries of unreachable codes are the defaults):
  'reachable' [19683] bool; 'value' [19683] int8 (0 where unreachable);
  'action' [19683] int32, the lowest optimal move, -1 on terminal or unreachable codes;
  'optimal' [19683, 9] bool, the full set of optimal moves."""
  reachable = np.zeros(NUM_CODES, bool)
  values = np.zeros(NUM_CODES, np.int8)
  action = np.full(NUM_CODES, -1, np.int32)
  optimal = np.zeros((NUM_CODES, NUM_CELLS), bool)
  for board in reachable_boards():
    code = board_code(board=board)
    reachable[code] = True
    values[code] = value(board)
    moves = optimal_actions(board=board)
    if moves:
      action[code] = moves[0]
      optimal[code, list(moves)] = True
  return {'reachable': reachable, 'value': values, 'action': action, 'optimal': optimal}


def board_code_from_observation(*, observation: jax.Array) -> jax.Array:
  """pgx tic_tac_toe observations [B, 3, 3, 2] bool -> board codes [B] int32 (see the module
  docstring for why the stone counts tell X from O)."""
  mine = observation[..., 0].reshape(observation.shape[0], NUM_CELLS).astype(jnp.int32)
  theirs = observation[..., 1].reshape(observation.shape[0], NUM_CELLS).astype(jnp.int32)
  mover_is_x = mine.sum(-1) == theirs.sum(-1)
  x = jnp.where(mover_is_x[:, None], mine, theirs)
  o = jnp.where(mover_is_x[:, None], theirs, mine)
  return ((x + 2 * o) * jnp.asarray(_POWERS, jnp.int32)).sum(-1)


def table_action(*, observation: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """The perfect player, batched and jittable: observations [B, 3, 3, 2] -> actions [B]
  int32. Without `key`, the lowest optimal move (deterministic); with it, a uniform draw
  among the optimal moves, so that arena games against it are not all the same game.
  Terminal positions give -1 (deterministic) or an arbitrary cell (keyed)."""
  codes = board_code_from_observation(observation=observation)
  if key is None:
    return jnp.take(jnp.asarray(tables()['action']), codes)
  optimal = jnp.take(jnp.asarray(tables()['optimal']), codes, axis=0)
  return jax.random.categorical(key, jnp.where(optimal, 0.0, -jnp.inf)).astype(jnp.int32)


def table_value(*, observation: jax.Array) -> jax.Array:
  """Exact game value for the side to move, [B, 3, 3, 2] -> [B] int32 in {-1, 0, 1}."""
  codes = board_code_from_observation(observation=observation)
  return jnp.take(jnp.asarray(tables()['value'], jnp.int32), codes)
