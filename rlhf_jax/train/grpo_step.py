"""One GRPO iteration as a single pure function of (state, frozen, prompts): G samples per
prompt from the KV-cached sampler, the task's verifier scores each, group-relative
advantages (train/group_advantages.py), then grpo_update.update. Jitted once, like PPO's
step (train/ppo_step.py): rollout, scoring and update run on the mesh with no host round
trip.

The sampler may run in bfloat16 (`sample_dtype`) while the trainer recomputes the old
log-probs in the model's own dtype; the gap between the two is logged (`mismatch/*`) and
truncated importance sampling (`tis_cap`) corrects for it in the update.

With reward='orm' the training score is a learned verifier's instead (an outcome reward
model, frozen): its P(correct) of each response, in [0, 1] like the verifier's 1/0, so
that the advantages keep a ranking within groups the ORM judges alike; rl/pass_rate stays
the true verifier's rate on the same rollouts and rl/orm_score logs the proxy.
With reward='majority' no check at all: a response scores 1 when its stated answer is its
group's majority answer (maj@k's vote, analysis/verifier_metrics.majority_agreement), as
test-time RL (TTRL, Zuo et al. 2025) rewards agreement; rl/majority_agreement logs it.
"""
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax import losses, sampling
from rlhf_jax.analysis import verifier_metrics
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.train import group_advantages, grpo_update, reward_step
from rlhf_jax.train.ppo_step import sequence_inputs
from rlhf_jax.train.state import TrainState
from rlhf_jax.world import language


@flax.struct.dataclass
class TaskPrompts:
  """prompts [B, P] int32 left-padded; prompt_lengths [B]; answers [B, A] int32 (PAD after
  the answer); answer_lengths [B]."""
  prompts: jax.Array
  prompt_lengths: jax.Array
  answers: jax.Array
  answer_lengths: jax.Array


@flax.struct.dataclass
class Frozen:
  """ref_params: the reference policy's (the init run's) params; rm_params: the outcome
  reward model's (reward='orm'; else None)."""
  ref_params: object
  rm_params: object = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  group_size: int
  advantage: str
  dynamic_sampling: bool
  max_new_tokens: int
  temperature: float
  sample_dtype: str          # 'float32' | 'bfloat16': the sampler's compute dtype
  update: grpo_update.GRPOConfig
  reward: str = 'verifier'   # 'verifier': task.verify | 'orm': the ORM's P(correct) |
                             # 'majority': agreement with the group's vote


def sampling_model(lm: Transformer, sample_dtype: str) -> Transformer:
  """The model the sampler runs: the trainer's, in `sample_dtype` compute."""
  if lm.cfg.dtype == sample_dtype:
    return lm
  return Transformer(dataclasses.replace(lm.cfg, dtype=sample_dtype))


def make_apply(model: Transformer, *, prompt_len: int):
  """apply_fn(params, (inputs, responses)) -> (logp, entropy), each [B, N]."""
  def apply_fn(params, inputs):
    (tokens, segments, positions), responses = inputs
    logits = model.apply({'params': params}, tokens, segment_ids=segments,
                         positions=positions).logits[:, prompt_len - 1:]
    return losses.token_logprobs(logits, responses), losses.entropy(logits)
  return apply_fn


def majority_score(task, response, mask, *, group_size: int) -> jax.Array:
  """[B*G] float32, reward='majority': 1 where a response states its group's majority
  answer (groups of group_size consecutive rows), else 0."""
  stated, found = task.extract(response, mask)
  b = response.shape[0] // group_size
  agree = verifier_metrics.majority_agreement(stated.reshape(b, group_size, -1),
                                              found.reshape(b, group_size))
  return agree.reshape(-1).astype(jnp.float32)


def rollout_scores(state_params, frozen: Frozen, batch: TaskPrompts, key, *, lm: Transformer,
                   task, config: StepConfig, rm_model=None):
  """Samples G responses per prompt and scores them. Returns (GroupRollout, metrics).
  rm_model: the outcome reward ensemble (reward='orm')."""
  g = config.group_size
  rows = batch.prompts.shape[0] * g
  rep = lambda x: jnp.repeat(x, g, axis=0)
  prompts, lengths = rep(batch.prompts), rep(batch.prompt_lengths)
  answers, answer_lengths = rep(batch.answers), rep(batch.answer_lengths)
  groups = jnp.repeat(jnp.arange(batch.prompts.shape[0], dtype=jnp.int32), g)
  sampler_lm = sampling_model(lm, config.sample_dtype)
  out = sampling.sample(state_params, prompts, lengths, key, model=sampler_lm,
                        config=sampling.SampleConfig(max_new_tokens=config.max_new_tokens,
                                                     temperature=config.temperature))
  response, mask = out.response, out.mask
  inputs = (sequence_inputs(prompts, lengths, response), response)
  logp, entropy = make_apply(lm, prompt_len=prompts.shape[1])(state_params, inputs)
  logp = logp * mask
  ref_logp = sampling.score(frozen.ref_params, prompts, lengths, response, model=lm) * mask
  correct = task.verify(answers, answer_lengths, response, mask)
  proxy = correct
  if config.reward == 'orm':
    proxy = reward_step.outcome_probability(frozen.rm_params, prompts, lengths, response,
                                            mask, model=rm_model)
  elif config.reward == 'majority':
    proxy = majority_score(task, response, mask, group_size=g)
  seq_kl = ((logp - ref_logp) * mask).sum(axis=1)
  u = config.update
  score = proxy - u.kl_coef * seq_kl if u.kl == 'reward' else proxy
  valid = jnp.ones((rows,), jnp.float32)
  flat = group_advantages.zero_variance(score, groups, valid,
                                        num_groups=batch.prompts.shape[0])
  if config.dynamic_sampling:
    valid = (~flat[groups]).astype(jnp.float32)
  adv = group_advantages.advantages(config.advantage, score, groups, valid,
                                    num_groups=batch.prompts.shape[0])
  rollout = grpo_update.GroupRollout(inputs=inputs, mask=mask, logp=logp,
                                     sample_logp=out.raw_logprobs, ref_logp=ref_logp,
                                     advantages=adv, valid=valid)
  ended = ((response == language.EOS_ID) & (mask > 0)).any(axis=1)
  mismatch = verifier_metrics.logprob_mismatch(out.raw_logprobs, logp, mask)
  metrics = {
      'rl/pass_rate': correct.mean(),
      'rl/score': score.mean(),
      'rl/kl': seq_kl.mean(),
      'rl/response_length': mask.sum(axis=1).mean(),
      'rl/eos_rate': ended.mean(),
      'rl/entropy': (entropy * mask).sum() / jnp.maximum(mask.sum(), 1.0),
      'grpo/zero_variance_fraction': flat.mean(),
      'grpo/valid_fraction': valid.mean(),
      **{f'mismatch/{k}': v for k, v in mismatch.items()},
  }
  if config.reward == 'orm':
    metrics['rl/orm_score'] = proxy.mean()
  elif config.reward == 'majority':
    metrics['rl/majority_agreement'] = proxy.mean()
  return rollout, metrics


def train_step(state: TrainState, frozen: Frozen, batch: TaskPrompts, *, lm: Transformer,
               task, tx, schedule, config: StepConfig, rm_model=None):
  """lm: the policy's Transformer (the reference shares it); task: a rlhf_jax.tasks Task;
  rm_model: the outcome reward ensemble (reward='orm')."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  k_sample, k_update = jax.random.split(key)
  rollout, metrics = rollout_scores(state.params, frozen, batch, k_sample, lm=lm, task=task,
                                    config=config, rm_model=rm_model)
  apply_fn = make_apply(lm, prompt_len=batch.prompts.shape[1])
  params, opt_state, update_metrics = grpo_update.update(
      state.params, state.opt_state, rollout, k_update, apply_fn=apply_fn, tx=tx,
      config=config.update)
  u = config.update
  metrics.update(update_metrics)
  metrics['train/lr'] = schedule(state.step * u.epochs * u.minibatches)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
