"""Advantages and returns of per-token rewards: GAE(gamma, lambda) (Schulman et al. 2016)
over the response tokens of each row, and masked whitening."""
import jax
import jax.numpy as jnp


def gae(rewards, values, mask, *, gamma: float, lam: float):
  """(advantages, returns), each [B, N], from rewards, values and mask [B, N].

  Token t of a row is a step only where mask is 1 (a row's response is a prefix of its N
  columns); the state after the last one is terminal (value 0). With
  delta_t = r_t + gamma V_{t+1} - V_t: A_t = delta_t + gamma lam A_{t+1}, R_t = A_t + V_t.
  """
  rewards, values = rewards * mask, values * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values - values

  def back(carry, x):
    delta, m = x
    carry = (delta + gamma * lam * carry) * m
    return carry, carry

  _, adv = jax.lax.scan(back, jnp.zeros_like(deltas[:, 0]), (deltas.T, mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def whiten(x, mask, *, shift_mean: bool = True):
  """(x - mean) / std over the masked entries (mean kept if not shift_mean); 0 off mask."""
  n = jnp.maximum(mask.sum(), 1.0)
  mean = (x * mask).sum() / n
  var = (((x - mean) * mask) ** 2).sum() / n
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  return (out if shift_mean else out + mean) * mask
