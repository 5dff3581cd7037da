"""The coefficient of the KL penalty in the RLHF reward, by `ppo.kl_control`:

  fixed     beta stays at its initial value.
  adaptive  Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2),
            beta <- beta (1 + e n / horizon), n = rollouts in the batch that measured KL.
"""
import jax.numpy as jnp


def fixed(beta, kl, *, n: int, target: float, horizon: float):
  del kl, n, target, horizon
  return beta


def adaptive(beta, kl, *, n: int, target: float, horizon: float):
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return beta * (1.0 + error * n / horizon)


CONTROLLERS = {'fixed': fixed, 'adaptive': adaptive}
