"""GRPO and its relatives against a verifier: the policy and a frozen reference both start
from the run named by init.run (a warm start: SFT on solved traces, `configs/sft.py:
task_tiny`); each train step draws `train.batch_size` problems of the task
(rlhf_jax/tasks) from a fixed pool, samples grpo.group_size responses to each, scores
them with the task's verifier (1 right, 0 wrong) and updates on group-relative advantages
(grpo.advantage: grpo | dr_grpo | rloo | reinforce_pp) with the clipped surrogate
(train/grpo_update.py). All in one jitted step (train/grpo_step.py).

Metrics per step: `rl/*` on the rollouts (pass rate, KL to the reference, length, entropy),
`grpo/*` on the update (loss, clip fractions, zero-variance groups) and `mismatch/*`
(sampler vs trainer log-probs); at eval steps `eval/*` (stages/task_eval.py: pass@k, maj@k
on held-out problems, none of which is in the training pool).

With grpo.reward='orm' (configs/grpo.py:tiny_orm) the training score is a learned
verifier's: the P(correct) of the outcome reward model of grpo.rm_run (a reward_model run
with rm.objective='outcome' on the same task and world; its checkpoint grpo.rm_step pinned
at resolve), logged as rl/orm_score; rl/pass_rate and eval/* stay the true verifier's, and
the eval adds eval/orm_bon@k (best-of-k under the ORM). Proxy up, true pass rate where?
With grpo.reward='majority' the score is agreement with the group's majority answer (no
check of any kind; the self-improvement loop's self-consistency filter as a reward).
"""
import functools
import os

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, sharding, tasks
from rlhf_jax.data.row_source import RowSource
from rlhf_jax.errors import UserError
from rlhf_jax.stages import from_run, outcome_data, task_eval
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.stages.task_eval import TaskEvaluator
from rlhf_jax.train import group_advantages, grpo_step, grpo_update, loop, runs

REWARDS = ('verifier', 'orm', 'majority')  # the training score (train/grpo_step.py)


def reward(config) -> str:
  """grpo.reward; configs without the field (every run before it) score by the verifier."""
  return config.grpo.get('reward', 'verifier')

SAMPLE_DTYPES = ('float32', 'bfloat16')


def validate(config) -> None:
  g = config.grpo
  for name, choices in (('advantage', tuple(group_advantages.ESTIMATORS)),
                        ('loss_agg', ('sequence', 'token', 'constant')),
                        ('kl', ('loss', 'reward', 'off')), ('sample_dtype', SAMPLE_DTYPES)):
    if g[name] not in choices:
      raise UserError(f'grpo.{name}={g[name]!r} is not one of {choices}')
  if g.group_size < 2:
    raise UserError(f'grpo.group_size={g.group_size}: a group-relative advantage needs at '
                    'least 2 samples per prompt')
  if g.epochs < 1 or g.minibatches < 1:
    raise UserError(f'grpo.epochs={g.epochs} and grpo.minibatches={g.minibatches} must be >= 1')
  rollouts = config.train.batch_size * g.group_size
  if rollouts % g.minibatches:
    raise UserError(f'{rollouts} rollouts per step (train.batch_size x grpo.group_size) are '
                    f'not divisible into grpo.minibatches={g.minibatches}')
  if not (g.clip_low > 0 and g.clip_high > 0) or g.clip_low >= 1:
    raise UserError(f'grpo.clip_low={g.clip_low} must be in (0, 1) and grpo.clip_high='
                    f'{g.clip_high} positive')
  if g.kl_coef < 0 or g.tis_cap < 0:
    raise UserError(f'grpo.kl_coef={g.kl_coef} and grpo.tis_cap={g.tis_cap} must be >= 0')
  if not g.temperature > 0:
    raise UserError(f'grpo.temperature={g.temperature} must be > 0')
  for name in ('num_prompts', 'max_new_tokens', 'eval_prompts', 'eval_samples'):
    if g[name] <= 0:
      raise UserError(f'grpo.{name}={g[name]} must be positive')
  if g.num_prompts < config.train.batch_size:
    raise UserError(f'grpo.num_prompts={g.num_prompts} is smaller than one batch of '
                    f'{config.train.batch_size} prompts')
  if reward(config) not in REWARDS:
    raise UserError(f'grpo.reward={reward(config)!r} is not one of {REWARDS}')
  if reward(config) == 'orm' and not g.get('rm_run'):
    raise UserError("grpo.reward='orm' needs grpo.rm_run, an outcome reward model run "
                    "(configs/reward_model.py:task_tiny); configs/grpo.py:tiny_orm has it")


def _orm_config(config):
  """grpo.rm_run's config, checked to be an outcome reward model's."""
  rm = runs.read_config(os.path.abspath(config.grpo.rm_run), role='grpo.rm_run')
  if rm.get('stage') != 'reward_model':
    raise UserError(f'grpo.rm_run {config.grpo.rm_run} is a {rm.get("stage")!r} run, not a '
                    'reward_model run')
  if rm.rm.get('objective', 'pairs') != 'outcome':
    raise UserError(f'grpo.rm_run {config.grpo.rm_run} is a Bradley-Terry reward model '
                    "(rm.objective='pairs'), not an outcome reward model of a verifier's "
                    "labels (rm.objective='outcome', configs/reward_model.py:task_tiny)")
  return rm


def resolve(config) -> None:
  """The grpo block's checks; model and world from init.run (init.step = -1 pinned to the
  newest, as from_run.resolve says why); then the task's sizes against that world."""
  validate(config)
  rm = _orm_config(config) if reward(config) == 'orm' else None
  from_run.resolve(config)
  tasks.validate(config.task, world_vocab_size=config.world.vocab_size)
  if rm is None:
    return
  if rm.world.to_dict() != config.world.to_dict() or rm.task.to_dict() != config.task.to_dict():
    raise UserError(f'grpo.rm_run {config.grpo.rm_run} learned on another world or task '
                    f'than this run (init.run {config.init.run}, task {config.task.name})')
  config.grpo.rm_step = runs.checkpoint_step(config.grpo.rm_run, step=config.grpo.rm_step,
                                             role='grpo.rm_run')


def make_task(config, setup: FromRun, *, max_new_tokens: int):
  """The task of config.task for the init run's vocabulary (and tokenizer, for text)."""
  task = tasks.make_task(config.task, vocab_size=setup.init.model.cfg.vocab_size,
                         tokenizer=setup.tokenizer())
  if task.response_len > max_new_tokens:
    raise UserError(f'task {task.name}: a solved trace needs {task.response_len} new tokens '
                    f'but {config.stage}.max_new_tokens={max_new_tokens}')
  return task


def prompt_pool(config, task, *, held_out, dp: int, field: str | None = None):
  """The training problems, fixed by config.seed, with every held-out problem removed
  (so eval/* measures generalisation, not recall); a multiple of dp rows. The size is
  the config's `field`, <stage>.num_prompts unless given (grpo's, or ppo's with
  ppo.reward='task': the same pool; the outcome RM's outcome.pool_prompts)."""
  key = jax.random.fold_in(jax.random.key(config.seed), 0x6790)
  field = field or f'{config.stage}.num_prompts'
  block, name = field.split('.')
  num = config[block][name]
  pool = task_eval.without_held_out(task.make_prompts(key=key, num=num), held_out)
  n = pool.prompts.shape[0] // dp * dp
  if n < config.train.batch_size:
    raise UserError(f'task {task.name}: only {pool.prompts.shape[0]} of {field}='
                    f'{num} problems are not held out for eval; the '
                    'task has too few distinct problems (raise its difficulty)')
  return jax.tree.map(lambda x: x[:n], pool)


def step_config(config) -> grpo_step.StepConfig:
  g = config.grpo
  return grpo_step.StepConfig(
      group_size=g.group_size, advantage=g.advantage, dynamic_sampling=g.dynamic_sampling,
      max_new_tokens=g.max_new_tokens, temperature=g.temperature,
      sample_dtype=g.sample_dtype, update=grpo_update.GRPOConfig.from_config(g),
      reward=reward(config))


def run(config, *, workdir: str) -> None:
  g = config.grpo
  setup = FromRun(config, rows_per_step=config.train.batch_size,
                  updates_per_step=g.epochs * g.minibatches)
  task = make_task(config, setup, max_new_tokens=g.max_new_tokens)  # a bad file fails here
  config_lib.write_or_check(config, workdir)
  lm = setup.init.model
  state, shardings = setup.lm_state(setup.init.params)
  rm = None
  if reward(config) == 'orm':
    rm = runs.load_reward_model(g.rm_run, mesh=setup.mesh, mesh_config=config.mesh,
                                step=g.rm_step, role='grpo.rm_run')
  evaluator = TaskEvaluator(task=task, seed=config.world.seed, num_prompts=g.eval_prompts,
                            samples=g.eval_samples, max_new_tokens=g.max_new_tokens,
                            model=lm, mesh=setup.mesh, mesh_config=config.mesh,
                            param_shardings=shardings.params, ref_params=setup.init.params,
                            dp=setup.dp,
                            orm=rm and outcome_data.OutcomeScorer(
                                model=rm.model, params=rm.params, mesh=setup.mesh,
                                mesh_config=config.mesh, dp=setup.dp))
  pool = prompt_pool(config, task, held_out=evaluator.batch, dp=setup.dp)
  make_batch = lambda rows, valid: grpo_step.TaskPrompts(
      prompts=pool.prompts[rows], prompt_lengths=pool.prompt_lengths[rows],
      answers=pool.answers[rows], answer_lengths=pool.answer_lengths[rows])
  source = RowSource(train=np.arange(pool.prompts.shape[0]), held_out=None,
                     batch_size=config.train.batch_size, seed=config.seed,
                     make_batch=make_batch, what=f'{task.name} problems')
  rows_sharding = sharding.batch_tree_sharding(setup.mesh, config.mesh, pool.prompt_lengths)
  batch_shardings = grpo_step.TaskPrompts(prompts=setup.batch_sharding,
                                          prompt_lengths=rows_sharding,
                                          answers=setup.batch_sharding,
                                          answer_lengths=rows_sharding)
  frozen_shardings = grpo_step.Frozen(ref_params=setup.init.param_shardings,
                                      rm_params=rm and rm.param_shardings)
  frozen = distributed.put_global(grpo_step.Frozen(ref_params=setup.init.params,
                                                   rm_params=rm and rm.params),
                                  frozen_shardings)
  replicated = sharding.replicated(setup.mesh)
  step = jax.jit(functools.partial(grpo_step.train_step, lm=lm, task=task, tx=setup.tx,
                                   schedule=setup.schedule, config=step_config(config),
                                   rm_model=rm and rm.model),
                 in_shardings=(shardings, frozen_shardings, batch_shardings),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))
  static = {'rl/prompt_pool': pool.prompts.shape[0],
            'grpo/rollouts_per_step': config.train.batch_size * g.group_size,
            'grpo/updates_per_step': g.epochs * g.minibatches}
  spec = loop.LoopSpec.from_config(
      config, workdir=workdir,
      tokens_per_step=config.train.batch_size * g.group_size * (task.prompt_len +
                                                                g.max_new_tokens))
  with sharding.activate(setup.mesh, config.mesh):
    loop.run(spec=spec, state=state, state_shardings=shardings,
             step=lambda state, batch: step(state, frozen, batch), source=source,
             put_batch=lambda b: distributed.put_global(b, batch_shardings),
             evaluate=lambda state: evaluator(state.params), static_metrics=static)
