"""PPO pieces against independent computations: GAE against a plain-Python loop, the losses
and their gradients against NumPy float64, the KL controller against Ziegler et al.'s
formula, the whole update on a bandit against the KL-regularised optimum, and on a tiny
language model the update's metrics and entropy bonus against NumPy and the jitted step's
rollout log-probs against the sampler's."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import losses
from rlhf_jax.train import advantages, kl_control, ppo_update


def gae_loop(rewards, values, lengths, gamma, lam):
  """Plain Python, float64, one row at a time."""
  b, n = rewards.shape
  adv, ret = np.zeros((b, n)), np.zeros((b, n))
  for i in range(b):
    running = 0.0
    for t in reversed(range(lengths[i])):
      next_v = values[i, t + 1] if t + 1 < lengths[i] else 0.0
      delta = rewards[i, t] + gamma * next_v - values[i, t]
      running = delta + gamma * lam * running
      adv[i, t] = running
      ret[i, t] = running + values[i, t]
  return adv, ret


@pytest.mark.parametrize('gamma,lam', [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_python_loop(gamma, lam):
  rng = np.random.default_rng(0)
  b, n = 5, 9
  lengths = np.array([9, 1, 4, 7, 2])
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  # Garbage past each row's end must not leak into the result.
  rewards = rng.normal(size=(b, n)).astype(np.float32)
  values = rng.normal(size=(b, n)).astype(np.float32)
  adv, ret = advantages.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                            gamma=gamma, lam=lam)
  want_adv, want_ret = gae_loop(rewards.astype(np.float64), values.astype(np.float64),
                                lengths, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, atol=1e-5)


def test_whiten_masked():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, size=(4, 6))
  mask = (rng.random((4, 6)) < 0.6).astype(np.float64)
  out = np.asarray(advantages.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask, jnp.float32)))
  sel = x[mask > 0]
  np.testing.assert_allclose(out[mask > 0], (sel - sel.mean()) / sel.std(), atol=1e-4)
  assert np.all(out[mask == 0] == 0)


def numpy_ppo(logp, old_logp, adv, values, old_values, returns, clip, vclip):
  ratio = np.exp(logp - old_logp)
  policy = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
  vclipped = old_values + np.clip(values - old_values, -vclip, vclip)
  value = 0.5 * np.maximum((values - returns) ** 2, (vclipped - returns) ** 2)
  return policy, value


def test_ppo_losses_and_gradients_match_numpy():
  rng = np.random.default_rng(2)
  n = 64
  old_logp = rng.normal(-2.0, 0.5, n)
  logp = old_logp + rng.normal(0, 0.3, n)  # ratios on both sides of the clip range
  adv, returns = rng.normal(size=n), rng.normal(size=n)
  old_values = rng.normal(size=n)
  values = old_values + rng.normal(0, 0.4, n)
  clip, vclip = 0.2, 0.2
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  policy = losses.ppo_policy_loss(f32(logp), f32(old_logp), f32(adv), clip=clip)
  value = losses.ppo_value_loss(f32(values), f32(old_values), f32(returns), clip=vclip)
  want_p, want_v = numpy_ppo(logp, old_logp, adv, values, old_values, returns, clip, vclip)
  np.testing.assert_allclose(policy, want_p, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, want_v, rtol=1e-5, atol=1e-6)

  # Gradients: analytic in float64. d/dlogp of the surrogate is -A r where the unclipped
  # term is the max (or where r is inside the range), else 0; the value loss's is
  # (V - R) where the unclipped term is the max, else (V_clipped - R) inside the clip
  # range and 0 outside.
  ratio = np.exp(logp - old_logp)
  unclipped_active = (-adv * ratio >= -adv * np.clip(ratio, 1 - clip, 1 + clip))
  inside = (ratio > 1 - clip) & (ratio < 1 + clip)
  want_gp = np.where(unclipped_active | inside, -adv * ratio, 0.0)
  gp = jax.grad(lambda x: losses.ppo_policy_loss(x, f32(old_logp), f32(adv), clip=clip).sum())(
      f32(logp))
  np.testing.assert_allclose(gp, want_gp, rtol=1e-4, atol=1e-6)
  vclipped = old_values + np.clip(values - old_values, -vclip, vclip)
  plain_wins = (values - returns) ** 2 >= (vclipped - returns) ** 2
  v_inside = np.abs(values - old_values) < vclip
  want_gv = np.where(plain_wins, values - returns,
                     np.where(v_inside, vclipped - returns, 0.0))
  gv = jax.grad(lambda x: losses.ppo_value_loss(x, f32(old_values), f32(returns),
                                                clip=vclip).sum())(f32(values))
  np.testing.assert_allclose(gv, want_gv, rtol=1e-4, atol=1e-5)


def test_entropy_matches_numpy():
  logits = np.random.default_rng(3).normal(size=(3, 7)) * 3
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  np.testing.assert_allclose(losses.entropy(jnp.asarray(logits, jnp.float32)),
                             -(p * np.log(p)).sum(1), rtol=1e-5, atol=1e-6)


def test_adaptive_kl_controller_formula():
  beta, target, horizon, n = 0.1, 6.0, 10000.0, 64
  for kl in (0.0, 3.0, 6.0, 6.6, 7.0, 50.0):
    e = min(max(kl / target - 1, -0.2), 0.2)
    want = beta * (1 + e * n / horizon)
    got = kl_control.CONTROLLERS['adaptive'](jnp.float32(beta), jnp.float32(kl), n=n,
                                             target=target, horizon=horizon)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    assert float(kl_control.CONTROLLERS['fixed'](beta, kl, n=n, target=target,
                                                 horizon=horizon)) == beta
  # Repeated updates at a KL above target grow beta geometrically.
  b = jnp.float32(beta)
  for _ in range(100):
    b = kl_control.CONTROLLERS['adaptive'](b, jnp.float32(60.0), n=n, target=target,
                                           horizon=horizon)
  np.testing.assert_allclose(float(b), beta * (1 + 0.2 * n / horizon) ** 100, rtol=1e-4)


def test_token_rewards_pay_score_on_last_token():
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
  logp = jnp.asarray([[-1.0, -2.0, -0.5, -9.0], [-0.1, -9.0, -9.0, -9.0]])
  ref = jnp.asarray([[-1.5, -1.0, -0.5, -1.0], [-0.3, -1.0, -1.0, -1.0]])
  ro = ppo_update.Rollout(inputs=None, mask=mask, logp=logp, ref_logp=ref,
                          values=jnp.zeros_like(mask), score=jnp.asarray([2.0, -1.0]))
  rewards, log_ratio = ppo_update.token_rewards(ro, 0.5)
  want = np.array([[-0.5 * 0.5, 0.5 * 1.0, 0.0 + 2.0, 0.0], [-0.5 * 0.2 - 1.0, 0, 0, 0]])
  np.testing.assert_allclose(rewards, want, atol=1e-6)
  np.testing.assert_allclose(log_ratio.sum(1), [0.5 - 1.0 + 0.0, 0.2], atol=1e-6)


# -- the whole update on a bandit -----------------------------------------------------------

ACTIONS, BETA = 6, 0.5


def bandit():
  rng = np.random.default_rng(0)
  ref = rng.dirichlet(np.ones(ACTIONS))
  reward = rng.normal(size=ACTIONS)
  optimum = ref * np.exp(reward / BETA)
  return ref, reward, optimum / optimum.sum()


def make_bandit_train(config: ppo_update.PPOConfig, *, iterations: int, batch: int, lr: float):
  """A tabular policy over one-token responses and a scalar value, trained by
  ppo_update.update with the per-token RLHF reward at a fixed beta."""
  ref, reward, _ = bandit()
  ref_logp, reward = jnp.log(jnp.asarray(ref, jnp.float32)), jnp.asarray(reward, jnp.float32)
  tx = optax.adam(lr)

  def apply_fn(params, actions):
    logp = jax.nn.log_softmax(params['logits'])
    ent = -(jnp.exp(logp) * logp).sum()
    return (logp[actions], jnp.broadcast_to(params['value'], actions.shape),
            jnp.broadcast_to(ent, actions.shape))

  def train(key):
    params = {'logits': ref_logp, 'value': jnp.zeros(())}

    def iteration(carry, k):
      params, opt_state = carry
      k_sample, k_update = jax.random.split(k)
      actions = jax.random.categorical(k_sample, params['logits'], shape=(batch, 1))
      logp, values, _ = apply_fn(params, actions)
      rollout = ppo_update.Rollout(inputs=actions, mask=jnp.ones((batch, 1)), logp=logp,
                                   ref_logp=ref_logp[actions], values=values,
                                   score=reward[actions[:, 0]])
      params, opt_state, _ = ppo_update.update(params, opt_state, rollout, k_update,
                                               apply_fn=apply_fn, tx=tx, config=config,
                                               kl_coef=BETA)
      return (params, opt_state), None

    (params, _), _ = jax.lax.scan(iteration, (params, tx.init(params)),
                                  jax.random.split(key, iterations))
    return jax.nn.softmax(params['logits'])
  return train


@pytest.mark.slow  # over the quick check's 5 s (5.1-6.5 s on 2 idle cores)
@pytest.mark.parametrize('whiten,tolerance', [(False, 0.005), (True, 0.025)])
def test_ppo_bandit_reaches_kl_regularised_optimum(whiten, tolerance):
  """pi* = ref exp(r / beta) / Z maximises E_pi[r] - beta KL(pi || ref). From pi = ref
  (total variation 0.46 from pi*), 400 PPO iterations of 256 samples must end within
  `tolerance` TV of pi* on every one of 8 seeds. Why these tolerances: a single batch of
  256 samples estimates a 6-way distribution only to about 0.06 TV, so the tolerances
  are well below what the data of any one step can resolve. Without whitening the
  advantages vanish at pi* (r - beta log(pi*/ref) is constant) and the policy settles
  (about 1e-3 TV); with whitening the same tiny advantages are rescaled to unit variance,
  so Adam keeps taking lr-sized steps around pi* (about 1e-2 TV)."""
  ref, reward, optimum = bandit()
  config = ppo_update.PPOConfig(gamma=1.0, lam=1.0, whiten=whiten)
  train = make_bandit_train(config, iterations=400, batch=256, lr=0.003)
  pis = np.asarray(jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(0), 8)),
                   np.float64)
  tv = 0.5 * np.abs(pis - optimum).sum(axis=1)
  assert 0.5 * np.abs(ref - optimum).sum() > 0.4
  assert tv.max() < tolerance, tv
  # The objective itself: E_pi[r] - beta KL(pi || ref) reaches beta log Z.
  objective = (pis * reward).sum(1) - BETA * (pis * np.log(pis / ref)).sum(1)
  best = BETA * np.log((ref * np.exp(reward / BETA)).sum())
  assert np.all(objective <= best + 1e-6)
  assert np.all(best - objective < 0.01 * BETA), best - objective


@pytest.mark.slow  # over 8 s: left out of the quick check
def test_bandit_vmapped_equals_single_seed():
  config = ppo_update.PPOConfig(gamma=1.0, lam=1.0)
  train = make_bandit_train(config, iterations=20, batch=64, lr=0.01)
  keys = jax.random.split(jax.random.key(5), 3)
  batched = np.asarray(jax.jit(jax.vmap(train))(keys))
  single = np.stack([np.asarray(jax.jit(train)(k)) for k in keys])
  np.testing.assert_allclose(batched, single, atol=1e-6)


# -- the update and the step on a tiny language model ---------------------------------------

LM = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
PROMPTS = [[1, 5, 9], [1, 7], [1, 3, 4, 6, 8], [1, 10, 11, 12]]  # left-padded to 5 columns


def tiny_learner(seed: int):
  """A randomly initialised PolicyValue (value head on the trunk, at 0) and its params."""
  import flax.linen as nn
  from rlhf_jax.models import policy_value
  from rlhf_jax.models.transformer import ModelConfig
  model = policy_value.PolicyValue(ModelConfig(**LM), 'head')
  # From an RBG key: compiling threefry's draws took seconds of each test.
  return model, nn.meta.unbox(jax.jit(policy_value.init_params(model))(
      jax.random.key(seed, impl='rbg')))


def rows_forward(lm_params, prompts, responses):
  """Per row i, (logits [n_i, V], final hidden states [n_i, D]) float64 at the columns that
  predict responses[i]. Each row is laid out on its own, unpadded in front: positions 0..
  from BOS, every token in one segment, right-padded to a common width (causal attention
  keeps the padding out of every earlier column), so none of the batch's left-padding or
  layout code is involved."""
  from rlhf_jax.models.transformer import ModelConfig, Transformer
  seqs = [[*p, *r] for p, r in zip(prompts, responses)]
  width = max(len(q) for q in seqs)
  tokens = np.asarray([q + [3] * (width - len(q)) for q in seqs], np.int32)
  out = jax.jit(lambda params, tokens: Transformer(ModelConfig(**LM)).apply(
      {'params': params}, tokens, segment_ids=jnp.ones_like(tokens),
      positions=jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), tokens.shape),
      return_hidden=True))(lm_params, tokens)
  logits, hidden = np.asarray(out.logits, np.float64), np.asarray(out.hidden, np.float64)
  cols = [slice(len(p) - 1, len(p) - 1 + len(r)) for p, r in zip(prompts, responses)]
  return [(logits[i, c], hidden[i, c]) for i, c in enumerate(cols)]


def log_softmax64(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.slow  # over 8 s: left out of the quick check
def test_update_metrics_and_entropy_bonus_match_numpy():
  """One update (1 epoch x 1 minibatch, SGD at lr 1) of a tiny LM on a fixed rollout whose
  sampling log-probs differ from the current policy's: approx KL, clip fraction, entropy,
  both loss terms and the total against NumPy float64 from each row's own unpadded forward;
  with ppo.entropy_coef = c the loss is lower by exactly c * entropy and the output
  projection moves by c times the NumPy gradient of the mean entropy (nothing else in the
  loss changes, and the value head does not move)."""
  from rlhf_jax import sampling
  from rlhf_jax.train import ppo_step
  model, params = tiny_learner(0)
  prompts, plen = sampling.left_pad(PROMPTS)
  rng = np.random.default_rng(7)
  b, n = len(PROMPTS), 6
  lengths = np.array([6, 1, 4, 3])
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float64)
  responses = np.where(mask > 0, rng.integers(3, 64, (b, n)), 0).astype(np.int32)

  logp, ent, values = np.zeros((b, n)), np.zeros((b, n)), np.zeros((b, n))
  kernel_grad = np.zeros(np.shape(params['policy']['logits']['kernel']))
  head_w = np.asarray(params['value_head']['kernel'], np.float64)[:, 0]
  head_b = float(np.asarray(params['value_head']['bias'])[0])
  forwards = rows_forward(params['policy'], PROMPTS,
                          [list(responses[i, :lengths[i]]) for i in range(b)])
  for i, (z, h) in enumerate(forwards):
    lsm = log_softmax64(z)
    p = np.exp(lsm)
    logp[i, :lengths[i]] = lsm[np.arange(lengths[i]), responses[i, :lengths[i]]]
    ent_i = -(p * lsm).sum(axis=1)
    ent[i, :lengths[i]] = ent_i
    values[i, :lengths[i]] = h @ head_w + head_b
    # dH/dz = -p (log p + H), through logits = h @ W.
    kernel_grad += h.T @ (-p * (lsm + ent_i[:, None]))
  tokens = mask.sum()
  kernel_grad /= tokens

  old_logp = (logp + rng.normal(0, 0.3, (b, n))) * mask  # ratios on both sides of the clip
  ref_logp = (logp + rng.normal(0, 0.5, (b, n))) * mask
  old_values = rng.normal(size=(b, n)) * mask
  score = rng.normal(size=b)
  kl_coef, clip, vclip = 0.1, 0.2, 0.2

  # NumPy float64: per-token RLHF reward, GAE, whitening, the clipped terms.
  rewards = -kl_coef * (old_logp - ref_logp) * mask
  rewards[np.arange(b), lengths - 1] += score
  adv, returns = gae_loop(rewards, old_values, lengths, 1.0, 0.95)
  sel = mask > 0
  adv = np.where(sel, (adv - adv[sel].mean()) / adv[sel].std(), 0.0)
  mean = lambda x: (x * mask).sum() / tokens
  d = logp - old_logp
  policy_want, value_want = numpy_ppo(logp, old_logp, adv, values, old_values, returns,
                                      clip, vclip)
  want = {'ppo/approx_kl': mean(np.expm1(d) - d),
          'ppo/clip_fraction': mean(np.abs(np.expm1(d)) > clip),
          'ppo/entropy': mean(ent), 'ppo/policy_loss': mean(policy_want),
          'ppo/value_loss': mean(value_want),
          'rl/kl': ((old_logp - ref_logp) * mask).sum(axis=1).mean()}
  assert 0.2 < want['ppo/clip_fraction'] < 0.8

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  inputs = (ppo_step.sequence_inputs(jnp.asarray(prompts), jnp.asarray(plen),
                                     jnp.asarray(responses)), jnp.asarray(responses))
  rollout = ppo_update.Rollout(inputs=inputs, mask=f32(mask), logp=f32(old_logp),
                               ref_logp=f32(ref_logp), values=f32(old_values), score=f32(score))
  apply_fn = ppo_step.make_apply(model, prompt_len=prompts.shape[1])
  tx = optax.sgd(1.0)

  # One compile for both coefficients: the coefficient is an argument of the jitted update
  # (the loss only multiplies by it), not a constant baked into two programs.
  @jax.jit
  def update(p, coef):
    config = ppo_update.PPOConfig(epochs=1, minibatches=1, clip=clip, value_clip=vclip,
                                  entropy_coef=coef)
    return ppo_update.update(p, tx.init(p), rollout, jax.random.key(0), apply_fn=apply_fn,
                             tx=tx, config=config, kl_coef=kl_coef)

  coef = 0.5
  (p0, _, m0), (pc, _, mc) = update(params, 0.0), update(params, coef)
  for metrics in (m0, mc):
    for key, value in want.items():
      assert float(metrics[key]) == pytest.approx(value, abs=2e-5), key
  total = want['ppo/policy_loss'] + 0.5 * want['ppo/value_loss']
  assert float(m0['train/loss']) == pytest.approx(total, abs=2e-5)
  assert float(mc['train/loss']) == pytest.approx(total - coef * want['ppo/entropy'], abs=2e-5)
  assert float(mc['train/loss']) - float(m0['train/loss']) == pytest.approx(
      -coef * want['ppo/entropy'], abs=1e-5)
  # SGD at lr 1: params - grad, and grad(c) = grad(0) - c * grad(mean entropy).
  moved = np.asarray(pc['policy']['logits']['kernel'], np.float64) - np.asarray(
      p0['policy']['logits']['kernel'], np.float64)
  np.testing.assert_allclose(moved, coef * kernel_grad, atol=2e-6)
  assert np.abs(coef * kernel_grad).max() > 1e-3  # the bonus is not a vanishing change
  for x, y in zip(jax.tree.leaves(p0['value_head']), jax.tree.leaves(pc['value_head'])):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # over 8 s: left out of the quick check
def test_step_trains_on_the_sampler_log_probs_and_starts_at_zero_kl(monkeypatch):
  """Inside the jitted PPO step (ppo_step.train_step) on a tiny random LM with prompts of
  different lengths: the log-probs the update trains against (recomputed by the learner's
  teacher-forced forward) equal the sampler's raw log-probs of the tokens it drew
  (temperature 1, the policy before any update) and NumPy float64 log-softmax of each
  row's own forward; with the policy equal to the reference, rl/kl is 0 and so are the
  first update's approx KL and clip fraction. The sampler and the update are wrapped only
  to hand out what the step passes between them."""
  import functools
  from rlhf_jax import sampling
  from rlhf_jax.models.transformer import ModelConfig, Transformer
  from rlhf_jax.train import ppo_step
  from rlhf_jax.world import language
  from rlhf_jax.world import reward as reward_lib
  model, params = tiny_learner(1)
  lang = language.make_language(seed=0, vocab_size=64, branching=8, zipf_a=1.1, eos_prob=0.05)
  gold = reward_lib.make_gold_reward(lang, seed=1)

  seen = {}
  real_sample, real_update = sampling.sample, ppo_update.update

  def sample(*args, **kwargs):
    seen['out'] = real_sample(*args, **kwargs)
    return seen['out']

  def update(params, opt_state, rollout, key, **kwargs):
    params, opt_state, metrics = real_update(params, opt_state, rollout, key, **kwargs)
    out = seen['out']
    return params, opt_state, {**metrics, 'test/trainer_logp': rollout.logp,
                               'test/ref_logp': rollout.ref_logp, 'test/mask': rollout.mask,
                               'test/sampler_raw': out.raw_logprobs,
                               'test/response': out.response}

  monkeypatch.setattr(sampling, 'sample', sample)
  monkeypatch.setattr(ppo_update, 'update', update)

  tx = optax.adam(1e-3)
  config = ppo_step.StepConfig(reward='gold', no_eos_penalty=-1.0, kl_control='fixed',
                               kl_target=4.0, kl_horizon=1e4, max_new_tokens=10,
                               ppo=ppo_update.PPOConfig(epochs=1, minibatches=1))
  step = jax.jit(functools.partial(ppo_step.train_step, model=model,
                                   lm=Transformer(ModelConfig(**LM)), rm_model=None, tx=tx,
                                   schedule=optax.constant_schedule(1e-3), config=config))
  state = ppo_step.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.key(3)),
                            kl_coef=jnp.float32(0.05))
  frozen = ppo_step.Frozen(ref_params=jax.tree.map(jnp.copy, params['policy']),
                           rm_params=None,
                           rm_norm=ppo_step.RewardNorm(mean=jnp.zeros(1), scale=jnp.ones(1)),
                           gold=gold)
  prompts, plen = sampling.left_pad(PROMPTS)
  _, metrics = step(state, frozen, ppo_step.PromptBatch(prompts=prompts, prompt_lengths=plen))
  m = jax.device_get(metrics)

  mask = np.asarray(m['test/mask'])
  response = np.asarray(m['test/response'])
  lengths = mask.sum(axis=1).astype(int)
  assert lengths.min() >= 1
  want = np.zeros(mask.shape)
  forwards = rows_forward(params['policy'], PROMPTS,
                          [list(response[i, :lengths[i]]) for i in range(len(PROMPTS))])
  for i, (z, _) in enumerate(forwards):
    want[i, :lengths[i]] = log_softmax64(z)[np.arange(lengths[i]), response[i, :lengths[i]]]
  np.testing.assert_allclose(m['test/sampler_raw'], want, atol=2e-5)
  np.testing.assert_allclose(m['test/trainer_logp'], want, atol=2e-5)
  np.testing.assert_allclose(m['test/trainer_logp'], m['test/sampler_raw'], atol=2e-5)
  np.testing.assert_allclose(m['test/ref_logp'], want, atol=2e-5)
  assert abs(float(m['rl/kl'])) < 1e-4
  assert abs(float(m['ppo/approx_kl'])) < 1e-6 and float(m['ppo/clip_fraction']) == 0.0
  assert float(m['rl/response_length']) == pytest.approx(lengths.mean())
