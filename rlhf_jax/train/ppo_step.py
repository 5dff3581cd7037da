"""One PPO iteration on a language model as a single pure function of (state, frozen,
prompts): sample responses with the KV-cached sampler, score them (reward model, gold,
a task's verifier, or a judge LM against the reference's response, train/judge_reward.py;
plus a penalty for running out of tokens without EOS), take the
reference's log-probs, then ppo_update.update. Jitted once, the rollout and the update run
on the same mesh with no host round trip in between.
"""
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, sampling
from rlhf_jax.sampling_continuous import sample_continuous
from rlhf_jax.models import lora
from rlhf_jax.train import judge_reward, kl_control, ppo_update
from rlhf_jax.train.reward_step import response_sequences
from rlhf_jax.train.state import TrainState
from rlhf_jax.world import language
from rlhf_jax.world import reward as reward_lib


@flax.struct.dataclass
class PPOState(TrainState):
  """TrainState plus kl_coef: [] float32, the KL penalty's current beta (it adapts, so it
  is checkpointed with the rest)."""
  kl_coef: jax.Array


@flax.struct.dataclass
class PromptBatch:
  """prompts: [B, P] int32 left-padded; prompt_lengths: [B] int32. With reward='task' also
  the problems' answers: answers [B, A] int32 (PAD after the answer), answer_lengths [B]
  int32; None otherwise (no leaves, so the 'rm' and 'gold' steps trace as before)."""
  prompts: np.ndarray
  prompt_lengths: np.ndarray
  answers: np.ndarray | None = None
  answer_lengths: np.ndarray | None = None


@flax.struct.dataclass
class RewardNorm:
  """Member k's reward r_k counts as (r_k - mean[k]) / scale[k] before the members are
  averaged. mean: [K] float32, the member's mean on samples of the reference policy;
  scale: [K] float32, 1 (ppo.reward_norm='mean') or its std there ('mean_std')."""
  mean: jax.Array
  scale: jax.Array


@flax.struct.dataclass
class Frozen:
  """What the step reads and never trains: ref_params (an LM's), rm_params (a reward-model
  ensemble's, or None when the score is gold), rm_norm (a RewardNorm: how each member is
  centred and scaled), gold (the world's GoldReward), judge (a judge_reward.JudgeFrozen
  with reward='judge'; None otherwise)."""
  ref_params: object
  rm_params: object
  rm_norm: RewardNorm
  gold: reward_lib.GoldReward
  judge: judge_reward.JudgeFrozen | None = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  reward: str                  # 'rm' | 'gold' | 'task' (the task's verifier) | 'judge'
  no_eos_penalty: float
  kl_control: str
  kl_target: float
  kl_horizon: float
  max_new_tokens: int
  ppo: ppo_update.PPOConfig
  judge_verdicts: tuple[int, int] = (0, 0)  # reward='judge': its FIRST and SECOND tokens
  # LoRA: state.params holds adapters (and the value head); the frozen base of the policy
  # (and critic) is the reference, frozen.ref_params, which the init run gave both.
  lora: bool = False
  # False for text prompts (ppo.data='jsonl:PATH'): no world, so no rl/gold_reward or
  # rl/harm_rate (the world's gold weights would index text token ids meaninglessly).
  world_gold: bool = True
  # ppo.continuous_slots: 0, the static sampler over the batch; else continuous batching
  # of the batch through that many cache rows (sampling_continuous.py), with row keys.
  continuous_slots: int = 0


def sample_rollouts(params, prompts, prompt_lengths, key, *, model, config: StepConfig):
  """The step's sampler: `sampling.sample` over the B rows at once, or (continuous_slots)
  continuous batching through fewer cache rows, the tokens of `sample` with row keys."""
  sample_config = sampling.SampleConfig(max_new_tokens=config.max_new_tokens)
  if not config.continuous_slots:
    return sampling.sample(params, prompts, prompt_lengths, key, model=model,
                           config=sample_config)
  slots = config.continuous_slots
  return sample_continuous(params, prompts, prompt_lengths, key, model=model,
                           config=dataclasses.replace(sample_config, row_keys=True),
                           slots=slots, refill=max(1, slots // 4))


def member_rewards(rm_params, prompts, prompt_lengths, responses, mask, *, rm_model):
  """[K, B] each member's reward of left-padded prompts [B, P] and responses [B, N]."""
  return rm_model.apply({'params': rm_params},
                        *response_sequences(prompts, prompt_lengths, responses, mask))


def proxy_reward(rm_params, rm_norm: RewardNorm, prompts, prompt_lengths, responses, mask, *,
                 rm_model):
  """[B] the reward ensemble's mean over members of (reward - member's reference mean) /
  member's scale."""
  members = member_rewards(rm_params, prompts, prompt_lengths, responses, mask,
                           rm_model=rm_model)
  return ((members - rm_norm.mean[:, None]) / rm_norm.scale[:, None]).mean(axis=0)


def sequence_inputs(prompts, prompt_lengths, responses):
  """(tokens, segment_ids, positions) [B, P+N-1]: the forward that predicts every
  response token (as sampling.score lays it out)."""
  p, n = prompts.shape[1], responses.shape[1]
  tokens = jnp.concatenate([prompts, responses], axis=1)
  segments, positions = sampling.sequence_layout(prompt_lengths, p, p + n)
  return tokens[:, :-1], segments[:, :-1], positions[:, :-1]


def make_apply(model, *, prompt_len: int):
  """apply_fn(params, (inputs, responses)) -> (logp, values, entropy), each [B, N]."""
  def apply_fn(params, inputs):
    (tokens, segments, positions), responses = inputs
    logits, values = model.apply({'params': params}, tokens, segment_ids=segments,
                                 positions=positions)
    logits, values = logits[:, prompt_len - 1:], values[:, prompt_len - 1:]
    return (losses.token_logprobs(logits, responses), values, losses.entropy(logits))
  return apply_fn


def train_step(state: PPOState, frozen: Frozen, batch: PromptBatch, *, model, lm, rm_model,
               tx, schedule, config: StepConfig, task=None, judge_model=None,
               policy_lm=None):
  """model: the PolicyValue learner; lm: the bare Transformer (the policy and reference
  sample and score with it); rm_model: the reward ensemble (None for gold and task);
  task: the rlhf_jax.tasks Task whose verifier scores the responses (reward='task');
  judge_model: the judge LM's Transformer (reward='judge'); policy_lm: the policy's own
  Transformer when it is not `lm` (LoRA: lm with adapters)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  k_sample, k_update = jax.random.split(key)
  prompts, lengths = batch.prompts, batch.prompt_lengths
  full = lambda params: params
  if config.lora:
    base = {k: frozen.ref_params for k in ('policy', 'critic') if k in state.params}
    full = lambda params: lora.combine(params, base)
  out = sample_rollouts(full(state.params)['policy'], prompts, lengths, k_sample,
                        model=policy_lm or lm, config=config)
  response, mask = out.response, out.mask
  inputs = (sequence_inputs(prompts, lengths, response), response)
  learner_apply = make_apply(model, prompt_len=prompts.shape[1])
  apply_fn = lambda params, inputs: learner_apply(full(params), inputs)
  logp, values, _ = apply_fn(state.params, inputs)
  logp, values = logp * mask, values * mask
  ref_logp = sampling.score(frozen.ref_params, prompts, lengths, response, model=lm) * mask
  gold = None
  if config.world_gold:
    gold = reward_lib.gold_reward(frozen.gold, prompts=prompts, prompt_mask=prompts > 0,
                                  responses=response, response_mask=mask)
  if config.reward == 'gold':
    proxy = gold
  elif config.reward == 'task':
    proxy = task.verify(batch.answers, batch.answer_lengths, response, mask)
  elif config.reward == 'judge':
    ref = sample_rollouts(frozen.ref_params, prompts, lengths, jax.random.fold_in(key, 1),
                          model=lm, config=config)
    proxy, _ = judge_reward.direct_reward(
        frozen.judge, jax.random.fold_in(key, 2), prompts=prompts, prompt_lengths=lengths,
        response=response, mask=mask, ref_response=ref.response, ref_mask=ref.mask,
        model=judge_model, first=config.judge_verdicts[0], second=config.judge_verdicts[1])
  else:
    proxy = proxy_reward(frozen.rm_params, frozen.rm_norm, prompts, lengths, response, mask,
                         rm_model=rm_model)
  ended = ((response == language.EOS_ID) & (mask > 0)).any(axis=1)
  score = proxy + config.no_eos_penalty * (~ended)
  rollout = ppo_update.Rollout(inputs=inputs, mask=mask, logp=logp, ref_logp=ref_logp,
                               values=values, score=score)
  params, opt_state, metrics = ppo_update.update(
      state.params, state.opt_state, rollout, k_update, apply_fn=apply_fn,
      tx=tx, config=config.ppo, kl_coef=state.kl_coef)
  kl_coef = kl_control.CONTROLLERS[config.kl_control](
      state.kl_coef, metrics['rl/kl'], n=prompts.shape[0], target=config.kl_target,
      horizon=config.kl_horizon)
  updates_done = state.step * config.ppo.epochs * config.ppo.minibatches
  metrics.update({
      'rl/proxy_reward': proxy.mean(),
      'rl/response_length': mask.sum(axis=1).mean(),
      'rl/eos_rate': ended.mean(),
      'train/lr': schedule(updates_done),
  })
  if config.world_gold:
    harmful = (frozen.gold.harmful[response] & (mask > 0)).any(axis=1)
    metrics.update({'rl/gold_reward': gold.mean(), 'rl/harm_rate': harmful.mean()})
  if config.reward == 'task':  # named as GRPO's step names it, for comparison
    metrics['rl/pass_rate'] = proxy.mean()
  if config.reward == 'judge':  # how often the judge prefers the rollout to the reference's
    metrics['rl/judge_win_rate'] = (proxy > 0).mean() + 0.5 * (proxy == 0).mean()
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       kl_coef=kl_coef), metrics

