"""PPO against a learned reward (or, as an oracle, the gold reward): the policy and a frozen
reference both start from the run named by init.run (SFT); the score is the reward model
of ppo.rm_run (at checkpoint ppo.rm_step), its members' rewards centred (ppo.reward_norm=
'mean'; 'mean_std' also divides each by its std) on samples of the reference policy and
averaged. The statistics are computed once, before the first update, from one reference
sample for each of ppo.reward_norm_prompts seeded world prompts scored by the very
checkpoint the run loads, and kept in DIR/reward_norm.json (stages/reward_norm.py): a
resumed run centres with the same numbers, and the proxy reward is 0 on average at the
reference whichever run or round the reward model learned from.

Each train step is one iteration: `train.batch_size` world prompts from a fixed pool,
one response each from the current policy, then ppo.epochs x ppo.minibatches updates
(rlhf_jax/train/ppo_step.py, all one jitted function). Metrics per step: `rl/*` on the
rollouts (proxy and gold reward, sequence KL to the reference, KL coefficient, length,
EOS and harm rates) and `ppo/*` on the update (losses, entropy, clip fraction, approx KL,
value explained variance); at eval steps `policy/*` on fixed prompts (stages/policy_eval.py)
with the reward model's score of the same samples as policy/proxy_reward.

With ppo.reward='task' (configs/ppo.py:task_tiny) PPO runs against a verifier instead, as
GRPO does (stages/grpo.py): the rollout prompts are the `task` block's training problems
(GRPO's pool, held-out eval problems removed), the score is task.verify (1 right, 0
wrong; rl/pass_rate), no reward model is loaded (ppo.rm_run is ignored), and the eval is
GRPO's eval/* (stages/task_eval.py: pass@k, maj@k on the same held-out problems).

With ppo.reward='judge' (direct RLAIF; configs/cai.py:tiny_direct) the score is a judge
LM's (the `judge` block: kind 'lm', run a judge run on the same world, its checkpoint
judge.step pinned like ppo.rm_step) verdict on each rollout against a response the
reference samples for the same prompt, under a principle of the `constitution` block
drawn per row: r = 2 p - 1 with p the order-averaged P(rollout better)
(train/judge_reward.py); no reward model is loaded and rl/judge_win_rate is logged.

With ppo.data='jsonl:PATH' (init.run and ppo.rm_run runs on text of one tokenizer) the
rollout and reward-normalisation prompts are the file's, the policy/* eval is on its
held-out prompts and has no gold numbers, and rl/gold_reward, rl/harm_rate are not logged
(stages/jsonl_prompts.py); ppo.reward must be 'rm'.
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, judges, sharding, tasks
from rlhf_jax.data.preferences import world_prompts
from rlhf_jax.data.row_source import RowSource
from rlhf_jax.errors import UserError
from rlhf_jax.models import policy_value
from rlhf_jax.stages import from_run, grpo, jsonl_data, jsonl_prompts, reward_norm
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.stages.policy_eval import PolicyEvaluator
from rlhf_jax.stages.task_eval import TaskEvaluator
from rlhf_jax.models import lora
from rlhf_jax.train import judge_reward, lora_state, loop, ppo_step, ppo_update, runs
from rlhf_jax.train.state import abstract_sharded, make_optimizer, make_schedule
from rlhf_jax.world import constitution

REWARDS = ('rm', 'gold', 'task', 'judge')


def resolve(config) -> None:
  """Model and world from init.run; with a reward model, the gold reward and annotator
  blocks from its run (the truth its labels came from), after checking it learned on the
  same world. init.step and ppo.rm_step = -1 are pinned to the steps newest now (as
  from_run.resolve says why). With a task, its sizes are checked against that world."""
  from_run.resolve(config)
  if config.ppo.reward not in REWARDS:
    raise UserError(f'ppo.reward={config.ppo.reward!r} is not one of {REWARDS}')
  if config.ppo.reward == 'task':
    tasks.validate(config.task, world_vocab_size=config.world.vocab_size)
  if config.ppo.reward == 'judge':
    resolve_judge(config)
  if config.ppo.reward != 'rm':
    return
  rm = runs.read_config(os.path.abspath(config.ppo.rm_run), role='ppo.rm_run')
  if rm.get('stage') != 'reward_model':
    raise UserError(f'ppo.rm_run {config.ppo.rm_run} is a {rm.get("stage")!r} run, not a '
                    'reward_model run')
  config.ppo.rm_step = runs.checkpoint_step(config.ppo.rm_run, step=config.ppo.rm_step,
                                            role='ppo.rm_run')
  if rm.world.to_dict() != config.world.to_dict():
    raise UserError(f'ppo.rm_run {config.ppo.rm_run} learned on another world than '
                    f'init.run {config.init.run}')
  if jsonl_data.source(config) is not None:
    jsonl_prompts.check_rm_run(config)
  reward_norm.read_rm(config.ppo.rm_run)  # an unfinished reward-model run fails here
  with config.unlocked():
    for block in ('reward', 'annotators'):
      config[block] = ml_collections.ConfigDict(rm[block].to_dict())


def resolve_judge(config) -> None:
  """Direct RLAIF's judge block checked against its run, and its step pinned."""
  if 'judge' not in config or 'constitution' not in config:
    raise UserError("ppo.reward='judge' needs a judge block (kind, run) and a constitution "
                    'block: configs/cai.py:tiny_direct has both')
  if config.judge.kind != 'lm':
    raise UserError(f"ppo.reward='judge' reads a judge LM (judge.kind='lm'), not "
                    f"{config.judge.kind!r}; a reward-model judge is ppo.reward='rm'")
  judge = runs.read_config(os.path.abspath(config.judge.run), role='judge.run')
  if judge.get('stage') != 'judge':
    raise UserError(f'judge.run {config.judge.run} is a {judge.get("stage")!r} run, not a '
                    'judge run (configs/judge.py)')
  if judge.world.to_dict() != config.world.to_dict():
    raise UserError(f'judge.run {config.judge.run} learned on another world than '
                    f'init.run {config.init.run}')
  trained = len(judge.constitution)
  if trained != len(constitution.from_block(config.constitution)):
    raise UserError(f'judge.run {config.judge.run} was trained on {trained} principles; '
                    f'this constitution has {len(config.constitution)}')
  with config.judge.unlocked():
    config.judge.step = runs.checkpoint_step(config.judge.run,
                                             step=config.judge.get('step', -1),
                                             role='judge.run')


def judge_frozen(config, setup: FromRun):
  """(judge_reward.JudgeFrozen, its shardings, the judge's Transformer, verdict tokens)."""
  principles = constitution.from_block(config.constitution)
  judge = judges.LMJudge(config.judge.run, gold=setup.world.gold,
                         num_principles=len(principles), mesh=setup.mesh,
                         mesh_config=config.mesh, dp=setup.dp, step=config.judge.step)
  vocab = judge.reader.vocab
  weights = np.array([p.weight for p in principles], np.float64)
  with np.errstate(divide='ignore'):
    log_weights = np.log(weights / weights.sum()).astype(np.float32)
  frozen = judge_reward.JudgeFrozen(params=judge.loaded.params,
                                    tags=np.asarray(vocab.tags, np.int32),
                                    log_weights=log_weights)
  replicated = sharding.replicated(setup.mesh)
  shardings = judge_reward.JudgeFrozen(params=judge.loaded.param_shardings,
                                       tags=replicated, log_weights=replicated)
  return frozen, shardings, judge.loaded.model, (vocab.first, vocab.second)


def prompt_pool(config, world, dp: int):
  """(prompts [N, P], lengths [N]): the rollout prompts, fixed by config.seed."""
  key = jax.random.fold_in(jax.random.key(config.seed), 0x990)
  num = -(-config.ppo.num_prompts // dp) * dp
  return world_prompts(world.lang, key=key, num=num, max_len=config.ppo.prompt_len)


class Learner:
  """The PolicyValue model, its optimiser, and its step-0 state with the policy (and
  critic) from the init run's LM params and the value head at 0. With LoRA the state holds
  the policy's (and critic's) adapters and the value head; their base, frozen, is the
  reference's params (ppo_step.StepConfig.lora)."""

  def __init__(self, config, setup: FromRun):
    p = config.ppo
    updates = config.train.steps * p.epochs * p.minibatches
    self.tx = make_optimizer(config.optim, updates)
    self.schedule = make_schedule(config.optim, updates)
    self.model = policy_value.PolicyValue(setup.model.cfg, p.value)
    self.memory = {}
    if setup.lora:
      self._adapters(config, setup)
      return
    _, lm_shardings = abstract_sharded(init_params=policy_value.init_params(self.model),
                                       tx=self.tx, rng=setup.rng, mesh=setup.mesh,
                                       mesh_config=config.mesh)
    self.shardings = ppo_step.PPOState(
        step=lm_shardings.step, params=lm_shardings.params, opt_state=lm_shardings.opt_state,
        rng=lm_shardings.rng, kl_coef=sharding.replicated(setup.mesh))

    def start(rng, lm_params):
      params = nn.meta.unbox(policy_value.init_params(self.model)(rng))
      params['policy'] = jax.tree.map(jnp.copy, lm_params)
      if 'critic' in params:
        params['critic'] = jax.tree.map(jnp.copy, lm_params)
      return ppo_step.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=self.tx.init(params), rng=rng,
                               kl_coef=jnp.float32(p.kl_coef))

    with sharding.activate(setup.mesh, config.mesh):
      self.state = jax.jit(start, out_shardings=self.shardings)(setup.rng, setup.init.params)

  def _adapters(self, config, setup: FromRun):
    lm_keys = ('policy', 'critic')
    full_init = policy_value.init_params(self.model)
    init = lora_state.trainable_init(full_init, lm_keys=lm_keys)
    _, shardings = abstract_sharded(init_params=init, tx=self.tx, rng=setup.rng,
                                    mesh=setup.mesh, mesh_config=config.mesh)
    self.shardings = ppo_step.PPOState(
        step=shardings.step, params=shardings.params, opt_state=shardings.opt_state,
        rng=shardings.rng, kl_coef=sharding.replicated(setup.mesh))
    self.memory = lora_state.memory_metrics(self.tx, full_init, setup.rng, lm_keys=lm_keys)

    def start(rng):
      params = nn.meta.unbox(init(rng))
      return ppo_step.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=self.tx.init(params), rng=rng,
                               kl_coef=jnp.float32(config.ppo.kl_coef))

    with sharding.activate(setup.mesh, config.mesh):
      self.state = jax.jit(start, out_shardings=self.shardings)(setup.rng)

  def policy(self, params, setup: FromRun):
    """The policy's whole params from the state's (with LoRA: adapters and base)."""
    return lora.combine(params['policy'], setup.init.params if setup.lora else None)


def run(config, *, workdir: str) -> None:
  # A JSONL file's bad rows are refused before DIR is written or the init run is loaded.
  given = jsonl_data.read_given(config, workdir=workdir)
  setup = FromRun(config, rows_per_step=config.train.batch_size)
  p = config.ppo
  config_lib.check_continuous_slots('ppo.continuous_slots', p.get('continuous_slots', 0),
                                    setup.dp)
  task = None
  if p.reward == 'task':  # a bad task file fails here, before DIR is written
    task = grpo.make_task(config, setup, max_new_tokens=p.max_new_tokens)
  config_lib.write_or_check(config, workdir)
  texts = None if given is None else jsonl_prompts.load(config, given, setup, workdir=workdir)
  mesh, replicated = setup.mesh, sharding.replicated(setup.mesh)
  learner = Learner(config, setup)
  rm_model, rm_params, rm_shardings = None, None, None
  rm_norm = ppo_step.RewardNorm(mean=np.zeros(1, np.float32), scale=np.ones(1, np.float32))
  if p.reward == 'rm':
    rm = runs.load_reward_model(p.rm_run, mesh=mesh, mesh_config=config.mesh, step=p.rm_step,
                                role='ppo.rm_run')
    rm_model, rm_params, rm_shardings = rm.model, rm.params, rm.param_shardings
    norm_prompts = None if texts is None else jsonl_prompts.reward_norm_prompts(
        config, texts, setup)
    stats = reward_norm.for_ppo(
        config, setup, rm, workdir=workdir, given=norm_prompts,
        prompts_sha256=None if texts is None else texts.lineage['sha256'])
    rm_norm = reward_norm.to_norm(stats, mode=p.reward_norm)
  judge, judge_shardings, judge_model, verdicts = None, None, None, (0, 0)
  if p.reward == 'judge':
    judge, judge_shardings, judge_model, verdicts = judge_frozen(config, setup)
  frozen = ppo_step.Frozen(ref_params=setup.init.params, rm_params=rm_params,
                           rm_norm=rm_norm, gold=setup.world.gold, judge=judge)
  frozen_shardings = ppo_step.Frozen(
      ref_params=setup.init.param_shardings, rm_params=rm_shardings,
      rm_norm=ppo_step.RewardNorm(mean=replicated, scale=replicated),
      gold=jax.tree.map(lambda _: replicated, setup.world.gold), judge=judge_shardings)
  frozen = distributed.put_global(frozen, frozen_shardings)

  policy_shardings = lora.combine(learner.shardings.params['policy'],
                                  setup.init.param_shardings if setup.lora else None)
  if texts is not None:
    pool = ppo_step.PromptBatch(prompts=texts.pool_prompts, prompt_lengths=texts.pool_lengths)
    prompt_len = texts.pool_prompts.shape[1]
  elif task is None:
    pool = ppo_step.PromptBatch(*prompt_pool(config, setup.world, setup.dp))
    prompt_len = p.prompt_len
  else:
    evaluator = TaskEvaluator(task=task, seed=config.world.seed, num_prompts=p.eval_prompts,
                              samples=p.eval_samples, max_new_tokens=p.max_new_tokens,
                              model=setup.init.model, mesh=mesh, mesh_config=config.mesh,
                              param_shardings=policy_shardings,
                              ref_params=setup.init.params, dp=setup.dp)
    problems = grpo.prompt_pool(config, task, held_out=evaluator.batch, dp=setup.dp)
    pool = ppo_step.PromptBatch(prompts=problems.prompts,
                                prompt_lengths=problems.prompt_lengths,
                                answers=problems.answers,
                                answer_lengths=problems.answer_lengths)
    prompt_len = task.prompt_len
  make_batch = lambda rows, valid: jax.tree.map(lambda x: x[rows], pool)
  source = RowSource(train=np.arange(len(pool.prompts)), held_out=None,
                     batch_size=config.train.batch_size, seed=config.seed,
                     make_batch=make_batch, what='ppo prompts')
  rows_sharding = sharding.batch_tree_sharding(mesh, config.mesh, pool.prompt_lengths)
  batch_shardings = ppo_step.PromptBatch(
      prompts=setup.batch_sharding, prompt_lengths=rows_sharding,
      answers=None if task is None else setup.batch_sharding,
      answer_lengths=None if task is None else rows_sharding)
  step_config = ppo_step.StepConfig(
      reward=p.reward, no_eos_penalty=p.no_eos_penalty, kl_control=p.kl_control,
      kl_target=p.kl_target, kl_horizon=p.kl_horizon, max_new_tokens=p.max_new_tokens,
      ppo=ppo_update.PPOConfig.from_config(p), judge_verdicts=verdicts, lora=setup.lora,
      world_gold=texts is None, continuous_slots=p.get('continuous_slots', 0))
  step = jax.jit(functools.partial(ppo_step.train_step, model=learner.model,
                                   lm=setup.init.model, rm_model=rm_model, tx=learner.tx,
                                   schedule=learner.schedule, config=step_config,
                                   task=task, judge_model=judge_model,
                                   policy_lm=setup.model if setup.lora else None),
                 in_shardings=(learner.shardings, frozen_shardings, batch_shardings),
                 out_shardings=(learner.shardings, replicated), donate_argnums=(0,))
  put = lambda b: distributed.put_global(b, batch_shardings)

  proxy = None
  if p.reward == 'rm':
    rollout_shardings = (setup.batch_sharding, rows_sharding, setup.batch_sharding,
                         setup.batch_sharding)
    score = jax.jit(functools.partial(ppo_step.proxy_reward, rm_model=rm_model),
                    out_shardings=rows_sharding)
    proxy = lambda *rollout: score(frozen.rm_params, frozen.rm_norm,
                                   *distributed.put_global(rollout, rollout_shardings))
  if task is None:
    evaluator = PolicyEvaluator(config=config, world=None if texts else setup.world,
                                model=setup.model,
                                mesh=mesh, mesh_config=config.mesh,
                                param_shardings=policy_shardings,
                                ref_params=setup.init.params, dp=setup.dp, proxy=proxy,
                                ref_model=setup.ref_model(),
                                ref_param_shardings=setup.init.param_shardings,
                                prompts=None if texts is None else (texts.held_prompts,
                                                                    texts.held_lengths))
  static = {'rl/prompt_pool': len(pool.prompts),
            'ppo/updates_per_step': p.epochs * p.minibatches, **learner.memory,
            **({} if texts is None else jsonl_prompts.static_metrics(texts))}
  spec = loop.LoopSpec.from_config(
      config, workdir=workdir,
      tokens_per_step=config.train.batch_size * (prompt_len + p.max_new_tokens))
  with sharding.activate(mesh, config.mesh):
    loop.run(spec=spec, state=learner.state, state_shardings=learner.shardings,
             step=lambda state, batch: step(state, frozen, batch), source=source,
             put_batch=put, evaluate=lambda state: evaluator(learner.policy(state.params,
                                                                            setup)),
             static_metrics=static)
