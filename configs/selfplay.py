r"""AlphaZero-style self-play from the rules alone: games from pgx, search from mctx, a Flax
policy-value network, and the loop self-play -> train -> arena (rlhf_jax/loops/selfplay.py).

  python -m rlhf_jax.main --config=configs/selfplay.py:tic_tac_toe --workdir=runs/ttt

Variants:
  tic_tac_toe   MLP 2 x 128, gumbel search with 64 simulations, 512 games and 200 updates of
                256 positions per iteration, 15 iterations; about 70 s on a 2-core CPU.
                Expected: with search it never loses to the perfect minimax player (200
                games, either side) from iteration 2 or so, and wins about 99% of its games
                against random as first mover and 90-95% as second (in expectation no player
                that never loses does better than 99.5% and 91.6%); its Elo rises, then flattens once it draws everything it meets.
  connect_four  residual net 4 x 32, 32 simulations, 128 games per iteration, 10 iterations;
                about 8 minutes on a 2-core CPU. Expected: the Elo with and without search
                rises; each checkpoint beats itself 4 iterations earlier more often than not.
  go_9x9        pod-sized: residual net 10 x 128, 128 simulations, 1024 games per iteration
                over the mesh's data axis, arena every 5 iterations. Not run to the end
                here (one iteration takes hours on a CPU), so no runtime or result is
                claimed; expected: the Elo against earlier checkpoints rises.

Any leaf can be overridden: --config.search.kind=muzero --config.search.num_simulations=64.
A rerun of the same command resumes; `selfplay.iterations` may be raised to continue a
finished run (the learning rate is constant, so nothing else changes).
"""
import ml_collections

from rlhf_jax.config import mesh_block

VARIANTS = ('tic_tac_toe', 'connect_four', 'go_9x9')


def get_config(arg: str = 'tic_tac_toe'):
  if arg not in VARIANTS:
    raise ValueError(f'unknown variant {arg!r} of configs/selfplay.py; choose one of '
                     f'{", ".join(VARIANTS)}')
  config = ml_collections.ConfigDict(dict(
      stage='selfplay',
      seed=0,
      mesh=mesh_block(),       # games and training positions are laid along 'data'
      selfplay=dict(
          game=arg,            # 'tic_tac_toe' | 'connect_four' | 'go_9x9' | 'go_19x19'
          iterations=15,       # self-play -> train -> arena rounds after iteration 0 (init)
          games=512,           # games played at once per iteration (one jitted batch)
          max_moves=-1,        # plies per game; -1: the game's own bound (none is cut)
          opening_moves=3,     # a game opens with 0..opening_moves uniformly random plies
          buffer_iterations=4,  # the replay buffer keeps this many iterations' positions
          weight_decay=1e-4,   # c in the AlphaZero loss's c * ||theta||^2
      ),
      network=dict(
          name='mlp',          # 'mlp' | 'resnet'
          width=128,           # hidden units (mlp) or channels (resnet)
          num_blocks=2,        # hidden layers (mlp) or residual blocks (resnet)
          board_shape=(),      # (H, W) the network is built for; () = the game's board
      ),
      search=dict(
          kind='gumbel',       # 'gumbel' (mctx.gumbel_muzero_policy) | 'muzero' (PUCT)
          num_simulations=64,
          max_num_considered_actions=16,  # gumbel: root actions sequential halving starts with
          gumbel_scale=1.0,    # gumbel: exploration noise in self-play (0 in the arena)
          dirichlet_alpha=0.3,  # muzero: root noise in self-play (none in the arena)
          dirichlet_fraction=0.25,
          temperature=1.0,     # muzero: act by visit counts ** (1 / temperature)
      ),
      optim=dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0),
      train=dict(
          steps=200,           # optimiser updates per iteration
          batch_size=256,      # positions per update, drawn uniformly from the buffer
      ),
      arena=dict(
          every=1,             # evaluate every k-th iteration (and the last)
          games=200,           # per pairing; the current player moves first in half
          num_simulations=64,  # search of the 'search' player
          players=('search', 'net'),  # the current network with and without search
          opponents=('random', 'perfect'),  # fixed opponents ('perfect': tic_tac_toe only)
          lags=(1, 4),         # also the same player k evaluations earlier
          opening_moves=1,     # random plies opening games between two checkpoints
      ),
  ))
  if arg == 'connect_four':
    config.selfplay.update(iterations=10, games=128)
    config.network.update(name='resnet', width=32, num_blocks=4)
    config.train.update(steps=100, batch_size=256)
    config.arena.update(games=100, num_simulations=32, opponents=('random',),
                        opening_moves=2)
  elif arg == 'go_9x9':
    config.selfplay.update(iterations=200, games=1024, buffer_iterations=8)
    config.network.update(name='resnet', width=128, num_blocks=10)
    config.search.update(num_simulations=128, max_num_considered_actions=32)
    config.train.update(steps=500, batch_size=2048)
    config.optim.update(lr=2e-4)
    config.arena.update(every=5, games=256, num_simulations=128, opponents=('random',),
                        opening_moves=4)
  return config
