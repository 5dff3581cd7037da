"""The pieces under the SFT, reward-model and DPO stages against independent computations:
the reward-model metrics on hand-made cases, the SFT batch's masked loss against the
sampler's teacher-forced scores, the DPO step's loss against the NumPy formula, an
ensemble whose members train independently (and clip their own gradients), and the row
source's epochs."""
import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import sampling
from rlhf_jax.data.batch import PairBatch, prompt_response_batch
from rlhf_jax.data.row_source import RowSource, split_by_prompt
from rlhf_jax.models import reward_model
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.stages import reward_eval
from rlhf_jax.train import dpo_step, lm_step, reward_step, runs
from rlhf_jax.train.state import TrainState, make_optimizer
from conftest import load_config
from test_preference_losses import HP, numpy_loss

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, d_ff=64)


def test_calibration_error_by_hand():
  # Confidences 0.91, 0.92 (right, right), 0.62 (p = 0.38: wrong), 0.56 (right).
  p = np.array([0.91, 0.92, 0.38, 0.56])
  # Bins of width 0.05 over [0.5, 1]: 0.91, 0.92 -> bin 8, 0.62 -> bin 2, 0.56 -> bin 1.
  expected = 0.5 * abs(1 - 0.915) + 0.25 * abs(0 - 0.62) + 0.25 * abs(1 - 0.56)
  assert reward_eval.calibration_error(p) == pytest.approx(expected)


def test_metrics_on_a_hand_made_case():
  class Pairs:
    gold_chosen = np.array([1.0, 0.0, 2.0, 0.5])
    gold_rejected = np.array([0.0, 1.0, 2.0, 0.0])     # pair 2: a gold tie
    annotator_prob = np.array([0.9, 0.3, 0.5, 0.8], np.float32)
    group = np.array([0, 1, 0, 0])
  chosen = np.array([[2.0, 0.0, 1.0, 0.0]])
  rejected = np.array([[1.0, 1.0, 0.0, 0.0]])            # margins 1, -1, 1, 0 (a tie)
  util = np.stack([np.stack([Pairs.gold_chosen, Pairs.gold_rejected], -1)] * 2)
  m = reward_eval.metrics(chosen, rejected, Pairs, group_utility=list(util))
  assert m['rm/label_accuracy'] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
  assert m['rm/noise_ceiling'] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
  assert m['rm/gold_accuracy'] == pytest.approx((1 + 1 + 0.5) / 3)  # tie left out
  assert m['rm/label_gold_accuracy'] == pytest.approx(2 / 3)
  assert m['rm/group1/label_accuracy'] == 0.0 and m['rm/group1/gold_accuracy'] == 1.0
  assert m['rm/group0/label_accuracy'] == pytest.approx(2.5 / 3)
  golds = np.concatenate([Pairs.gold_chosen, Pairs.gold_rejected])
  assert m['rm/gold_correlation'] == pytest.approx(
      np.corrcoef(np.concatenate([chosen[0], rejected[0]]), golds)[0, 1])


def _lm_params(model):
  """Jitted init from an RBG key (op by op, or compiling threefry's draws, takes seconds)."""
  ids = np.ones((1, 4), np.int32)
  init = jax.jit(lambda key: model.init(key, ids, segment_ids=ids, positions=ids)['params'])
  return nn.meta.unbox(init(jax.random.key(0, impl='rbg')))


@pytest.mark.slow
def test_sft_batch_loss_is_the_response_score():
  """The SFT batch's weighted log-probs equal the sampler's teacher-forced scores of the
  responses: the loss covers exactly the response tokens, with the sampler's layout."""
  model = Transformer(CFG)
  prompts, lengths = sampling.left_pad([[1, 5, 6], [1, 7], [1, 8, 9, 10]])
  responses = np.array([[11, 12, 2, 0], [13, 2, 0, 0], [14, 15, 16, 17]], np.int32)
  mask = (np.arange(4)[None] < np.array([[3], [2], [4]])).astype(np.float32)
  batch = prompt_response_batch(prompts, lengths, responses, mask)
  # Init (from an RBG key: threefry's compile takes seconds) and both forwards jitted; op
  # by op they took most of the test's 15 s.
  ids = np.ones((1, 4), np.int32)
  params = nn.meta.unbox(jax.jit(lambda k: model.init(k, ids, segment_ids=ids, positions=ids))(
      jax.random.key(0, impl='rbg'))['params'])
  ours = np.asarray(jax.jit(functools.partial(lm_step.eval_logprobs, model=model))(
      params, batch)).sum(1)
  ref = (np.asarray(jax.jit(functools.partial(sampling.score, model=model))(
      params, prompts, lengths, responses)) * mask).sum(1)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  assert batch.weights.sum() == mask.sum()


def _pair_batch(b=4, p=4, r=5, seed=0):
  rng = np.random.default_rng(seed)
  prompts, lengths = sampling.left_pad([[1] + list(rng.integers(3, 32, rng.integers(1, p)))
                                        for _ in range(b)], length=p)
  lens = rng.integers(1, r + 1, size=(2, b))
  masks = (np.arange(r)[None, None] < lens[..., None]).astype(np.float32)
  toks = rng.integers(3, 32, size=(2, b, r)).astype(np.int32) * masks.astype(np.int32)
  return PairBatch(prompts=prompts, prompt_lengths=lengths, chosen=toks[0], rejected=toks[1],
                   chosen_mask=masks[0], rejected_mask=masks[1],
                   weight=np.ones(b, np.float32), ref_chosen=rng.normal(size=b).astype(np.float32),
                   ref_rejected=rng.normal(size=b).astype(np.float32))


@pytest.mark.slow
def test_dpo_step_loss_matches_numpy():
  """The step's loss is the family's formula (test_preference_losses.numpy_loss, float64) on
  the sampler's teacher-forced sequence scores, the masks' lengths and, for KTO, the
  partner rows' scores: SimPO (length-normalised, reference-free) and KTO (summed
  log-ratios against the reference, mismatched KL), whose metrics report beta h."""
  model = Transformer(CFG)
  batch = _pair_batch()
  rng = np.random.default_rng(5)
  batch = batch.replace(kl_response=np.roll(batch.chosen, 1, axis=0),
                        kl_mask=np.roll(batch.chosen_mask, 1, axis=0),
                        ref_kl=rng.normal(-8, 1, 4).astype(np.float32))
  params = _lm_params(model)
  tx = optax.sgd(0.0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  teacher_forced = jax.jit(functools.partial(sampling.score, model=model))
  score = lambda y, m: (np.asarray(teacher_forced(params, batch.prompts, batch.prompt_lengths,
                                                  y), np.float64) * m).sum(1)
  pc, pr = score(batch.chosen, batch.chosen_mask), score(batch.rejected, batch.rejected_mask)
  args = (pc, pr, batch.ref_chosen, batch.ref_rejected, batch.chosen_mask.sum(1),
          batch.rejected_mask.sum(1), batch.weight, score(batch.kl_response, batch.kl_mask),
          batch.ref_kl)
  for loss in ('simpo', 'kto'):
    step = jax.jit(functools.partial(dpo_step.train_step, model=model, tx=tx,
                                     schedule=lambda s: 0.0, loss=loss, hparams=HP))
    _, metrics = step(state, batch)
    expected = numpy_loss(loss, *args, HP).mean()
    assert float(metrics['train/loss']) == pytest.approx(expected, rel=1e-4, abs=1e-6), loss
    if loss == 'kto':
      z0 = max(0.0, (args[7] - args[8]).mean())
      assert float(metrics['dpo/kto_z0']) == pytest.approx(z0, rel=1e-4, abs=1e-6)
  h = (pc - batch.ref_chosen) - (pr - batch.ref_rejected)
  assert float(metrics['dpo/margin']) == pytest.approx(HP['beta'] * h.mean(), rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_ensemble_members_train_independently():
  """Member k's update depends on member k alone: training a 2-member ensemble equals
  training each member as a 1-member ensemble."""
  batch = _pair_batch(seed=1)
  two = reward_model.ensemble(CFG, 2)
  # Init and step jitted, as the stage runs them (op by op they took 45 s of the test's 48).
  params = jax.device_get(nn.meta.unbox(jax.jit(reward_model.init_params(two))(
      jax.random.key(3))))
  tx = optax.adam(1e-2)

  @functools.cache
  def step_of(m):
    return jax.jit(lambda p: reward_step.train_step(
        TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                   rng=jax.random.key_data(jax.random.key(0))),
        batch, model=m, tx=tx, schedule=lambda s: 0.0, bootstrap=False)[0].params)

  step = lambda p, m: step_of(m)(p)
  both = step(params, two)
  one = reward_model.ensemble(CFG, 1)
  for k in range(2):
    alone = step(jax.tree.map(lambda x: x[k:k + 1], params), one)
    for x, y in zip(jax.tree.leaves(alone), jax.tree.leaves(both)):
      np.testing.assert_allclose(x[0], y[k], rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_ensemble_members_clip_their_own_gradients():
  """With the reward-model stage's own optimiser (runs.optimizer of configs/reward_model.py,
  clip_norm small enough to clip every member at every step), 3 members trained together
  for 6 steps equal 3 one-member ensembles trained alone from the same init on the same
  batches. The members' gradient norms differ, so a clip shared over the ensemble (the
  optimiser without members) scales them differently and does not match."""
  k, steps = 3, 6
  config = load_config('reward_model', 'tiny')
  config.rm.ensemble, config.train.steps, config.optim.clip_norm = k, steps, 0.05
  alone_config = copy.deepcopy(config)
  alone_config.rm.ensemble = 1
  batches = [_pair_batch(seed=s) for s in range(steps)]
  models = {n: reward_model.ensemble(CFG, n) for n in (1, k)}
  # Init jitted, as the stage runs it: op by op it took about 14 s of the test's 36.
  params = nn.meta.unbox(jax.jit(reward_model.init_params(models[k]))(jax.random.key(3)))

  @functools.cache
  def jitted(n, tx):
    return jax.jit(functools.partial(reward_step.train_step, model=models[n], tx=tx,
                                     schedule=lambda s: 0.0, bootstrap=False))

  def train(params, tx):
    step = jitted(jax.tree.leaves(params)[0].shape[0], tx)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    norms = []
    for batch in batches:
      state, metrics = step(state, batch)
      norms.append(float(metrics['train/grad_norm']))
    return state.params, np.array(norms)

  together, together_norms = train(params, runs.optimizer(config))
  tx_alone = runs.optimizer(alone_config)
  alone = [train(jax.tree.map(lambda x: x[i:i + 1], params), tx_alone) for i in range(k)]
  alone_norms = np.stack([n for _, n in alone])             # [K, steps], before clipping
  assert alone_norms.min() > 4 * config.optim.clip_norm      # every update was clipped
  assert (alone_norms.max(axis=0) > 1.05 * alone_norms.min(axis=0)).all()  # unequal norms
  # train/grad_norm of the ensemble is its largest member's norm.
  np.testing.assert_allclose(together_norms, alone_norms.max(axis=0), rtol=1e-4)
  # The head's bias is left out: Bradley-Terry sees only reward differences, so its
  # gradient is 0 up to rounding, which Adam's normalisation blows up to lr-sized noise.
  trained = lambda p: [x for path, x in jax.tree_util.tree_leaves_with_path(p)
                       if jax.tree_util.keystr(path) != "['head']['bias']"]
  for i, (member, _) in enumerate(alone):
    for x, y in zip(trained(member), trained(together)):
      np.testing.assert_allclose(x[0], y[i], rtol=2e-5, atol=2e-6)
  shared, _ = train(params, make_optimizer(config.optim, steps))
  # The shared clip fails the same check (by about 7e-4 on the largest leaf, 10x its
  # tolerance there).
  assert not all(np.allclose(x[0], y[i], rtol=2e-5, atol=2e-6)
                 for i, (member, _) in enumerate(alone)
                 for x, y in zip(trained(member), trained(shared)))


def test_row_source_epochs_and_held_out_split():
  made = []
  source = RowSource(train=np.arange(10, 17), held_out=np.array([3, 4, 5]), batch_size=3,
                     seed=0, make_batch=lambda rows, valid: made.append((rows, valid)) or rows,
                     what='test')
  seen = np.concatenate([source.next_batch() for _ in range(7)])  # 21 rows = 3 epochs
  for epoch in range(3):
    assert sorted(seen[7 * epoch:7 * epoch + 7]) == list(range(10, 17))
  source.set_state({'index': 2})
  np.testing.assert_array_equal(source.next_batch(), seen[6:9])
  batches = source.eval_batches()
  assert len(batches) == 1 and made[-1][1].all()
  train, held = split_by_prompt(np.repeat(np.arange(20), 3), eval_fraction=0.1, seed=0)
  ids = np.repeat(np.arange(20), 3)
  assert len(set(ids[held])) == 2 and not set(ids[held]) & set(ids[train])
  assert len(train) + len(held) == 60


def test_acquisition_ranks_by_member_disagreement():
  from rlhf_jax.data import acquisition
  from rlhf_jax.errors import UserError
  first = np.array([[0.0, 2.0, 1.0], [0.0, -2.0, 1.0]])   # pair 1: members disagree most
  second = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  sig = lambda x: 1 / (1 + np.exp(-x))
  expected = [0.0, abs(sig(2.0) - sig(-2.0)) / 2, abs(sig(1.0) - sig(0.0)) / 2]
  scores = acquisition.disagreement(first, second)
  np.testing.assert_allclose(scores, expected, atol=1e-12)
  np.testing.assert_allclose(acquisition.disagreement(second, first), scores, atol=1e-12)
  rng = np.random.default_rng(0)
  picked = acquisition.select(strategy='disagreement', scores=scores,
                              candidates=np.array([0, 1, 2]), n=2, rng=rng)
  assert list(picked) == [1, 2]
  randomly = acquisition.select(strategy='random', scores=None, candidates=np.arange(10),
                                n=4, rng=rng)
  assert len(set(randomly.tolist())) == 4
  with pytest.raises(UserError, match='unknown acquisition strategy'):
    acquisition.select(strategy='uncertainty', scores=scores, candidates=np.arange(3), n=1,
                       rng=rng)
