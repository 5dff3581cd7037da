"""Reward models: the decoder Transformer as a trunk and a scalar head on the hidden state
of the last response token, as an ensemble of K members vmapped over their params.

The trunk's params keep the language model's names (`trunk/...` = an LM's params plus a
prompt/response type embedding), so a trunk starts from an SFT checkpoint; the type
embedding starts at 0 and each member's head from its own random init.
The LM's output projection is part of the trunk's params but unused (XLA drops it from
the computation).
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.transformer import ModelConfig, Transformer


class RewardModel(nn.Module):
  """pooling: 'last' reads the hidden state of the final response token; 'mean' averages
  the hidden states of all response tokens."""
  cfg: ModelConfig
  pooling: str = 'last'

  @nn.compact
  def __call__(self, tokens, segment_ids, positions, token_types, response_mask):
    """tokens, segment_ids, positions: [B, T] int32; token_types: [B, T] int32, 1 on
    response columns (the reward depends on where the prompt ends, which the tokens alone
    do not say); response_mask: [B, T] float32, 1 on response tokens (EOS included).
    Returns [B] float32 rewards."""
    out = Transformer(self.cfg, name='trunk')(tokens, segment_ids=segment_ids,
                                              positions=positions, return_hidden=True,
                                              token_types=token_types)
    hidden = out.hidden.astype(jnp.float32)
    if self.pooling == 'mean':
      pooled = ((hidden * response_mask[..., None]).sum(axis=1) /
                jnp.maximum(response_mask.sum(axis=1), 1.0)[:, None])
    else:
      last = tokens.shape[1] - 1 - jnp.argmax(response_mask[:, ::-1] > 0, axis=1)
      pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    head = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.normal(stddev=self.cfg.d_model ** -0.5),
                        ('embed', None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                    name='head')
    return head(pooled)[:, 0]


POOLINGS = ('last', 'mean')


def ensemble(cfg: ModelConfig, size: int, pooling: str = 'last') -> nn.Module:
  """K reward models with params stacked on a leading `ensemble` axis: apply returns
  [K, B] rewards for one batch."""
  members = nn.vmap(RewardModel, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=None, out_axes=0, axis_size=size,
                    metadata_params={nn.PARTITION_NAME: 'ensemble'})
  return members(cfg, pooling)


def init_params(model: nn.Module):
  """rng -> boxed params of `model` (an ensemble), from shapes of a dummy batch."""
  dummy = np.ones((1, 8), np.int32)
  return lambda rng: model.init(rng, dummy, dummy, dummy, dummy,
                                np.ones((1, 8), np.float32))['params']
