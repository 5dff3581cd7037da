"""The preference-loss family against float64 NumPy: every loss and its gradient on random
log-probs and lengths (finite differences of the NumPy formula, not jax's autodiff), the
limits the papers state, and the KTO partners."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.train import preference_losses as pl

HP = dict(beta=0.7, tau=0.3, epsilon=0.2, gamma=0.4, desirable_weight=1.3,
          undesirable_weight=0.8, orpo_lambda=0.5)


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_loss(name, pc, pr, rc, rr, nc, nr, w, klp, klr, hp):
  """The papers' formulas in float64, written from their definitions."""
  b, t, e, g = hp['beta'], hp['tau'], hp['epsilon'], hp['gamma']
  h = (pc - rc) - (pr - rr)
  if name == 'dpo':
    return -_logsig(b * h)
  if name == 'ipo':
    return (h - 1 / (2 * t)) ** 2
  if name == 'ipo_mean':
    return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * t)) ** 2
  if name == 'cdpo':
    return -(1 - e) * _logsig(b * h) - e * _logsig(-b * h)
  if name == 'robust_dpo':
    return ((1 - e) * -_logsig(b * h) - e * -_logsig(-b * h)) / (1 - 2 * e)
  if name == 'hinge':
    return np.maximum(0.0, 1 - b * h)
  if name == 'kto':
    z0 = max(0.0, float(((klp - klr) * w).sum() / w.sum()))
    return (hp['desirable_weight'] * (1 - _sig(b * ((pc - rc) - z0)))
            + hp['undesirable_weight'] * (1 - _sig(b * (z0 - (pr - rr)))))
  if name == 'orpo':
    pw, pl_ = np.exp(pc / nc), np.exp(pr / nr)
    log_or = np.log(pw / (1 - pw)) - np.log(pl_ / (1 - pl_))
    return -pc / nc - hp['orpo_lambda'] * _logsig(log_or)
  if name == 'simpo':
    return -_logsig(b * (pc / nc - pr / nr) - g)
  if name == 'apo_zero':
    return (1 - _sig(b * (pc - rc))) + _sig(b * (pr - rr))
  raise KeyError(name)


def _inputs(seed=0, n=24):
  rng = np.random.default_rng(seed)
  nc, nr = (rng.integers(1, 40, n).astype(np.float64) for _ in range(2))
  # Per-token log-probs in (-4, -0.05): every average probability is below 1 (ORPO's odds).
  pc, pr = (-rng.uniform(0.05, 4.0, n) * m for m in (nc, nr))
  rc, rr = pc + rng.normal(0, 2, n), pr + rng.normal(0, 2, n)
  w = (rng.uniform(size=n) > 0.2).astype(np.float64)
  klp = rng.normal(-30, 3, n)
  klr = klp - rng.normal(0.5, 1.0, n)        # a positive mean: z0 > 0 on most draws
  return pc, pr, rc, rr, nc, nr, w, klp, klr


def _jax_loss(name, pc, pr, rc, rr, nc, nr, w, klp, klr, hp):
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  lp = pl.PairLogps(policy_chosen=f32(pc), policy_rejected=f32(pr), ref_chosen=f32(rc),
                    ref_rejected=f32(rr), chosen_length=f32(nc), rejected_length=f32(nr),
                    weight=f32(w), kl_policy=f32(klp), kl_ref=f32(klr))
  return pl.per_pair_loss(name, lp, hp)


@pytest.mark.parametrize('name', sorted(pl.LOSSES))
def test_loss_and_gradient_match_float64_numpy(name):
  args = _inputs(seed=sorted(pl.LOSSES).index(name))
  np.testing.assert_allclose(_jax_loss(name, *args, HP), numpy_loss(name, *args, HP),
                             rtol=2e-5, atol=2e-6)
  # d loss / d (policy chosen, policy rejected) by central differences of the float64
  # formula; the loss depends on each pair's own log-probs (and KTO's z0 on no policy input).
  grad = jax.grad(lambda a, b: _jax_loss(name, a, b, *args[2:], HP).sum(), argnums=(0, 1))(
      jnp.asarray(args[0], jnp.float32), jnp.asarray(args[1], jnp.float32))
  eps = 1e-6
  for k in (0, 1):
    up, down = list(args), list(args)
    up[k], down[k] = args[k] + eps, args[k] - eps
    fd = (numpy_loss(name, *up, HP) - numpy_loss(name, *down, HP)) / (2 * eps)
    np.testing.assert_allclose(grad[k], fd, rtol=1e-3, atol=1e-5)


def test_smoothing_at_epsilon_zero_is_dpo_and_robust_dpo_is_unbiased():
  args = _inputs(seed=7)
  dpo = numpy_loss('dpo', *args, HP)
  for name in ('cdpo', 'robust_dpo'):
    np.testing.assert_allclose(_jax_loss(name, *args, {**HP, 'epsilon': 0.0}), dpo, rtol=1e-5)
  # Robust DPO is unbiased under flips: its expectation over a label flipped with
  # probability eps is the clean DPO loss (Chowdhury et al. 2024, Lemma 3.1).
  flipped = list(args)
  flipped[0], flipped[1], flipped[2], flipped[3] = args[1], args[0], args[3], args[2]
  e = 0.2
  expected = ((1 - e) * _jax_loss('robust_dpo', *args, HP)
              + e * _jax_loss('robust_dpo', *flipped, HP))
  np.testing.assert_allclose(expected, dpo, rtol=1e-4, atol=1e-6)


def test_simpo_margin_moves_the_boundary_by_gamma_over_beta():
  n = np.array([5.0, 9.0])
  beta, gamma = 2.0, 0.6
  a_l = np.array([-1.5, -2.0])
  at_boundary = (a_l + gamma / beta) * n       # a_w - a_l = gamma / beta exactly
  lp = pl.PairLogps(policy_chosen=jnp.asarray(at_boundary), policy_rejected=jnp.asarray(a_l * n),
                    ref_chosen=jnp.zeros(2), ref_rejected=jnp.zeros(2), chosen_length=n,
                    rejected_length=n, weight=jnp.ones(2))
  np.testing.assert_allclose(pl.simpo(lp, beta=beta, gamma=gamma), np.log(2.0), rtol=1e-5)
  np.testing.assert_allclose(pl.simpo(lp, beta=beta, gamma=0.0),
                             -_logsig(beta * gamma / beta), rtol=1e-5)


def test_ipo_sums_and_ipo_mean_averages():
  # Equal per-token log-ratios on responses of 2 and 8 tokens: the summed margin grows with
  # length, the averaged one does not.
  n = jnp.array([2.0, 8.0])
  lp = pl.PairLogps(policy_chosen=0.5 * n, policy_rejected=jnp.zeros(2), ref_chosen=jnp.zeros(2),
                    ref_rejected=jnp.zeros(2), chosen_length=n, rejected_length=n,
                    weight=jnp.ones(2))
  np.testing.assert_allclose(pl.margin(lp), [1.0, 4.0])
  np.testing.assert_allclose(pl.mean_margin(lp), [0.5, 0.5])


def test_kto_reference_point_is_clamped_at_zero_and_carries_no_gradient():
  args = list(_inputs(seed=3))
  args[8] = args[7] + 5.0                     # policy below the reference: estimate < 0
  lp = lambda klp: pl.PairLogps(*(jnp.asarray(a, jnp.float32) for a in args[:7]),
                                kl_policy=klp, kl_ref=jnp.asarray(args[8], jnp.float32))
  assert float(pl.kto_reference_point(lp(jnp.asarray(args[7], jnp.float32)))) == 0.0
  g = jax.grad(lambda k: pl.kto_reference_point(lp(k - 10.0)))(jnp.asarray(args[7], jnp.float32))
  np.testing.assert_array_equal(g, 0.0)


def test_kto_partners_pair_every_row_with_another_prompt():
  prompt_id = np.repeat(np.arange(20), 6)        # 6 pairs per prompt, as the world's k = 4
  partner = pl.kto_partners(prompt_id, seed=0)
  assert (prompt_id[partner] != prompt_id).all()
  np.testing.assert_array_equal(partner, pl.kto_partners(prompt_id, seed=0))


def test_kto_with_its_reference_point_at_zero_is_apo_zero():
  """With paired data, w_D = w_U = 1 and z0 = 0 (the clamp), KTO's loss is APO-zero's:
  1 - sigmoid(-x) = sigmoid(x). On tiny the KL estimate stays below 0 (z0 = 0 at every
  logged step), so the two train alike there."""
  args = list(_inputs(seed=11))
  args[8] = args[7] + 1.0                       # estimate -1 < 0: z0 = 0
  hp = {**HP, 'desirable_weight': 1.0, 'undesirable_weight': 1.0}
  np.testing.assert_allclose(_jax_loss('kto', *args, hp), _jax_loss('apo_zero', *args, hp),
                             rtol=1e-6, atol=1e-6)
