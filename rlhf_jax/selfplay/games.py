"""The board games self-play runs on: a registry of pgx environments by config name.

Every game here is a two-player, strictly alternating (a pass is a move), zero-sum pgx env
whose observation is a [H, W, C] board from the view of the player to move, with a bounded
length (pgx ends a Go game at 2 * size^2 plies), so a batch of whole games is one
fixed-length scan, and in a match each side is to move in alternate plies.
"""
import dataclasses

import pgx

from rlhf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Game:
  pgx_id: str
  board: tuple        # (H, W) of the observation
  max_moves: int      # no game lasts longer (pgx's own termination bound)


GAMES = {
    'tic_tac_toe': Game('tic_tac_toe', (3, 3), 9),
    'connect_four': Game('connect_four', (6, 7), 42),
    'go_9x9': Game('go_9x9', (9, 9), 162),
    'go_19x19': Game('go_19x19', (19, 19), 722),
}


def get(name: str) -> Game:
  if name not in GAMES:
    raise UserError(f'unknown game {name!r}; choose one of {", ".join(GAMES)}')
  return GAMES[name]


def make_env(name: str):
  return pgx.make(get(name).pgx_id)


def check_board(*, game: str, board_shape) -> None:
  """A network built for boards of `board_shape` ((H, W); empty = the game's own) cannot
  read another game's board: its dense heads are sized for H * W cells."""
  board = get(game).board
  if board_shape and tuple(board_shape) != board:
    raise UserError(f'network.board_shape={tuple(board_shape)} does not match the board of '
                    f'{game}, {board}; leave it empty to take the game\'s')
