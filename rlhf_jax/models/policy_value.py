"""The PPO learner: a policy (the decoder Transformer) and a value function V(s_t) on the
state before each token, either a head on the policy's own hidden states (`head`) or on a
separate critic Transformer (`critic`). The value head starts at 0 (kernel and bias), so
the first advantages are the rewards themselves.

Params: {'policy': an LM's params, 'value_head': ...} (+ 'critic': an LM's params), so the
policy and critic start from any language-model checkpoint; the critic's output
projection is unused.
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.transformer import ModelConfig, Transformer

VALUES = ('head', 'critic')


class PolicyValue(nn.Module):
  cfg: ModelConfig
  value: str = 'head'

  @nn.compact
  def __call__(self, tokens, *, segment_ids, positions):
    """tokens, segment_ids, positions: [B, T] int32 -> (logits [B, T, V] float32,
    values [B, T] float32 of the state after column t)."""
    out = Transformer(self.cfg, name='policy')(tokens, segment_ids=segment_ids,
                                               positions=positions, return_hidden=True)
    hidden = out.hidden
    if self.value == 'critic':
      hidden = Transformer(self.cfg, name='critic')(tokens, segment_ids=segment_ids,
                                                    positions=positions,
                                                    return_hidden=True).hidden
    head = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ('embed', None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                    name='value_head')
    return out.logits, head(hidden.astype(jnp.float32))[..., 0]


def init_params(model: PolicyValue):
  """rng -> boxed params, from shapes of a dummy batch."""
  dummy = np.ones((1, 8), np.int32)
  return lambda rng: model.init(rng, dummy, segment_ids=dummy, positions=dummy)['params']
