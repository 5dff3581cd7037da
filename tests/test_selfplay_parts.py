"""Self-play's moving parts against independent computations: the games self-play records
(replayed move by move in plain Python), the replay buffer's sampling, the arena's
bookkeeping (perfect vs random against the exact expectation), and the Elo fit (closed
form and a likelihood grid)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pgx
import pytest

from rlhf_jax.selfplay import arena, elo, minimax, networks, play, replay, search


@pytest.fixture(scope='module')
def ttt():
  env = pgx.make('tic_tac_toe')
  net = networks.make_network(name='mlp', num_actions=9, width=16, num_blocks=1)
  params = networks.init_params(network=net, observation_shape=(3, 3, 2),
                                key=jax.random.key(3))
  apply_fn = lambda p, obs: net.apply({'params': p}, obs)
  return env, apply_fn, params


@pytest.fixture(scope='module')
def trajectory(ttt):
  env, apply_fn, params = ttt
  s = search.make_search(env=env, apply_fn=apply_fn, num_simulations=8)
  selfplay = play.make_selfplay(env=env, search=s, num_games=64, max_moves=9,
                                opening_moves=3)
  return jax.device_get(jax.jit(selfplay)(params, jax.random.key(0)))


@pytest.mark.slow
def test_selfplay_records_legal_games_and_their_true_outcomes(trajectory):
  """Replays every recorded game in Python: each move is legal, each observation is the
  board from the mover's side, the game stops exactly at its end, and the value target of
  every ply is the final result for the player to move then."""
  t = trajectory
  for b in range(t.action.shape[1]):
    board, outcomes = minimax.EMPTY_BOARD, []
    for ply in range(9):
      if minimax.is_terminal(board):
        assert not t.valid[ply, b]
        continue
      assert t.valid[ply, b]
      mover = minimax.to_move(board)
      obs = t.observation[ply, b]
      mine = np.array([c == mover for c in board]).reshape(3, 3)
      theirs = np.array([c not in (0, mover) for c in board]).reshape(3, 3)
      np.testing.assert_array_equal(obs[..., 0], mine)
      np.testing.assert_array_equal(obs[..., 1], theirs)
      np.testing.assert_array_equal(t.legal_action_mask[ply, b], [c == 0 for c in board])
      policy = t.policy[ply, b]
      assert abs(policy.sum() - 1) < 1e-5 and (policy[np.array(board) != 0] == 0).all()
      a = int(t.action[ply, b])
      assert board[a] == 0
      outcomes.append((ply, mover))
      board = minimax.play(board, a)
    winner = minimax.winner(board)
    assert t.length[b] == len(outcomes) and t.finished[b]
    assert t.outcome[b] == {0: 0, 1: 1, 2: -1}[winner]
    for ply, mover in outcomes:
      assert t.value[ply, b] == (0 if winner == 0 else (1 if winner == mover else -1))


def test_opening_moves_vary_the_games(trajectory):
  openings = {tuple(trajectory.action[:2, b]) for b in range(trajectory.action.shape[1])}
  assert len(openings) > 20  # 64 games, up to 3 random plies each: many distinct starts


def test_replay_keeps_slots_and_samples_only_valid_positions_uniformly(trajectory):
  t = trajectory
  buffer = replay.empty(slots=3, positions=t.valid.size, observation_shape=(3, 3, 2),
                        observation_dtype=bool, num_actions=9)
  buffer = replay.add(buffer, t, slot=1)
  valid = np.asarray(buffer.valid)
  assert not valid[0].any() and not valid[2].any()
  assert valid[1].sum() == t.valid.sum()
  # Game-major order: position b * T + ply of the slot is ply `ply` of game b.
  b, ply = 5, 2
  np.testing.assert_array_equal(buffer.policy[1, b * 9 + ply], t.policy[ply, b])
  assert buffer.value[1, b * 9 + ply] == t.value[ply, b]
  # Sampling: label every position by its index (in `value`), mark a random subset valid;
  # every draw is valid and the frequencies are uniform over the valid positions
  # (chi-square against a uniform draw's counts, 40k draws).
  slots, n = 3, 200
  mask = np.random.default_rng(0).random((slots, n)) < 0.3
  labelled = replay.Replay(
      observation=jnp.zeros((slots, n, 1)), policy=jnp.zeros((slots, n, 2)),
      legal_action_mask=jnp.ones((slots, n, 2), bool),
      value=jnp.arange(slots * n, dtype=jnp.float32).reshape(slots, n),
      valid=jnp.asarray(mask))
  draws = 40000
  batch = jax.jit(functools.partial(replay.sample, batch_size=draws))(labelled,
                                                                       jax.random.key(1))
  drawn = np.asarray(batch.value).astype(int)
  assert mask.reshape(-1)[drawn].all()
  hits = np.bincount(drawn, minlength=slots * n)[mask.reshape(-1)]
  expected = draws / mask.sum()
  chi2 = ((hits - expected) ** 2 / expected).sum()
  dof = mask.sum() - 1
  assert abs(chi2 - dof) < 5 * np.sqrt(2 * dof)


def test_arena_perfect_vs_random_matches_the_exact_expectation():
  """The perfect player (uniform among optimal moves) against uniform random: the exact
  win and draw probabilities, computed by recursion over the game tree in Python, as X and
  as O; the arena's rates must fall within 4 standard errors over 4000 games."""
  env = pgx.make('tic_tac_toe')
  games = 4000
  match = jax.jit(arena.make_match(
      env=env, act_a=arena.make_actor('perfect', game='tic_tac_toe'),
      act_b=arena.make_actor('random'), num_games=games, max_moves=9))
  result = jax.device_get(match(None, None, jax.random.key(7)))
  assert np.all(result.score >= 0)  # the perfect player never loses

  @functools.cache
  def p_win(board, me):
    w = minimax.winner(board)
    if w or minimax.is_terminal(board):
      return float(w == me)
    moves = (minimax.optimal_actions(board=board) if minimax.to_move(board) == me
             else [a for a in range(9) if board[a] == 0])
    return float(np.mean([p_win(minimax.play(board, a), me) for a in moves]))

  t = arena.tally(result)
  for side, mark in (('first', 1), ('second', 2)):
    p = p_win(minimax.EMPTY_BOARD, mark)
    se = np.sqrt(p * (1 - p) / (games // 2))
    assert abs(t[f'win_as_{side}'] - p) < 4 * se, (side, t, p)
  assert t['loss'] == 0 and abs(t['win'] + t['draw'] - 1) < 1e-12
  assert abs(t['win'] - np.mean(result.score > 0)) < 1e-12
  assert (result.length >= 5).all() and (result.length <= 9).all()


@pytest.mark.slow  # over the quick check's 5 s (5.1-6.5 s on 2 idle cores)
def test_arena_random_openings_and_sides():
  """Two identical deterministic players: without openings every game of a side is the
  same game; with two random plies they differ, and the first mover's results mirror."""
  env = pgx.make('tic_tac_toe')
  first = lambda params, state, key: jnp.argmax(state.legal_action_mask, -1).astype(jnp.int32)
  for openings, min_distinct in ((0, 1), (2, 10)):
    match = jax.jit(arena.make_match(env=env, act_a=first, act_b=first, num_games=200,
                                     max_moves=9, opening_moves=openings))
    r = jax.device_get(match(None, None, jax.random.key(openings)))
    a_first = np.asarray(r.a_first)
    assert a_first[:100].all() and not a_first[100:].any()
    distinct = len({(bool(f), float(s), int(n)) for f, s, n in
                    zip(r.a_first, r.score, r.length)})
    if openings == 0:
      # Both take the lowest empty cell: X 0, O 1, X 2, O 3, X 4, O 5, X 6, and X has the
      # diagonal 2-4-6: the first mover wins every game in 7 plies.
      assert set(np.sign(r.score[:100])) == {1} and set(np.sign(r.score[100:])) == {-1}
      assert (r.length == 7).all()
    else:
      assert distinct >= 2 and len(set(zip(r.score.tolist(), r.length.tolist()))) > 1


def test_elo_single_opponent_matches_the_closed_form():
  for wins, draws, losses, r_opp in ((30, 10, 10, 0.0), (3, 0, 47, 250.0), (50, 0, 0, 100.0)):
    rating = elo.fit(wins=[wins], draws=[draws], losses=[losses], opponent_ratings=[r_opp])
    n = wins + draws + losses + 1
    s = (wins + 0.5 * draws + 0.5) / n
    assert abs(rating - (r_opp + 400 * np.log10(s / (1 - s)))) < 1e-6
  assert abs(elo.expected_score(0.0) - 0.5) < 1e-15
  assert abs(elo.expected_score(400.0) - 10 / 11) < 1e-15


def test_elo_several_opponents_maximises_the_likelihood():
  w, d, l = np.array([40, 10, 2]), np.array([5, 20, 10]), np.array([5, 20, 38])
  r = np.array([0.0, 300.0, 700.0])
  rating = elo.fit(wins=w, draws=d, losses=l, opponent_ratings=r)
  # Log-likelihood of the scores (draws as half a win and half a loss), virtual draws
  # included, on a fine grid: its maximiser agrees with the fit.
  grid = np.linspace(-500, 1500, 200001)
  e = elo.expected_score(grid[:, None] - r[None])
  wins, losses = w + 0.5 * d + 0.5, l + 0.5 * d + 0.5
  ll = (wins * np.log(e) + losses * np.log1p(-e)).sum(-1)
  assert abs(grid[np.argmax(ll)] - rating) < 0.02
