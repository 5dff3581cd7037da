"""Training with LoRA: the train state holds only what trains (adapters, plus heads a stage
adds), the base stays a frozen input of the step.

A stage's TrainState.params is lora.split's trainable part, so the optimiser state, the
gradients and the checkpoints cover the adapters alone: the base never enters jax.grad
(it is an argument the loss is not differentiated by, so no memory goes to its
gradients) nor optax (so none to its moments), and a checkpoint is a few adapters plus the
pointer to the base in config.json (init.run, init.step). runs.load rebuilds the model
from that pointer and merges the adapters in.
"""
import jax
import flax.linen as nn

from rlhf_jax.models import lora

# Folded into the run's key for the adapters' init, so their draws are their own.
_ADAPTER_KEY = 0x10AA


def trainable_init(init_params, *, lm_keys=None):
  """rng -> the boxed trainable part of init_params(rng) (the adapted model's init)."""
  def init(rng):
    return lora.split(init_params(jax.random.fold_in(rng, _ADAPTER_KEY)), lm_keys=lm_keys)[0]
  return init


def frozen_shardings(full_param_shardings, *, lm_keys=None):
  """The frozen part of the full model's param shardings (the base's layout)."""
  return lora.split(full_param_shardings, lm_keys=lm_keys)[1]


def memory_metrics(tx, init_params, rng, *, lm_keys=None) -> dict:
  """Parameter counts and the optimiser state's bytes with LoRA (adapters and heads only)
  and without (every parameter trained), from shapes alone (nothing is allocated):
    lora/trainable_params, lora/frozen_params
    lora/opt_state_bytes        the optimiser state this run holds
    lora/full_opt_state_bytes   the one full fine-tuning of the same model would hold
    lora/opt_state_saved_bytes  the difference."""
  full = nn.meta.unbox(jax.eval_shape(init_params, rng))
  trainable, frozen = lora.split(full, lm_keys=lm_keys)
  with_lora = lora.count(jax.eval_shape(tx.init, trainable))[1]
  # Without LoRA the same model trains every base parameter; its adapters do not exist.
  without = lora.count(jax.eval_shape(tx.init, lora.strip(full)))[1]
  return {'lora/trainable_params': lora.count(trainable)[0],
          'lora/frozen_params': lora.count(frozen)[0],
          'lora/opt_state_bytes': with_lora, 'lora/full_opt_state_bytes': without,
          'lora/opt_state_saved_bytes': without - with_lora}
