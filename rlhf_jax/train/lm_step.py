"""The language-model train step and evaluation sums, shared by pretraining and SFT.

Both are pure functions of (state or params, batch); the stage binds model, optimiser and
schedule with functools.partial and jits them once with explicit shardings.
"""
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.data.batch import LMBatch
from rlhf_jax.models import lora
from rlhf_jax.train.state import TrainState


def _xent(params, batch: LMBatch, model, frozen=None):
  out = model.apply({'params': lora.combine(params, frozen)}, batch.inputs,
                    segment_ids=batch.segment_ids,
                    positions=batch.positions)
  loss_sum, count, correct = losses.xent_sum(out.logits, batch.targets, batch.weights)
  return loss_sum, (count, correct)


def _microbatches(batch: LMBatch, n: int) -> LMBatch:
  """[B, T] -> [n, B/n, T], microbatch i taking rows i, i+n, ...: every data shard keeps
  an equal part of each microbatch, so accumulation moves no data between devices."""
  def split(x):
    b = x.shape[0]
    return x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: LMBatch, frozen=None, *, model, tx, schedule,
               grad_accum: int):
  """One optimiser update on `batch` ([B, T] fields); the mean is over all its tokens,
  however many microbatches it is cut into. frozen: with LoRA, the base params (state.params
  holds the adapters; the gradient is taken by them alone)."""
  grad_fn = jax.value_and_grad(_xent, has_aux=True)
  if grad_accum == 1:
    (loss_sum, (count, correct)), grads = grad_fn(state.params, batch, model, frozen)
  else:
    def body(carry, mb):
      (s, (n, c)), g = grad_fn(state.params, mb, model, frozen)
      acc_g, acc_s, acc_n, acc_c = carry
      return (jax.tree.map(jnp.add, acc_g, g), acc_s + s, acc_n + n, acc_c + c), None
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
    (grads, loss_sum, count, correct), _ = jax.lax.scan(
        body, init, _microbatches(batch, grad_accum))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'train/loss': loss_sum / denom,
      'train/accuracy': correct / denom,
      'train/grad_norm': optax.tree.norm(grads),
      'train/lr': schedule(state.step),
      'train/tokens': count,
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_logprobs(params, batch: LMBatch, *, model) -> jax.Array:
  """Model log-probabilities of the batch's targets, [B, T] (0 where weight is 0)."""
  out = model.apply({'params': params}, batch.inputs, segment_ids=batch.segment_ids,
                    positions=batch.positions)
  return losses.token_logprobs(out.logits, batch.targets) * batch.weights
