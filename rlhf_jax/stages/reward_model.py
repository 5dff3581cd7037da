"""Reward model: a scalar head on the Transformer, trunk initialised from an SFT run,
trained with Bradley-Terry on annotator-labelled pairs of the SFT policy's samples;
optionally an ensemble of `rm.ensemble` members (vmapped) for uncertainty.

Evaluation on held-out prompts' pairs reports accuracy on the annotators' labels next to
the noise ceiling, agreement with the gold preference, calibration, correlation with the
gold reward, and the same split by annotator group (stages/reward_eval.py). At the end
each member's mean and standard deviation on the held-out pairs' responses (written by
the policies that made the preference set: the SFT policy, or in iterated rounds every
policy so far) go to DIR/reward_norm.json with the checkpoint step they belong to (the
final one); stages/reward_norm.py refuses them for any other checkpoint. PPO does not use
them: it centres on samples of its own reference policy (stages/ppo.py).

With prefs.data='jsonl:PATH' the pairs are a user's file (stages/jsonl_data.py), from a
run on text: held-out rm/label_accuracy, rm/margin and calibration against the file's
labels are the evaluation (no world: no gold, no annotator groups, no noise ceiling).

The optimiser clips each member's gradient by its own norm (runs.optimizer), so members
train as independent models. With LoRA (the `lora` block, docs/lora.md) each member's trunk
is the SFT params, frozen, with its own adapters; adapters, type embedding and head train.

With rm.objective='outcome' (configs/reward_model.py:task_tiny) the same head becomes an
outcome reward model, a learned verifier: it trains with binary cross-entropy on the init
policy's responses to a task's problems, each labelled 1/0 by the task's verifier
(stages/outcome_data.py), its score the logit of P(correct); held-out orm/* metrics
(accuracy, false-positive and false-negative rates, AUC) grade it against the verifier.
No reward_norm.json is written: GRPO (grpo.reward='orm') uses P(correct) as it is.
"""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, sharding, tasks
from rlhf_jax.data.row_source import RowSource, split_by_prompt
from rlhf_jax.errors import UserError
from rlhf_jax.models import reward_model
from rlhf_jax.stages import (from_run, grpo, jsonl_data, outcome_data, preference_data,
                             reward_eval)
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.train import lora_state, loop, reward_step
from rlhf_jax.train.state import state_from_params


OBJECTIVES = ('pairs', 'outcome')  # Bradley-Terry on preference pairs | BCE on verifier labels


def objective(config) -> str:
  """rm.objective; a run recorded before the field existed trained on pairs."""
  return config.rm.get('objective', 'pairs')


def resolve(config) -> None:
  """The objective's checks; then model and world from init.run (from_run.resolve), and a
  task's sizes against that world."""
  if objective(config) not in OBJECTIVES:
    raise UserError(f'rm.objective={objective(config)!r} is not one of {OBJECTIVES}')
  if objective(config) == 'outcome':
    outcome_data.validate(config)
  from_run.resolve(config)
  if objective(config) == 'outcome':
    tasks.validate(config.task, world_vocab_size=config.world.vocab_size)


class RewardEvaluator:
  """Member rewards of the held-out pairs, and the metrics of reward_eval."""

  def __init__(self, *, source: RowSource, pairs, world, rewards, put):
    """world None: pairs of a user's file, scored against their labels alone."""
    self.batches = source.eval_batches()
    self.rows = source.held_out
    self.held_out = pairs.take(self.rows)
    self.group_utility = (None if world is None else
                          reward_eval.group_utilities(world, self.held_out))
    self.rewards, self.put = rewards, put

  def member_rewards(self, params):
    """(chosen, rejected) [K, N] over the held-out pairs."""
    chosen, rejected = [], []
    for batch in self.batches:
      c, r = distributed.to_host(self.rewards(params, self.put(batch)))
      valid = np.asarray(batch.weight) > 0
      chosen.append(np.asarray(c)[:, valid])
      rejected.append(np.asarray(r)[:, valid])
    return np.concatenate(chosen, axis=1), np.concatenate(rejected, axis=1)

  def __call__(self, state) -> dict:
    chosen, rejected = self.member_rewards(state.params)
    if self.group_utility is None:
      out = reward_eval.label_only_metrics(chosen, rejected)
    else:
      out = reward_eval.metrics(chosen, rejected, self.held_out,
                                group_utility=self.group_utility)
    out['rm/reference_mean'] = float(np.concatenate([chosen, rejected], axis=1).mean())
    return out

  def normalization(self, params) -> dict:
    chosen, rejected = self.member_rewards(params)
    both = np.concatenate([chosen, rejected], axis=1).astype(np.float64)
    return {'mean': both.mean(axis=1).tolist(), 'std': both.std(axis=1).tolist(),
            'reference_responses': both.shape[1]}


def build(config, setup: FromRun, *, workdir: str, given=None):
  """(model, state, shardings, source, pairs) of a reward model on the stage's pairs
  (`given`: preference_data.read_given's, when the caller read them already)."""
  pairs, _, _ = preference_data.load_or_make(config, setup, workdir=workdir, given=given)
  train_rows, held_rows = split_by_prompt(np.asarray(pairs.prompt_id),
                                          eval_fraction=config.prefs.eval_fraction,
                                          seed=config.seed)
  source = RowSource(train=train_rows, held_out=held_rows, batch_size=config.train.batch_size,
                     seed=config.seed, make_batch=functools.partial(preference_data.pair_rows,
                                                                    pairs),
                     what=f'preference pairs of {workdir}')
  model, state, shardings = init_state(config, setup)
  return model, state, shardings, source, pairs


def init_state(config, setup: FromRun):
  """(model, state, shardings): the ensemble at step 0, trunks from the init run."""
  model = reward_model.ensemble(setup.model.cfg, config.rm.ensemble, config.rm.pooling)
  shardings = setup.shardings(reward_model.init_params(model))
  if setup.lora:
    return (model,) + adapter_state(config, setup, model=model, shardings=shardings)

  def start(rng, lm_params):
    """Random heads (one init key per member); every member's trunk the SFT params (and
    its type embedding at its zero init)."""
    params = nn.meta.unbox(reward_model.init_params(model)(rng))
    stacked = jax.tree.map(lambda t: jnp.broadcast_to(t, (config.rm.ensemble,) + t.shape),
                           lm_params)
    params['trunk'] = {**params['trunk'], **stacked}
    return params

  with sharding.activate(setup.mesh, config.mesh):
    params = jax.jit(start, out_shardings=shardings.params)(
        jax.random.wrap_key_data(setup.rng), setup.init.params)
    state = state_from_params(params, tx=setup.tx, rng=setup.rng, shardings=shardings)
  return model, state, shardings


def adapter_state(config, setup: FromRun, *, model, shardings):
  """(state, shardings) under LoRA: the frozen base is every member's copy of the init
  run's params (the trunk without adapters and type embedding); the state holds the rest."""
  lm_keys = ('trunk',)
  frozen_shardings = lora_state.frozen_shardings(shardings.params, lm_keys=lm_keys)
  k = config.rm.ensemble
  stack = lambda lm: {'trunk': jax.tree.map(lambda t: jnp.broadcast_to(t, (k,) + t.shape), lm)}
  frozen = jax.jit(stack, out_shardings=frozen_shardings)(setup.init.params)
  return setup.adapter_state(reward_model.init_params(model), frozen, frozen_shardings,
                             lm_keys=lm_keys)


def _jit_step(train_step, config, setup: FromRun, *, model, shardings, batch_shardings):
  """train_step (pairs' or outcomes') jitted on the mesh, the state donated."""
  step = functools.partial(train_step, model=model, tx=setup.tx, schedule=setup.schedule,
                           bootstrap=config.rm.bootstrap and config.rm.ensemble > 1)
  return setup.jit_step(step, shardings, batch_shardings)


def run(config, *, workdir: str) -> None:
  if objective(config) == 'outcome':
    return run_outcome(config, workdir=workdir)
  # Before DIR is written, and before the init run is loaded: a wrong set leaves DIR as it
  # was and is reported without the wait.
  given = preference_data.read_given(config, workdir=workdir)
  setup = FromRun(config, rows_per_step=config.train.batch_size)
  config_lib.write_or_check(config, workdir)
  model, state, shardings, source, pairs = build(config, setup, workdir=workdir, given=given)
  put = lambda b: distributed.put_global(
      b, sharding.batch_tree_sharding(setup.mesh, config.mesh, b))
  example = source.eval_batches(max_batches=1)[0]
  batch_shardings = sharding.batch_tree_sharding(setup.mesh, config.mesh, example)
  step = _jit_step(reward_step.train_step, config, setup, model=model, shardings=shardings,
                   batch_shardings=batch_shardings)
  rewards = jax.jit(functools.partial(reward_step.pair_rewards, model=model),
                    in_shardings=(setup.full_shardings(shardings.params), batch_shardings))
  jsonl = jsonl_data.source(config) is not None  # a user's pairs: no world, no annotators
  evaluate = RewardEvaluator(source=source, pairs=pairs, world=None if jsonl else setup.world,
                             rewards=lambda params, b: rewards(setup.full(params), b), put=put)
  static = {'rm/train_pairs': len(source.train), 'rm/ensemble': config.rm.ensemble,
            **setup.static_metrics()}
  if jsonl:
    static.update(jsonl_data.static_metrics(given.report, 'rm'))
  else:
    static.update(reward_eval.label_metrics(pairs.take(source.train)))
  spec = loop.LoopSpec.from_config(
      config, workdir=workdir,
      tokens_per_step=2 * config.train.batch_size * (pairs.prompts.shape[1] +
                                                      pairs.chosen.shape[1]))
  with sharding.activate(setup.mesh, config.mesh):
    state = loop.run(spec=spec, state=state, state_shardings=shardings, step=step,
                     source=source, put_batch=put, evaluate=evaluate, static_metrics=static)
    norm = evaluate.normalization(state.params)
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'reward_norm.json')
    with open(path + '.tmp', 'w') as f:
      json.dump({'step': int(jax.device_get(state.step)), **norm}, f, indent=2)
    os.replace(path + '.tmp', path)


def run_outcome(config, *, workdir: str) -> None:
  """The outcome reward model: BCE on verifier-labelled responses (stages/outcome_data)."""
  o = config.outcome
  setup = FromRun(config, rows_per_step=config.train.batch_size)
  task = grpo.make_task(config, setup, max_new_tokens=o.max_new_tokens)
  config_lib.write_or_check(config, workdir)
  train, held = outcome_data.load_or_make(config, setup, task, workdir=workdir)
  model, state, shardings = init_state(config, setup)
  n = train.label.shape[0]
  source = RowSource(train=np.arange(n), held_out=None, batch_size=config.train.batch_size,
                     seed=config.seed, make_batch=train.batch,
                     what=f'verifier-labelled responses of {workdir}')
  example = train.batch(np.arange(config.train.batch_size) % n,
                        np.ones(config.train.batch_size, bool))
  batch_shardings = sharding.batch_tree_sharding(setup.mesh, config.mesh, example)
  step = _jit_step(reward_step.outcome_train_step, config, setup, model=model,
                   shardings=shardings, batch_shardings=batch_shardings)
  evaluate = outcome_data.OutcomeEvaluator(held=held, model=model, samples=o.eval_samples,
                                           mesh=setup.mesh, mesh_config=config.mesh,
                                           dp=setup.dp)
  static = {'orm/train_responses': n, 'orm/train_base_rate': float(train.label.mean()),
            'rm/ensemble': config.rm.ensemble, **setup.static_metrics()}
  spec = loop.LoopSpec.from_config(
      config, workdir=workdir,
      tokens_per_step=config.train.batch_size * (train.prompts.shape[1] +
                                                 train.response.shape[1]))
  with sharding.activate(setup.mesh, config.mesh):
    loop.run(spec=spec, state=state, state_shardings=shardings, step=step, source=source,
             put_batch=lambda b: distributed.put_global(b, batch_shardings),
             evaluate=lambda state: evaluate(state.replace(params=setup.full(state.params))),
             static_metrics=static)
