"""The distillation-loss family against float64 NumPy written from the definitions
(probabilities, not log-space tricks): every loss and its gradient (central finite
differences of the NumPy formula, not jax's autodiff), gkd's limits, the top-k teacher's
coarse-grained (k + 1 bucket) divergences, and a student equal to its teacher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.errors import UserError
from rlhf_jax.train import distill_losses as dl

B, T, V = 2, 3, 7
ALPHA, BETA = 0.3, 0.3
NAMES = ('kd', 'reverse_kl', 'gkd', 'seq_kd', 'ce')
DIVERGENCES = ('kd', 'reverse_kl', 'gkd')  # the losses that read the teacher


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _kl(p, q):
  return (p * np.log(p / q)).sum(-1)


def _jsd(p, q, beta):
  m = beta * p + (1 - beta) * q
  return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _coarse(p, idx):
  """p over the kept tokens idx [B, T, k] and one bucket holding the rest of the mass."""
  kept = np.take_along_axis(p, idx, -1)
  return np.concatenate([kept, 1 - kept.sum(-1, keepdims=True)], -1)


def numpy_per_token(name, s, t, targets, *, tau, alpha=ALPHA, beta=BETA, k=None):
  """[B, T] float64; k: the teacher's top k (by logit) coarse-grained, else the full V."""
  ce = -np.log(np.take_along_axis(_softmax(s), targets[..., None], -1)[..., 0])
  if name in ('seq_kd', 'ce'):  # cross-entropy on the given tokens, no teacher
    return ce
  p, q = _softmax(t / tau), _softmax(s / tau)
  if k is not None:
    idx = np.argsort(-t, -1)[..., :k]
    p, q = _coarse(p, idx), _coarse(q, idx)
  if name == 'kd':
    return alpha * tau ** 2 * _kl(p, q) + (1 - alpha) * ce
  if name == 'reverse_kl':
    return tau ** 2 * _kl(q, p)
  if name == 'gkd':
    return tau ** 2 * _jsd(p, q, beta)
  raise KeyError(name)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  s = rng.normal(0, 2, (B, T, V))
  t = rng.normal(0, 2, (B, T, V))
  targets = rng.integers(0, V, (B, T))
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float64)
  return s, t, targets, mask


def _module(name, s, teacher, targets, mask, **hp):
  """(per-token loss, gradient of its masked mean in the student logits), float32."""
  def mean(sl):
    per = dl.per_token(name, sl, teacher, targets=jnp.asarray(targets, jnp.int32), **hp)
    return dl.masked_mean(per, jnp.asarray(mask, jnp.float32)), per
  (_, per), grad = jax.value_and_grad(mean, has_aux=True)(jnp.asarray(s, jnp.float32))
  return np.asarray(per), np.asarray(grad)


def _teacher(t, k, tau):
  t32 = jnp.asarray(t, jnp.float32)
  return t32 if k is None else dl.top_k(t32, k, temperature=tau)


def _finite_difference(f, s, h=1e-5):
  grad = np.zeros_like(s)
  for i in np.ndindex(s.shape):
    e = np.zeros_like(s)
    e[i] = h
    grad[i] = (f(s + e) - f(s - e)) / (2 * h)
  return grad


@pytest.mark.parametrize('tau', [1.0, 2.0])
@pytest.mark.parametrize('name', NAMES)
def test_per_token_and_masked_mean_match_numpy(name, tau):
  s, t, targets, mask = _inputs()
  per, _ = _module(name, s, _teacher(t, None, tau), targets, mask, temperature=tau,
                   alpha=ALPHA, beta=BETA)
  ref = numpy_per_token(name, s, t, targets, tau=tau)
  np.testing.assert_allclose(per, ref, rtol=1e-5, atol=1e-6)
  mean = dl.masked_mean(jnp.asarray(per), jnp.asarray(mask, jnp.float32))
  np.testing.assert_allclose(float(mean), (ref * mask).sum() / mask.sum(), rtol=1e-5)


@pytest.mark.parametrize('name,k', [(n, None) for n in NAMES] + [(n, 3) for n in DIVERGENCES])
def test_gradient_matches_finite_differences(name, k):
  s, t, targets, mask = _inputs(seed=1)
  tau = 2.0
  _, grad = _module(name, s, _teacher(t, k, tau), targets, mask, temperature=tau,
                    alpha=ALPHA, beta=BETA)
  ref = _finite_difference(
      lambda x: (numpy_per_token(name, x, t, targets, tau=tau, k=k) * mask).sum()
      / mask.sum(), s)
  assert np.abs(ref).max() > 1e-2  # the gradient is not trivially 0
  np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6)


def test_gkd_limits_are_forward_and_reverse_kl():
  s, t, targets, mask = _inputs(seed=2)
  teacher = _teacher(t, None, 1.0)
  p, q = _softmax(t), _softmax(s)
  forward, reverse = _kl(p, q), _kl(q, p)

  def gkd(beta):
    return _module('gkd', s, teacher, targets, mask, beta=beta)[0]

  # JSD_beta / beta = KL(P||Q) - beta chi^2(P||Q) / 2 + O(beta^2), and symmetrically at
  # beta -> 1 with chi^2(Q||P): twice the leading term bounds the error, plus float32's
  # rounding of KL itself (1e-5).
  small = 1e-4
  chi2_pq, chi2_qp = (p ** 2 / q).sum(-1) - 1, (q ** 2 / p).sum(-1) - 1
  assert np.all(np.abs(gkd(small) / small - forward) <= small * chi2_pq + 1e-5)
  assert np.all(np.abs(gkd(1 - small) / small - reverse) <= small * chi2_qp + 1e-5)
  # The leading term itself (the O(beta^2) rest is within 10% of it for these logits).
  np.testing.assert_allclose(gkd(small) / small - forward, -small * chi2_pq / 2,
                             rtol=0.1, atol=1e-5)
  np.testing.assert_allclose(gkd(1 - small) / small - reverse, -small * chi2_qp / 2,
                             rtol=0.1, atol=1e-5)
  # ... and the bound is tight enough to tell the two KLs apart.
  assert np.all(np.abs(forward - reverse) > 10 * small * (chi2_pq + chi2_qp) + 1e-4)
  np.testing.assert_allclose(gkd(0.0), forward, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gkd(1.0), reverse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', DIVERGENCES)
def test_top_k_with_k_equal_v_is_the_full_loss(name):
  s, t, targets, mask = _inputs(seed=3)
  hp = dict(temperature=2.0, alpha=ALPHA, beta=BETA)
  full, full_grad = _module(name, s, _teacher(t, None, 2.0), targets, mask, **hp)
  top, top_grad = _module(name, s, _teacher(t, V, 2.0), targets, mask, **hp)
  np.testing.assert_allclose(top, full, rtol=0, atol=1e-6)
  np.testing.assert_allclose(top_grad, full_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize('tau', [1.0, 2.0])
@pytest.mark.parametrize('name', DIVERGENCES)
def test_top_k_is_the_coarse_grained_divergence_and_a_lower_bound(name, tau):
  s, t, targets, mask = _inputs(seed=4)
  hp = dict(temperature=tau, alpha=1.0, beta=BETA)  # alpha 1: kd's CE would not change
  top, _ = _module(name, s, _teacher(t, 3, tau), targets, mask, **hp)
  coarse = numpy_per_token(name, s, t, targets, tau=tau, alpha=1.0, k=3)
  full = numpy_per_token(name, s, t, targets, tau=tau, alpha=1.0)
  np.testing.assert_allclose(top, coarse, rtol=1e-5, atol=1e-6)
  assert np.all(coarse <= full + 1e-12)
  assert np.any(coarse < full - 1e-3)  # the bound is not met with equality here


def test_top_k_stores_the_tempered_teacher_and_refuses_another_temperature():
  _, t, targets, _ = _inputs(seed=5)
  top = dl.top_k(jnp.asarray(t, jnp.float32), 3, temperature=2.0)
  scaled = t / 2.0
  np.testing.assert_allclose(np.asarray(top.values), -np.sort(-scaled, -1)[..., :3],
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(top.indices), np.argsort(-t, -1)[..., :3])
  assert top.indices.dtype == jnp.int32
  logz = scaled.max(-1) + np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(-1))
  np.testing.assert_allclose(np.asarray(top.logz), logz, rtol=1e-6)
  with pytest.raises(ValueError, match='temperature'):
    dl.per_token('kd', jnp.asarray(t, jnp.float32), top, temperature=1.0)


@pytest.mark.parametrize('k', [None, 3, V])
@pytest.mark.parametrize('name,beta', [('kd', BETA), ('reverse_kl', BETA)]
                         + [('gkd', b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)])
def test_student_equal_to_teacher_has_zero_loss_and_gradient(name, beta, k):
  _, t, targets, mask = _inputs(seed=6)
  per, grad = _module(name, t, _teacher(t, k, 1.5), targets, mask, temperature=1.5,
                      alpha=1.0, beta=beta)
  np.testing.assert_allclose(per, 0.0, atol=1e-6)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)


def test_teacher_with_zero_probability_tokens():
  """-inf teacher logits (tokens it never emits) add 0 to KL(P||Q) and to gkd's P-term,
  with finite gradients, as the NumPy formula with 0 log 0 = 0 says."""
  s, t, targets, mask = _inputs(seed=7)
  t = t.copy()
  t[..., :2] = -np.inf
  p = _softmax(t)
  for name, beta in (('kd', BETA), ('gkd', 0.0), ('gkd', BETA)):
    per, grad = _module(name, s, jnp.asarray(t, jnp.float32), targets, mask, alpha=1.0,
                        beta=beta)

    def ref(x, beta=beta, name=name):
      qx = _softmax(x)
      pk, qk = p[..., 2:], qx[..., 2:]  # 0 log 0 = 0 on the -inf tokens
      if name == 'kd' or beta == 0.0:
        return (pk * np.log(pk / qk)).sum(-1)
      m = beta * p + (1 - beta) * qx
      return (beta * (pk * np.log(pk / m[..., 2:])).sum(-1)
              + (1 - beta) * (qx * np.log(qx / m)).sum(-1))

    np.testing.assert_allclose(per, ref(s), rtol=1e-5, atol=1e-6)
    fd = _finite_difference(lambda x, ref=ref: (ref(x) * mask).sum() / mask.sum(), s)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)


def test_bad_calls_raise():
  s, t, targets, _ = _inputs()
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  with pytest.raises(ValueError, match='targets'):
    dl.per_token('kd', s, t, alpha=0.3)
  with pytest.raises(ValueError, match='targets'):
    dl.per_token('seq_kd', s, None)
  with pytest.raises(ValueError, match='beta'):
    dl.per_token('gkd', s, t, beta=1.5)
  with pytest.raises(UserError, match='distill.loss'):
    dl.per_token('jsd', s, t)
  # kd at alpha 1 reads no targets; LOSSES says which losses always do.
  np.testing.assert_allclose(np.asarray(dl.per_token('kd', s, t)),
                             numpy_per_token('kd', *_inputs()[:3], tau=1.0, alpha=1.0),
                             rtol=1e-5, atol=1e-6)
  assert [n for n, e in dl.LOSSES.items() if e.needs_targets] == ['seq_kd', 'ce']
  assert [n for n, e in dl.LOSSES.items() if not e.on_policy_ok] == ['seq_kd', 'ce']
  assert [n for n, e in dl.LOSSES.items() if not e.needs_teacher] == ['seq_kd', 'ce']
