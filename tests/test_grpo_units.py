"""GRPO's parts against independent computations: the group-relative advantage estimators
and zero_variance against plain-NumPy float64 loops on ragged groups; the GRPO loss's value,
gradient, one update and its metrics on a table policy against a float64 NumPy computation
of the same formula; the whole update on a bandit against the KL-regularised optimum; and
pass@k, maj@k and the log-prob mismatch against enumeration, a Counter vote and NumPy."""
import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.analysis import verifier_metrics
from rlhf_jax.errors import UserError
from rlhf_jax.train import group_advantages, grpo_update

# -- advantages ------------------------------------------------------------------------------


def ragged_case(binary: bool):
  """Rows of 6 groups of sizes 5, 3, 1, 4, 6, 2 in shuffled order, plus an empty group id 6:
  group 2 is a single row, group 5 has equal rewards, group 3 loses two rows to valid = 0
  (whose rewards are NaN, so any leak shows), and with binary rewards more groups are flat."""
  rng = np.random.default_rng(3 if binary else 4)
  groups = np.repeat(np.arange(6), [5, 3, 1, 4, 6, 2])
  rng.shuffle(groups)
  rewards = (rng.random(groups.size) < 0.5 if binary else rng.normal(size=groups.size))
  rewards = rewards.astype(np.float32)
  rewards[groups == 5] = 0.7
  valid = np.ones(groups.size, np.float32)
  valid[np.flatnonzero(groups == 3)[:2]] = 0.0
  rewards[valid == 0] = np.nan
  return rewards, groups.astype(np.int32), valid, 7


def advantages_loop(name, rewards, groups, valid):
  """Plain Python, float64, row by row, straight from the formulas."""
  r = rewards.astype(np.float64)
  members = lambda g: [j for j in range(r.size) if valid[j] and groups[j] == g]
  out = np.zeros(r.size)
  for i in range(r.size):
    if not valid[i]:
      continue
    group = r[members(groups[i])]
    if name == 'grpo':
      out[i] = (r[i] - group.mean()) / (group.std() + group_advantages.EPS)
    elif name in ('dr_grpo', 'reinforce_pp'):
      out[i] = r[i] - group.mean()
    elif name == 'rloo':
      others = [r[j] for j in members(groups[i]) if j != i]
      out[i] = r[i] - np.mean(others) if others else 0.0
  if name == 'reinforce_pp':
    c = out[valid > 0]
    out[valid > 0] = (c - c.mean()) / (c.std() + group_advantages.EPS)
  return out


@pytest.mark.parametrize('binary', [False, True])
@pytest.mark.parametrize('name', sorted(group_advantages.ESTIMATORS))
def test_estimators_match_numpy_loop(name, binary):
  rewards, groups, valid, num_groups = ragged_case(binary)
  got = np.asarray(jax.jit(group_advantages.advantages, static_argnums=0,
                           static_argnames='num_groups')(
                               name, rewards, groups, valid, num_groups=num_groups))
  want = advantages_loop(name, rewards, groups, valid)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Exactly 0 where there is no signal: invalid rows, the single row, the flat group.
  assert np.all(got[(valid == 0) | (groups == 2) | (groups == 5)] == 0.0)


@pytest.mark.parametrize('binary', [False, True])
def test_zero_variance_matches_python(binary):
  rewards, groups, valid, num_groups = ragged_case(binary)
  got = np.asarray(group_advantages.zero_variance(rewards, groups, valid,
                                                  num_groups=num_groups))
  want = [len({float(rewards[j]) for j in range(rewards.size)
               if valid[j] and groups[j] == g}) <= 1 for g in range(num_groups)]
  np.testing.assert_array_equal(got, want)
  assert got[2] and got[5] and got[6] and not got[0]


# -- the loss on a table policy ----------------------------------------------------------------

B, N, V = 6, 5, 4
LENGTHS = np.array([5, 3, 1, 4, 2, 5])
VALID = np.array([1, 1, 1, 0, 1, 1], np.float32)


def table_apply(params, tokens):
  """A policy whose next-token distribution depends on the position only: logits [N, V]."""
  logp_all = jax.nn.log_softmax(params)
  logp = logp_all[jnp.arange(N)[None], tokens]
  ent = -(jnp.exp(logp_all) * logp_all).sum(-1)
  return logp, jnp.broadcast_to(ent, tokens.shape)


def table_case():
  rng = np.random.default_rng(7)
  old = rng.normal(size=(N, V)).astype(np.float32)
  new = (old + 0.4 * rng.normal(size=(N, V))).astype(np.float32)
  ref = rng.normal(size=(N, V)).astype(np.float32)
  tokens = rng.integers(0, V, size=(B, N)).astype(np.int32)
  mask = (np.arange(N)[None] < LENGTHS[:, None]).astype(np.float32)
  logp_old = np.asarray(table_apply(jnp.asarray(old), tokens)[0])
  rollout = grpo_update.GroupRollout(
      inputs=jnp.asarray(tokens), mask=jnp.asarray(mask), logp=jnp.asarray(logp_old),
      sample_logp=jnp.asarray(logp_old + 0.3 * rng.normal(size=(B, N)).astype(np.float32)),
      ref_logp=table_apply(jnp.asarray(ref), tokens)[0],
      advantages=jnp.asarray(rng.normal(size=B).astype(np.float32)),
      valid=jnp.asarray(VALID))
  return new, rollout


def numpy_loss(theta, rollout, config):
  """(loss, d loss / d theta, metrics) in float64 from the module docstring's formulas."""
  r = jax.tree.map(lambda x: np.asarray(x, np.float64), rollout)
  tokens = np.asarray(rollout.inputs)
  logp_all = theta - np.log(np.exp(theta).sum(-1, keepdims=True))
  probs = np.exp(logp_all)
  logp = logp_all[np.arange(N)[None], tokens]
  a = r.advantages[:, None]
  ratio = np.exp(logp - r.logp)
  unclipped = -a * ratio
  clipped = -a * np.clip(ratio, 1 - config.clip_low, 1 + config.clip_high)
  w = np.minimum(np.exp(r.logp - r.sample_logp), config.tis_cap)
  k3 = np.exp(r.ref_logp - logp) - (r.ref_logp - logp) - 1
  per_token = w * np.maximum(unclipped, clipped) + config.kl_coef * k3
  # d per_token / d logp: the surrogate's slope where the unclipped term is the larger
  # (inside the range the two are equal and both have slope -a ratio), 0 where the clip holds.
  slope = (w * np.where(unclipped >= clipped, -a * ratio, 0.0)
           + config.kl_coef * (1 - np.exp(r.ref_logp - logp)))
  tok = r.mask * r.valid[:, None]
  rows = r.valid.sum()
  coef = {'sequence': tok / r.mask.sum(1, keepdims=True) / rows,
          'token': tok / tok.sum(),
          'constant': tok / (rows * config.max_new_tokens)}[config.loss_agg]
  grad = np.zeros_like(theta)
  for i in range(B):
    for t in range(N):
      onehot = np.eye(V)[tokens[i, t]]
      grad[t] += coef[i, t] * slope[i, t] * (onehot - probs[t])
  mean = lambda x: (x * tok).sum() / tok.sum()
  log_r = logp - r.logp
  metrics = {
      'train/loss': (coef * per_token).sum(),
      'grpo/policy_loss': (coef * w * np.maximum(unclipped, clipped)).sum(),
      'grpo/kl': mean(k3),
      'grpo/clip_fraction_low': mean((ratio < 1 - config.clip_low) & (a < 0)),
      'grpo/clip_fraction_high': mean((ratio > 1 + config.clip_high) & (a > 0)),
      'grpo/entropy': mean(np.broadcast_to(-(probs * logp_all).sum(-1), (B, N))),
      'grpo/approx_kl': mean(np.exp(log_r) - 1 - log_r),
      'grpo/tis_clipped_fraction': mean(np.exp(r.logp - r.sample_logp) > config.tis_cap),
  }
  return (coef * per_token).sum(), grad, metrics


@pytest.mark.parametrize('loss_agg', ['sequence', 'token', 'constant'])
def test_loss_value_gradient_and_update_match_numpy(loss_agg):
  new, rollout = table_case()
  config = grpo_update.GRPOConfig(clip_low=0.1, clip_high=0.25, loss_agg=loss_agg, kl='loss',
                                  kl_coef=0.1, tis_cap=1.2, max_new_tokens=N)
  want_loss, want_grad, want_metrics = numpy_loss(new.astype(np.float64), rollout, config)
  # The case reaches every branch: both clips, the TIS cap, an invalid row.
  assert min(want_metrics['grpo/clip_fraction_low'], want_metrics['grpo/clip_fraction_high'],
             want_metrics['grpo/tis_clipped_fraction']) > 0.05

  (got_loss, _), got_grad = jax.value_and_grad(grpo_update.loss, has_aux=True)(
      jnp.asarray(new), rollout, apply_fn=table_apply, config=config)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)

  # One SGD update over the whole batch moves the params by -lr * that gradient.
  lr = 0.5
  tx = optax.sgd(lr)
  params, _, metrics = grpo_update.update(jnp.asarray(new), tx.init(jnp.asarray(new)),
                                          rollout, jax.random.key(0), apply_fn=table_apply,
                                          tx=tx, config=config)
  np.testing.assert_allclose(params, new - lr * want_grad, rtol=1e-5, atol=1e-6)
  for key, want in want_metrics.items():
    np.testing.assert_allclose(metrics[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(metrics['train/grad_norm'], np.sqrt((want_grad ** 2).sum()),
                             rtol=1e-4)


def test_minibatch_without_valid_rows_changes_nothing():
  """Adam's momentum would move the params on a zero gradient; a minibatch without a valid
  row is skipped, so an update of a batch that dynamic sampling emptied changes nothing."""
  new, rollout = table_case()
  config = grpo_update.GRPOConfig(loss_agg='token', kl='off', tis_cap=0.0)
  tx = optax.adam(0.1)
  p0, s0, _ = grpo_update.update(jnp.asarray(new), tx.init(jnp.asarray(new)), rollout,
                                 jax.random.key(1), apply_fn=table_apply, tx=tx, config=config)
  dead = rollout.replace(valid=jnp.zeros(B))
  p1, s1, metrics = grpo_update.update(p0, s0, dead, jax.random.key(2), apply_fn=table_apply,
                                       tx=tx, config=config)
  np.testing.assert_array_equal(p1, p0)
  jax.tree.map(np.testing.assert_array_equal, s1, s0)
  # No update counted: the metrics are those of none, 0.
  assert float(metrics['train/loss']) == 0.0 and float(metrics['train/grad_norm']) == 0.0


def test_bad_choices_raise_user_error():
  with pytest.raises(UserError, match='loss_agg'):
    grpo_update.GRPOConfig(loss_agg='mean')
  with pytest.raises(UserError, match='max_new_tokens'):
    grpo_update.GRPOConfig(loss_agg='constant', max_new_tokens=0)
  with pytest.raises(UserError, match='ppo'):
    group_advantages.advantages('ppo', jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.ones(2),
                                num_groups=1)
  _, rollout = table_case()
  with pytest.raises(UserError, match='minibatches'):
    grpo_update.update(jnp.zeros((N, V)), optax.sgd(1.0).init(jnp.zeros((N, V))), rollout,
                       jax.random.key(0), apply_fn=table_apply, tx=optax.sgd(1.0),
                       config=grpo_update.GRPOConfig(minibatches=4))


# -- the whole update on a bandit ------------------------------------------------------------

ARMS, BETA = 6, 0.5


def bandit():
  rng = np.random.default_rng(0)
  return rng.dirichlet(np.ones(ARMS)), rng.normal(size=ARMS)


def make_bandit_train(estimator: str, *, iterations: int, groups: int, group_size: int,
                      lr: float):
  """train(key, beta) -> pi: one prompt, a softmax table over the arms as the policy,
  `groups` groups of `group_size` samples per iteration. The KL is put into the reward
  (kl='reward'), as the GRPO step does: r_a - beta (log pi_old(a) - log ref(a))."""
  ref, reward = bandit()
  ref_logp, reward = jnp.log(jnp.asarray(ref, jnp.float32)), jnp.asarray(reward, jnp.float32)
  rows = groups * group_size
  config = grpo_update.GRPOConfig(epochs=2, minibatches=2, loss_agg='token', kl='reward')
  # Decayed to 0, so the last iterations average out the sampling noise around the optimum.
  tx = optax.adam(optax.cosine_decay_schedule(lr, iterations * 4))

  def apply_fn(params, actions):
    logp = jax.nn.log_softmax(params)
    return logp[actions], jnp.broadcast_to(-(jnp.exp(logp) * logp).sum(), actions.shape)

  def train(key, beta):
    def iteration(carry, k):
      params, opt_state = carry
      k_sample, k_update = jax.random.split(k)
      actions = jax.random.categorical(k_sample, params, shape=(rows, 1))
      logp, _ = apply_fn(params, actions)
      shaped = reward[actions[:, 0]] - beta * (logp[:, 0] - ref_logp[actions[:, 0]])
      ids = jnp.arange(rows) // group_size
      valid = jnp.ones(rows)
      adv = group_advantages.advantages(estimator, shaped, ids, valid, num_groups=groups)
      rollout = grpo_update.GroupRollout(
          inputs=actions, mask=jnp.ones((rows, 1)), logp=logp, sample_logp=logp,
          ref_logp=ref_logp[actions], advantages=adv, valid=valid)
      params, opt_state, _ = grpo_update.update(params, opt_state, rollout, k_update,
                                                apply_fn=apply_fn, tx=tx, config=config)
      return (params, opt_state), None

    params = ref_logp
    (params, _), _ = jax.lax.scan(iteration, (params, tx.init(params)),
                                  jax.random.split(key, iterations))
    return jax.nn.softmax(params)
  return train


@pytest.mark.parametrize('estimator', ['grpo', 'rloo'])
def test_bandit_reaches_closed_form_optimum(estimator):
  """With beta > 0, pi* = ref exp(r / beta) / Z maximises E_pi[r] - beta KL(pi || ref);
  there the shaped reward r - beta log(pi*/ref) = beta log Z is the same for every arm, so
  every group is flat and every advantage 0: pi* is the update's fixed point. With beta = 0
  the optimum is the best arm. Both in one program (beta is traced), 4 seeds each.

  From pi = ref (0.46 TV from pi*, 0.17 on the best arm), 150 iterations of 32 groups of 8
  end about 1e-4 (grpo) and 4e-4 (rloo) TV from pi*, and with at least 0.997 (grpo) and
  0.994 (rloo) on the best arm (measured). One batch of 256 samples resolves a 6-way
  distribution only to about 0.06 TV, so the bound 2e-3 is far below what any single step
  sees. rloo is slower at the end: as the groups turn mostly best arm their reward spread
  shrinks, which grpo's division by the group std undoes and rloo has no counterpart to."""
  ref, reward = bandit()
  optimum = ref * np.exp(reward / BETA)
  optimum /= optimum.sum()
  best = np.argmax(reward)
  train = make_bandit_train(estimator, iterations=150, groups=32, group_size=8, lr=0.05)
  betas = jnp.array([BETA] * 4 + [0.0] * 4)
  pis = np.asarray(jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(0), 8), betas),
                   np.float64)
  assert 0.5 * np.abs(ref - optimum).sum() > 0.4 and ref[best] < 0.5
  tv = 0.5 * np.abs(pis[:4] - optimum).sum(1)
  assert tv.max() < 2e-3, tv
  assert pis[4:, best].min() > 0.99, pis[4:]


# -- verifier metrics ------------------------------------------------------------------------


def test_pass_at_k_matches_enumeration():
  cases = [(n, c, k) for n in (1, 2, 5, 8) for c in range(n + 1) for k in range(1, n + 1)]
  n, c, k = (np.array(x) for x in zip(*cases))
  got = verifier_metrics.pass_at_k(n, c, k)
  # Samples 0..c-1 are the correct ones; a k-subset passes when it holds one of them.
  want = [np.mean([min(s) < ci for s in itertools.combinations(range(ni), ki)])
          for ni, ci, ki in cases]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  # Vectorised over problems with one k, as a caller reports pass@8 over a set.
  np.testing.assert_allclose(verifier_metrics.pass_at_k([8, 8, 5], [0, 3, 5], 2),
                             [0.0, 1 - 10 / 28, 1.0], rtol=1e-12)


def test_maj_at_k_matches_counter_vote():
  rng = np.random.default_rng(11)
  p, n = 300, 7
  pool = np.array([[3, 4], [5, 0], [3, 0]])  # three answers, so ties are common
  answers = pool[rng.integers(0, 3, size=(p, n))]
  found = rng.random((p, n)) < 0.7
  found[0] = False  # a problem where nothing was found
  gold = rng.integers(0, 3, size=p)
  correct = (answers == pool[gold][:, None]).all(-1) & found
  ties = 0
  for k in range(1, n + 1):
    got = verifier_metrics.maj_at_k(answers, found, correct, k)
    want = np.zeros(p)
    for i in range(p):
      votes = collections.Counter(tuple(answers[i, j]) for j in range(k) if found[i, j])
      if votes:
        # most_common keeps insertion order among equal counts: the answer seen first wins.
        winner, count = votes.most_common(1)[0]
        ties += sum(c == count for c in votes.values()) > 1
        want[i] = float(winner == tuple(pool[gold[i]]))
    np.testing.assert_array_equal(got, want, err_msg=f'k={k}')
  assert ties > 50


def test_logprob_mismatch_matches_numpy():
  rng = np.random.default_rng(5)
  sample = rng.normal(-2.0, 1.0, size=(4, 9))
  train = sample + rng.normal(0.0, 0.05, size=(4, 9))
  mask = (rng.random((4, 9)) < 0.6).astype(np.float32)
  train[mask == 0] += 10.0  # off-mask tokens must not count
  on = mask > 0
  d = train[on] - sample[on]
  ratio = np.exp(train[on]) / np.exp(sample[on])
  want = {'abs_diff_mean': np.abs(d).mean(), 'abs_diff_max': np.abs(d).max(),
          'kl_k3': np.mean(ratio - 1 - np.log(ratio))}
  host = verifier_metrics.logprob_mismatch(sample, train, mask)
  traced = jax.jit(verifier_metrics.logprob_mismatch)(
      jnp.asarray(sample, jnp.float32), jnp.asarray(train, jnp.float32), jnp.asarray(mask))
  for key, value in want.items():
    np.testing.assert_allclose(host[key], value, rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(traced[key], value, rtol=1e-4, atol=1e-7, err_msg=key)
