"""The distillation train step (`distill.loss`, train/distill_losses.py).

Every step draws its rows afresh inside the step, so the student sees new tokens each step
and a resumed run draws the same ones (the key is fold_in(rng, step)):
  - the off-policy rows from the data `distill.data` names: the world's true sequences
    (after BOS) or the frozen teacher's samples after the batch's prompts;
  - the on-policy rows (the last `on_policy_rows` of the batch, GKD's fraction lambda) from
    the student itself, with its current parameters and the KV-cached sampler; no gradient
    flows through the sampling (Agarwal et al. 2024).
The teacher then scores every token of every row (teacher-forced, no gradient), its logits
optionally cut to their top k, and the student is trained on the per-token loss over the
rows' response tokens.
"""
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import sampling
from rlhf_jax.train import distill_losses
from rlhf_jax.train.state import TrainState
from rlhf_jax.world import language


@flax.struct.dataclass
class Frozen:
  """What the step reads and never trains: the teacher's params and the true language."""
  teacher_params: Any
  lang: language.Language


@flax.struct.dataclass
class Rows:
  """prompts [B, P] int32 left-padded, prompt_lengths [B]; response [B, N] int32 and mask
  [B, N] float32 (1 on response tokens, EOS included)."""
  prompts: jax.Array
  prompt_lengths: jax.Array
  response: jax.Array
  mask: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  loss: str                  # a distill_losses.LOSSES name
  data: str                  # 'world' | 'teacher': where the off-policy rows come from
  on_policy_rows: int        # rows of each batch the student samples itself
  max_new_tokens: int        # N, the response width of every row
  temperature: float         # the losses' softening temperature
  alpha: float
  beta: float
  top_k: int                 # 0: the teacher's full logits
  sample_temperature: float  # of the teacher's and the student's samples


def world_rows(lang, key, *, num: int, width: int) -> Rows:
  """`num` true sequences of the world: prompt BOS, response its next `width` tokens."""
  seqs = language.sample(lang, key=key, batch_size=num, seq_len=width + 1)
  prev = seqs[:, :-1]
  mask = ((prev != language.EOS_ID) & (prev != language.PAD_ID)).astype(jnp.float32)
  return Rows(prompts=seqs[:, :1], prompt_lengths=jnp.ones((num,), jnp.int32),
              response=seqs[:, 1:], mask=mask)


def sampled_rows(params, prompts, prompt_lengths, key, *, model, config: StepConfig) -> Rows:
  out = sampling.sample(params, prompts, prompt_lengths, key, model=model,
                        config=sampling.SampleConfig(max_new_tokens=config.max_new_tokens,
                                                     temperature=config.sample_temperature))
  return Rows(prompts=prompts, prompt_lengths=prompt_lengths, response=out.response,
              mask=out.mask)


def draw_rows(params, frozen: Frozen, prompts, prompt_lengths, key, *, model, teacher,
              config: StepConfig) -> Rows:
  """The step's rows: off-policy first, then the student's own."""
  if config.data == 'world' and prompts.shape[1] != 1:
    raise ValueError('world rows follow BOS alone: the prompts must be [B, 1] of BOS')
  k_off, k_on = jax.random.split(key)
  b = prompts.shape[0]
  n_off = b - config.on_policy_rows
  parts = []
  if n_off:
    if config.data == 'world':
      parts.append(world_rows(frozen.lang, k_off, num=n_off, width=config.max_new_tokens))
    else:
      parts.append(sampled_rows(frozen.teacher_params, prompts[:n_off],
                                prompt_lengths[:n_off], k_off, model=teacher, config=config))
  if config.on_policy_rows:
    parts.append(sampled_rows(jax.lax.stop_gradient(params), prompts[n_off:],
                              prompt_lengths[n_off:], k_on, model=model, config=config))
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *x: jnp.concatenate(x), *parts)


def teacher_logits(frozen: Frozen, rows: Rows, *, teacher, config: StepConfig):
  """The teacher's logits on the rows' responses (a TopK when config.top_k > 0); None
  when the loss reads none."""
  if not distill_losses.LOSSES[config.loss].needs_teacher:
    return None
  logits = jax.lax.stop_gradient(sampling.response_logits(
      frozen.teacher_params, rows.prompts, rows.prompt_lengths, rows.response, model=teacher))
  if config.top_k:
    return distill_losses.top_k(logits, config.top_k, temperature=config.temperature)
  return logits


def loss_of(params, rows: Rows, teacher_out, *, model, config: StepConfig):
  logits = sampling.response_logits(params, rows.prompts, rows.prompt_lengths, rows.response,
                                    model=model)
  per = distill_losses.per_token(config.loss, logits, teacher_out,
                                 temperature=config.temperature, alpha=config.alpha,
                                 beta=config.beta, targets=rows.response)
  return distill_losses.masked_mean(per, rows.mask)


def train_step(state: TrainState, frozen: Frozen, batch, *, model, teacher, tx, schedule,
               config: StepConfig):
  """batch: the step's prompts (a dict of prompts [B, P], prompt_lengths [B])."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  rows = draw_rows(state.params, frozen, batch['prompts'], batch['prompt_lengths'], key,
                   model=model, teacher=teacher, config=config)
  teacher_out = teacher_logits(frozen, rows, teacher=teacher, config=config)
  loss, grads = jax.value_and_grad(loss_of)(state.params, rows, teacher_out, model=model,
                                            config=config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'train/loss': loss,
      'train/grad_norm': optax.tree.norm(grads),
      'train/lr': schedule(state.step),
      'train/tokens': rows.mask.sum(),
      'distill/response_length': rows.mask.sum(axis=1).mean(),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
