"""Policy-value networks for board games, chosen by a config string (`NETWORKS`).

Both take a pgx observation [B, ...] (bool or float; cast to float32) and return
(logits [B, A] float32, value [B] float32 in [-1, 1]); the value is the expected outcome for
the player to move, squashed by tanh because outcomes are in {-1, 0, +1}.

- `mlp`: flatten -> `num_blocks` x (Dense(width) + relu) -> policy Dense(A), value
  Dense(1) + tanh. For tiny boards (tic-tac-toe), where convolutions buy nothing.
- `resnet`: the AlphaZero tower for [B, H, W, C] boards: a 3x3 conv stem, `num_blocks`
  residual blocks (conv3x3 - LayerNorm - relu - conv3x3 - LayerNorm, + skip, relu), then a
  policy head (1x1 conv to 2 planes, relu, Dense(A)) and a value head (1x1 conv to 1 plane,
  relu, Dense(width), relu, Dense(1), tanh). LayerNorm instead of AlphaZero's BatchNorm so
  that the net is a pure function of (params, observation): self-play runs it inside a
  jitted search, where BatchNorm's running statistics would be mutable state.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.errors import UserError

NETWORKS = ('mlp', 'resnet')


class MLPNet(nn.Module):
  num_actions: int
  width: int = 64
  num_blocks: int = 2

  @nn.compact
  def __call__(self, observation):
    x = observation.astype(jnp.float32).reshape(observation.shape[0], -1)
    for i in range(self.num_blocks):
      x = nn.relu(nn.Dense(self.width, name=f'hidden_{i}')(x))
    logits = nn.Dense(self.num_actions, name='policy')(x)
    value = jnp.tanh(nn.Dense(1, name='value')(x)[:, 0])
    return logits, value


class ResidualBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.channels, (3, 3), name='conv_0')(x)
    y = nn.relu(nn.LayerNorm(name='norm_0')(y))
    y = nn.Conv(self.channels, (3, 3), name='conv_1')(y)
    y = nn.LayerNorm(name='norm_1')(y)
    return nn.relu(x + y)


class ResNet(nn.Module):
  num_actions: int
  width: int = 64
  num_blocks: int = 4

  @nn.compact
  def __call__(self, observation):
    if observation.ndim != 4:
      raise ValueError(f'resnet wants [B, H, W, C] observations, got {observation.shape}')
    x = observation.astype(jnp.float32)
    x = nn.relu(nn.LayerNorm(name='stem_norm')(nn.Conv(self.width, (3, 3), name='stem')(x)))
    for i in range(self.num_blocks):
      x = ResidualBlock(self.width, name=f'block_{i}')(x)
    batch = x.shape[0]
    p = nn.relu(nn.Conv(2, (1, 1), name='policy_conv')(x)).reshape(batch, -1)
    logits = nn.Dense(self.num_actions, name='policy')(p)
    v = nn.relu(nn.Conv(1, (1, 1), name='value_conv')(x)).reshape(batch, -1)
    v = nn.relu(nn.Dense(self.width, name='value_hidden')(v))
    value = jnp.tanh(nn.Dense(1, name='value')(v)[:, 0])
    return logits, value


def make_network(*, name: str, num_actions: int, width: int, num_blocks: int) -> nn.Module:
  """The network registered as `name` (one of `NETWORKS`)."""
  if name == 'mlp':
    return MLPNet(num_actions=num_actions, width=width, num_blocks=num_blocks)
  if name == 'resnet':
    return ResNet(num_actions=num_actions, width=width, num_blocks=num_blocks)
  raise UserError(f'unknown network {name!r}; choose one of {", ".join(NETWORKS)}')


def init_params(*, network: nn.Module, observation_shape, key: jax.Array):
  """Params for observations of shape `observation_shape` (without the batch axis)."""
  return network.init(key, jnp.zeros((1, *observation_shape), jnp.float32))['params']
