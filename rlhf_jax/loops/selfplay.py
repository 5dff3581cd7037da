"""AlphaZero-style self-play (configs/selfplay.py): from the rules alone, the network plays
itself with search, learns from the games, and is measured in an arena every iteration.

Iteration 0 is the freshly initialised network. Iteration i >= 1: the network of i - 1
plays `selfplay.games` games against itself, one jitted batch laid along the mesh's data
axis (rlhf_jax/selfplay/play.py); they replace the oldest slot of the replay buffer
(selfplay/replay.py); `train.steps` updates on uniform batches of its positions minimise
the AlphaZero loss (selfplay/update.py). Then the arena (selfplay/arena.py) plays each of
`arena.players` ('search': the network with search; 'net': its most likely move) against
the fixed `arena.opponents` and against itself `arena.lags` evaluations earlier, and rates
it (selfplay/elo.py; the uniform-random player is Elo 0).

Layout of DIR:
  checkpoints/          orbax: the train state and the replay buffer after iteration i
  params/iter_<i>.msgpack   each iteration's network, for later arenas
  iterations/iter_<i>_train.json   iteration i's self-play and training figures
  iterations/iter_<i>.json         ... with its arena results (the row of metrics.jsonl)
  metrics.jsonl, elo.png, TensorBoard events (the same rows)
A killed run resumes from its newest checkpoint and, every step being a function of
(seed, iteration), ends with the numbers of an uninterrupted one.

Several processes (one GSPMD program, stages/dispatch.MULTI_PROCESS): games and replay
positions are laid along the data axis of the global mesh, the network is replicated;
every figure is read back through distributed.to_host; process 0 alone writes params/,
iterations/, metrics.jsonl, the events and elo.png (orbax checkpoints: all of them), and
the others wait at a barrier before they read them.
"""
import json
import os
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.loops import records
from rlhf_jax.selfplay import arena, elo, games, networks, play, replay as replay_lib, search
from rlhf_jax.selfplay import update as update_lib
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.loop import NonFiniteLoss
from rlhf_jax.train.state import TrainState

FIXED_OPPONENTS = ('random', 'perfect')
PLAYERS = ('search', 'net')
_SELFPLAY, _TRAIN, _ARENA, _INIT = 1, 2, 3, 4  # fold_in tags of the root key


def _positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UserError(f'{name}={value!r} must be a positive integer')


def last_logged_step(flat: dict) -> int | None:
  """One line per evaluated iteration, the last iteration always evaluated (step i);
  train.steps is the updates of each iteration."""
  n = flat.get('selfplay.iterations')
  return n if isinstance(n, int) else None


def resolve(config) -> None:
  """Every check that needs no devices: names, counts, and the network's board."""
  s, n, a = config.selfplay, config.network, config.arena
  game = games.get(s.game)
  if n.name not in networks.NETWORKS:
    raise UserError(f'network.name={n.name!r} is not one of {networks.NETWORKS}')
  games.check_board(game=s.game, board_shape=n.board_shape)
  if config.search.kind not in search.SEARCHES:
    raise UserError(f'search.kind={config.search.kind!r} is not one of {search.SEARCHES}')
  for name, value in (('search.num_simulations', config.search.num_simulations),
                      ('arena.num_simulations', a.num_simulations),
                      ('search.max_num_considered_actions',
                       config.search.max_num_considered_actions),
                      ('selfplay.iterations', s.iterations), ('selfplay.games', s.games),
                      ('selfplay.buffer_iterations', s.buffer_iterations),
                      ('network.width', n.width), ('network.num_blocks', n.num_blocks),
                      ('train.steps', config.train.steps),
                      ('train.batch_size', config.train.batch_size),
                      ('arena.every', a.every), ('arena.games', a.games)):
    _positive_int(name, value)
  if s.max_moves != -1:
    _positive_int('selfplay.max_moves', s.max_moves)
  if s.max_moves > game.max_moves:
    raise UserError(f'selfplay.max_moves={s.max_moves} exceeds the longest {s.game} game '
                    f'({game.max_moves} plies)')
  if a.games % 2:
    raise UserError(f'arena.games={a.games} must be even: each side moves first in half')
  for player in a.players:
    if player not in PLAYERS:
      raise UserError(f'arena.players has {player!r}; choose from {PLAYERS}')
  if 'random' not in a.opponents:
    raise UserError("arena.opponents must include 'random': it anchors the Elo scale at 0")
  for opponent in a.opponents:
    if opponent not in FIXED_OPPONENTS:
      raise UserError(f'arena.opponents has {opponent!r}; choose from {FIXED_OPPONENTS}')
  if 'perfect' in a.opponents and s.game != 'tic_tac_toe':
    raise UserError(f"arena.opponents: the 'perfect' player is only known for tic_tac_toe, "
                    f'not {s.game}')
  if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in a.lags):
    raise UserError(f'arena.lags={tuple(a.lags)} must be positive integers')
  if a.opening_moves < 0 or s.opening_moves < 0 or s.weight_decay < 0 or config.optim.lr <= 0:
    raise UserError('arena.opening_moves, selfplay.opening_moves and selfplay.weight_decay '
                    'must be >= 0, and optim.lr > 0')


class Engine:
  """The run's compiled pieces, built once: self-play, training, and the arena's matches."""

  def __init__(self, config):
    self.config = c = config
    self.game = games.get(c.selfplay.game)
    self.env = games.make_env(c.selfplay.game)
    self.max_moves = self.game.max_moves if c.selfplay.max_moves == -1 else c.selfplay.max_moves
    self.mesh = sharding.make_mesh(c.mesh)
    dp = sharding.data_parallel_size(self.mesh, c.mesh)
    for name, value in (('selfplay.games', c.selfplay.games),
                        ('train.batch_size', c.train.batch_size)):
      if value % dp:
        raise UserError(f'{name}={value} is not divisible by the {dp} data-parallel devices')
    axis = sharding.batch_sharding(self.mesh, c.mesh).spec[0]
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.along = lambda dim, x: NamedSharding(
        self.mesh, PartitionSpec(*([None] * dim), axis, *([None] * (x.ndim - dim - 1))))
    self.constrain = lambda x: jax.lax.with_sharding_constraint(x, self.along(0, x))
    # Each player of a match moves in half of its games: they are laid along the data axis
    # when the halves divide evenly, and otherwise (e.g. 200 games on 8 devices) left to
    # XLA, which replicates them; a game's moves are the same either way.
    self.arena_constrain = (self.constrain if c.arena.games % (2 * dp) == 0
                            else (lambda x: x))
    self.network = networks.make_network(name=c.network.name, num_actions=self.env.num_actions,
                                         width=c.network.width, num_blocks=c.network.num_blocks)
    self.apply_fn = lambda params, obs: self.network.apply({'params': params}, obs)
    s = c.search
    self.search = search.make_search(
        env=self.env, apply_fn=self.apply_fn, num_simulations=s.num_simulations, kind=s.kind,
        dirichlet_alpha=s.dirichlet_alpha, dirichlet_fraction=s.dirichlet_fraction,
        max_num_considered_actions=s.max_num_considered_actions, gumbel_scale=s.gumbel_scale,
        temperature=s.temperature)
    self.arena_search = search.make_search(
        env=self.env, apply_fn=self.apply_fn, num_simulations=c.arena.num_simulations,
        kind=s.kind, dirichlet_fraction=0.0, gumbel_scale=0.0, temperature=0.0,
        max_num_considered_actions=s.max_num_considered_actions)
    self.tx = update_lib.make_optimizer(c.optim)
    self._compile()
    self._matches = {}

  # -- state -------------------------------------------------------------------------------

  def init_state(self, root) -> dict:
    params = networks.init_params(network=self.network,
                                  observation_shape=self.env.observation_shape,
                                  key=jax.random.fold_in(root, _INIT))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=self.tx.init(params), rng=root)
    probe = self.env.init(jax.random.PRNGKey(0)).observation
    buffer = replay_lib.empty(
        slots=self.config.selfplay.buffer_iterations,
        positions=self.config.selfplay.games * self.max_moves,
        observation_shape=probe.shape, observation_dtype=probe.dtype,
        num_actions=self.env.num_actions)
    return {'train': state, 'replay': buffer}

  def shardings(self, like: dict) -> dict:
    return {'train': jax.tree.map(lambda _: self.replicated, like['train']),
            'replay': jax.tree.map(lambda x: self.along(1, x), like['replay'])}

  # -- compiled steps ----------------------------------------------------------------------

  def _compile(self):
    c = self.config
    selfplay = play.make_selfplay(env=self.env, search=self.search,
                                  num_games=c.selfplay.games, max_moves=self.max_moves,
                                  opening_moves=c.selfplay.opening_moves,
                                  constrain=self.constrain)

    def selfplay_with_stats(params, key):
      t = selfplay(params, key)
      logp = jnp.log(jnp.where(t.policy > 0, t.policy, 1.0))
      entropy = -(t.policy * logp).sum(-1)
      valid = t.valid.astype(jnp.float32)
      stats = {'selfplay/first_mover_win': jnp.mean(t.outcome > 0),
               'selfplay/draw': jnp.mean(t.outcome == 0),
               'selfplay/first_mover_loss': jnp.mean(t.outcome < 0),
               'selfplay/mean_length': jnp.mean(t.length),
               'selfplay/unfinished': jnp.mean(~t.finished),
               'selfplay/target_entropy': (entropy * valid).sum() / valid.sum(),
               'selfplay/root_value_error': (jnp.abs(t.root_value - t.value) * valid).sum()
                                            / valid.sum()}
      return t, stats

    like = jax.eval_shape(self.init_state, jax.random.PRNGKey(0))
    self.like_state = like
    self.state_shardings = self.shardings(like)
    like_traj = jax.eval_shape(selfplay, like['train'].params, jax.random.PRNGKey(0))
    self.selfplay = jax.jit(
        selfplay_with_stats, in_shardings=(self.replicated, self.replicated),
        out_shardings=(jax.tree.map(lambda x: self.along(1, x) if x.ndim > 1
                                    else self.along(0, x), like_traj), self.replicated))
    train_sh, replay_sh = self.state_shardings['train'], self.state_shardings['replay']
    self.add = jax.jit(lambda buffer, trajectory, slot: replay_lib.add(buffer, trajectory,
                                                                       slot=slot),
                       donate_argnums=0, out_shardings=replay_sh)
    step = update_lib.make_step(apply_fn=self.apply_fn, tx=self.tx,
                                batch_size=c.train.batch_size,
                                weight_decay=c.selfplay.weight_decay, constrain=self.constrain)
    self.step = jax.jit(step, donate_argnums=0, out_shardings=(train_sh, self.replicated))

  def match(self, player: str, opponent: str, *, opening_moves: int):
    """The jitted match of `player` against `opponent` (a fixed opponent, or the same
    kind of player with other params), compiled once per run."""
    key = (player, opponent, opening_moves)
    if key not in self._matches:
      actor = lambda kind: arena.make_actor(kind, game=self.config.selfplay.game,
                                            apply_fn=self.apply_fn, search=self.arena_search)
      self._matches[key] = jax.jit(arena.make_match(
          env=self.env, act_a=actor(player), act_b=actor(opponent),
          num_games=self.config.arena.games, max_moves=self.game.max_moves,
          opening_moves=opening_moves, constrain=self.arena_constrain))
    return self._matches[key]


# -- what a run leaves in DIR ----------------------------------------------------------------

def _path(workdir: str, *names: str) -> str:
  return os.path.join(workdir, *names)


def save_params(workdir: str, i: int, params) -> None:
  """Every process calls this alike (the params are read back from the mesh); process 0
  writes."""
  params = distributed.to_host(params)
  if not distributed.is_primary():
    return
  path = _path(workdir, 'params', f'iter_{i}.msgpack')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'wb') as f:
    f.write(flax.serialization.to_bytes(params))
  os.replace(path + '.tmp', path)


def load_params(workdir: str, i: int, like):
  path = _path(workdir, 'params', f'iter_{i}.msgpack')
  try:
    with open(path, 'rb') as f:
      return flax.serialization.from_bytes(like, f.read())
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'{path} cannot be read ({e}); move the run aside and start afresh') \
        from None


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


# -- the loop -----------------------------------------------------------------------------------

def evaluated(config, i: int) -> bool:
  return i % config.arena.every == 0 or i == config.selfplay.iterations


def lag_iteration(config, i: int, lag: int) -> int:
  """The iteration `lag` evaluations before i on the grid of multiples of arena.every
  (always evaluated), or -1 before iteration 0."""
  every = config.arena.every
  k = -(-i // every) - lag  # ceil(i / every) evaluations on the grid, less the lag
  return k * every if k >= 0 else -1


def evaluate(engine: Engine, workdir: str, i: int, params, root) -> dict:
  """Iteration i's arena results and Elo ratings, keyed arena/<player>_vs_<opponent>/*."""
  c = engine.config
  row, like = {}, params
  put = lambda p: distributed.put_global(p, engine.replicated)  # host params onto the mesh
  params = put(params)
  earlier = {}  # iteration -> params: both players meet the same checkpoints
  for p, player in enumerate(c.arena.players):
    results, ratings = [], []
    # (label, opponent kind, its iteration or None, opening plies, a fixed slot for its key)
    opponents = [(name, name, None, 0, o) for o, name in enumerate(c.arena.opponents)]
    for o, lag in enumerate(c.arena.lags):
      j = lag_iteration(c, i, lag)
      if j >= 0:
        opponents.append((f'lag_{lag}', player, j, c.arena.opening_moves,
                          len(FIXED_OPPONENTS) + o))
    for label, kind, j, openings, slot in opponents:
      if j is not None and j not in earlier:
        earlier[j] = put(load_params(workdir, j, like))
      other = params if j is None else earlier[j]
      # Keyed by (iteration, player, opponent slot) only, so that a result does not depend
      # on which other matches were played (arena.every, the lags that exist yet).
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, _ARENA), i),
                               p * 1024 + slot)
      result = engine.match(player, kind, opening_moves=openings)(params, other, key)
      t = arena.tally(distributed.to_host(result))
      row.update({f'arena/{player}_vs_{label}/{k}': v for k, v in t.items()})
      if j is not None:
        row[f'arena/{player}_vs_{label}/iteration'] = j
      if label == 'perfect':
        continue  # its rating is unknown: it does not enter the Elo fit
      rating = 0.0 if j is None else _read_json(
          _path(workdir, 'iterations', f'iter_{j}.json'))[f'elo/{player}']
      n = c.arena.games
      results.append((round(t['win'] * n), round(t['draw'] * n), round(t['loss'] * n)))
      ratings.append(rating)
    w, d, l = zip(*results)
    row[f'elo/{player}'] = elo.fit(wins=w, draws=d, losses=l, opponent_ratings=ratings)
  return row


def run(config, *, workdir: str) -> None:
  engine = Engine(config)  # checks the batch sizes against the devices first
  config_lib.write_or_check(config, workdir)
  root = np.asarray(jax.random.PRNGKey(config.seed))  # host copy: the state's is donated
  ckpt = Checkpointer(_path(workdir, 'checkpoints'), keep=2)
  with sharding.activate(engine.mesh, config.mesh):
    # The newest checkpoint that restores (newer damaged ones are moved aside, with a
    # warning); the iterations after it are recomputed to the same numbers.
    resumed = ckpt.restore_newest(state_shardings=engine.state_shardings,
                                  like_state=engine.like_state)
    if resumed is None:
      run_state = distributed.put_global(engine.init_state(root), engine.state_shardings)
      save_params(workdir, 0, run_state['train'].params)
      ckpt.save(0, state=run_state, data_state={'iteration': 0})
      done = 0
    else:
      done, run_state, _ = resumed
    rows = []
    from tensorboardX import SummaryWriter  # late: slow to import
    tb = SummaryWriter(workdir) if jax.process_index() == 0 else None
    for i in range(config.selfplay.iterations + 1):
      timing = {}
      if i > done:
        run_state, figures, timing = iteration(engine, run_state, i, root)
        records.write_json(_path(workdir, 'iterations', f'iter_{i}_train.json'), figures)
        save_params(workdir, i, run_state['train'].params)
        ckpt.save(i, state=run_state, data_state={'iteration': i})
        done = i
      summary = _path(workdir, 'iterations', f'iter_{i}.json')
      # Looked for before the barrier (no process decides after another has written it);
      # after it, iteration i's params and figures are written.
      evaluate_now = evaluated(config, i) and not os.path.exists(summary)
      distributed.barrier(f'selfplay: iteration {i}')
      if evaluate_now:
        start = time.perf_counter()
        params = load_params(workdir, i, distributed.to_host(run_state['train'].params))
        train_path = _path(workdir, 'iterations', f'iter_{i}_train.json')
        row = {'step': i, **(_read_json(train_path) if i else {}),
               **evaluate(engine, workdir, i, params, root)}
        timing['arena'] = time.perf_counter() - start
        records.write_json(summary, row)
        if tb is not None:
          for k, v in row.items():
            if k != 'step':
              tb.add_scalar(k, v, i)
          tb.flush()
        if distributed.is_primary():
          print(_progress(i, row, timing), flush=True)
      distributed.barrier(f'selfplay: summary of iteration {i}')
      if os.path.exists(summary):
        rows.append(_read_json(summary))
        records.write_metrics(workdir, rows)
    ckpt.close()
    if tb is not None:
      tb.close()
  if distributed.is_primary():
    plot_elo(rows, _path(workdir, 'elo.png'))
    print(table(config, rows), flush=True)


def iteration(engine: Engine, run_state: dict, i: int, root):
  """Self-play with the network of i - 1, then training: iteration i."""
  c = engine.config
  start = time.perf_counter()
  key = jax.random.fold_in(jax.random.fold_in(root, _SELFPLAY), i)
  trajectory, stats = engine.selfplay(run_state['train'].params, key)
  jax.block_until_ready(trajectory)
  mid = time.perf_counter()
  key = jax.random.fold_in(jax.random.fold_in(root, _TRAIN), i)
  slot = jnp.int32((i - 1) % c.selfplay.buffer_iterations)
  buffer = engine.add(run_state['replay'], trajectory, slot)
  state, terms = update_lib.train(engine.step, run_state['train'], buffer, key,
                                  steps=c.train.steps)
  run_state = {'train': state, 'replay': buffer}
  stats, terms, positions = distributed.to_host((stats, terms, buffer.valid.sum()))
  figures = {k: float(v) for k, v in stats.items()}
  figures.update({f'train/{k}': float(v) for k, v in terms.items()})
  figures['replay/positions'] = int(positions)
  if not np.isfinite(figures['train/total']):
    raise NonFiniteLoss(f'iteration {i}: the training loss is {figures["train/total"]}')
  return run_state, figures, {'selfplay': mid - start, 'train': time.perf_counter() - mid}


def _progress(i: int, row: dict, timing: dict) -> str:
  elos = ' '.join(f'{k}={v:.0f}' for k, v in row.items() if k.startswith('elo/'))
  times = ' '.join(f'{k} {v:.1f}s' for k, v in timing.items())
  return f'selfplay: iteration {i}: {elos} ({times})'


def table(config, rows: list[dict]) -> str:
  cols = [('loss', 'train/total', '{:.3f}'), ('length', 'selfplay/mean_length', '{:.2f}')]
  for player in config.arena.players:
    cols.append((f'Elo {player}', f'elo/{player}', '{:.0f}'))
    cols.append((f'{player}>rand', f'arena/{player}_vs_random/win', '{:.3f}'))
    if 'perfect' in config.arena.opponents:
      cols.append((f'{player} lost', f'arena/{player}_vs_perfect/loss', '{:.3f}'))
  return records.table(rows, label='iter', cols=cols, width=12)


def plot_elo(rows: list[dict], path: str) -> None:
  import matplotlib  # late: slow to import, and only the figure needs it
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for key in sorted({k for row in rows for k in row if k.startswith('elo/')}):
    points = [(row['step'], row[key]) for row in rows if key in row]
    ax.plot(*zip(*points), marker='o', label=key.split('/', 1)[1])
  ax.axhline(0.0, color='grey', lw=0.8, ls='--', label='uniform random')
  ax.set_xlabel('iteration')
  ax.set_ylabel('Elo')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path + '.tmp.png', dpi=120)
  plt.close(fig)
  os.replace(path + '.tmp.png', path)
