"""Batched, jittable tree search over a pgx environment with mctx.

The tree's embeddings are pgx states themselves: the search plans with the true rules, as
AlphaZero does, and the network only supplies priors and leaf values. Values are always
from the view of the player to move at that node; in a two-player zero-sum game with
alternating turns the next node's mover is the opponent, hence discount -1 (and 0 once
the game is over, where pgx leaves `rewards` as the only signal).
"""
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import mctx

from rlhf_jax.errors import UserError

SEARCHES = ('gumbel', 'muzero')


@flax.struct.dataclass
class SearchOutput:
  """action: [B] int32, the move to play (never illegal at a non-terminal root).
  action_weights: [B, A] float32, the policy target pi; sums to 1, 0 on illegal actions.
  value: [B] float32, the root's search value for the player to move."""
  action: jax.Array
  action_weights: jax.Array
  value: jax.Array


def _mask_logits(logits, legal_action_mask):
  # A finite floor, not -inf: at a terminal node pgx marks every action legal, but mctx
  # may still softmax rows it never expands, and -inf everywhere would give NaNs.
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  return jnp.where(legal_action_mask, logits, jnp.finfo(logits.dtype).min)


def make_search(*, env, apply_fn: Callable, num_simulations: int, kind: str = 'gumbel',
                dirichlet_alpha: float = 0.3, dirichlet_fraction: float = 0.25,
                max_num_considered_actions: int = 16, gumbel_scale: float = 1.0,
                temperature: float = 1.0, max_depth: int | None = None) -> Callable:
  """Returns `search(params, state, key) -> SearchOutput` for a batch of pgx states [B].

  env: a pgx two-player alternating zero-sum env (`pgx.make(...)`); apply_fn:
  (params, observation [B, ...]) -> (logits [B, A], value [B]), e.g. `network.apply`
  bound to `{'params': ...}` by the caller. kind: 'gumbel' (mctx.gumbel_muzero_policy,
  with `max_num_considered_actions` and `gumbel_scale`) or 'muzero' (mctx.muzero_policy:
  PUCT with Dirichlet(`dirichlet_alpha`) noise mixed into the root prior at
  `dirichlet_fraction`, acting by visit counts at `temperature`).
  """
  if kind not in SEARCHES:
    raise UserError(f'unknown search kind {kind!r}; choose one of {", ".join(SEARCHES)}')
  if isinstance(num_simulations, bool) or int(num_simulations) != num_simulations \
      or num_simulations < 1:
    raise UserError(f'num_simulations must be a positive integer, got {num_simulations!r}')
  if max_num_considered_actions < 1:
    raise UserError('max_num_considered_actions must be >= 1, got '
                    f'{max_num_considered_actions!r}')
  if not 0.0 <= dirichlet_fraction <= 1.0 or dirichlet_alpha <= 0.0:
    raise UserError('need 0 <= dirichlet_fraction <= 1 and dirichlet_alpha > 0, got '
                    f'{dirichlet_fraction!r} and {dirichlet_alpha!r}')
  num_simulations = int(num_simulations)
  step = jax.vmap(env.step)

  def recurrent_fn(params, key, action, state):
    mover = state.current_player
    keys = jax.random.split(key, action.shape[0])
    state = step(state, action, keys)
    logits, value = apply_fn(params, state.observation)
    batch = jnp.arange(action.shape[0])
    reward = state.rewards[batch, mover]
    # The game's outcome is already in `reward`; a terminal node has no value of its own.
    value = jnp.where(state.terminated, 0.0, value)
    discount = jnp.where(state.terminated, 0.0, -1.0)
    out = mctx.RecurrentFnOutput(reward=reward.astype(jnp.float32),
                                 discount=discount.astype(jnp.float32),
                                 prior_logits=_mask_logits(logits, state.legal_action_mask),
                                 value=value.astype(jnp.float32))
    return out, state

  def search(params, state, key):
    logits, value = apply_fn(params, state.observation)
    root = mctx.RootFnOutput(prior_logits=_mask_logits(logits, state.legal_action_mask),
                             value=value.astype(jnp.float32), embedding=state)
    invalid_actions = ~state.legal_action_mask
    if kind == 'gumbel':
      out = mctx.gumbel_muzero_policy(
          params=params, rng_key=key, root=root, recurrent_fn=recurrent_fn,
          num_simulations=num_simulations, invalid_actions=invalid_actions,
          max_depth=max_depth, max_num_considered_actions=max_num_considered_actions,
          gumbel_scale=gumbel_scale)
    else:
      out = mctx.muzero_policy(
          params=params, rng_key=key, root=root, recurrent_fn=recurrent_fn,
          num_simulations=num_simulations, invalid_actions=invalid_actions,
          max_depth=max_depth, dirichlet_alpha=float(dirichlet_alpha),
          dirichlet_fraction=float(dirichlet_fraction), temperature=temperature)
    return SearchOutput(action=out.action.astype(jnp.int32),
                        action_weights=out.action_weights,
                        value=out.search_tree.summary().value)

  return search
