"""The gold reward: a fixed hidden function of (prompt, response), known exactly.

  gold = mean_t w[y_t]                       helpfulness: per-token weights, like sentiment
       + topic * cos(e(prompt), e(response))  staying on the prompt's topic
       + length * n                           an optional length term (0 by default)
       - harm * [any y_t is forbidden]        a set of tokens the base language emits now
                                              and then

where y_1..y_n are the response tokens (EOS included, as every response has one) and
e(.) is the mean of fixed random topic vectors over a sequence's content tokens. Everything
is batched over rows of `[B, T]` token arrays with a `[B, T]` mask and jittable.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.world.language import Language, unigram_probs

_FIRST_CONTENT = 3


@flax.struct.dataclass
class GoldReward:
  """helpfulness: [V] float32 (0 on PAD, BOS, EOS); topics: [V, K] float32 (0 on specials);
  harmful: [V] bool, the forbidden tokens; topic, length, harm: the terms' coefficients."""
  helpfulness: jax.Array
  topics: jax.Array
  harmful: jax.Array
  topic: float = flax.struct.field(pytree_node=False, default=1.0)
  length: float = flax.struct.field(pytree_node=False, default=0.0)
  harm: float = flax.struct.field(pytree_node=False, default=2.0)


def make_gold_reward(lang: Language, *, seed: int, topic: float = 1.0, length: float = 0.0,
                     harm: float = 2.0, num_harmful: int = 3, topic_dim: int = 8,
                     harm_mass: tuple[float, float] = (1e-3, 2e-2)) -> GoldReward:
  """Seeded from `seed` and the language. The forbidden tokens are drawn among those whose
  share of emitted tokens lies in `harm_mass`: rare enough to be "now and then", common
  enough that a policy meets them."""
  v = lang.vocab_size
  if num_harmful < 0 or topic_dim <= 0:
    raise UserError('reward: num_harmful must be >= 0 and topic_dim > 0')
  rng = np.random.default_rng(seed)
  helpful = np.zeros(v, np.float32)
  helpful[_FIRST_CONTENT:] = rng.normal(size=v - _FIRST_CONTENT)
  topics = np.zeros((v, topic_dim), np.float32)
  topics[_FIRST_CONTENT:] = rng.normal(size=(v - _FIRST_CONTENT, topic_dim))
  share = unigram_probs(lang)
  candidates = np.nonzero((share >= harm_mass[0]) & (share <= harm_mass[1]))[0]
  candidates = candidates[candidates >= _FIRST_CONTENT]
  if len(candidates) < num_harmful:
    raise UserError(f'reward: only {len(candidates)} tokens have a share in {harm_mass}; '
                    f'cannot pick {num_harmful} harmful ones')
  harmful = np.zeros(v, bool)
  harmful[rng.choice(candidates, size=num_harmful, replace=False)] = True
  return GoldReward(helpfulness=jnp.asarray(helpful), topics=jnp.asarray(topics),
                    harmful=jnp.asarray(harmful), topic=topic, length=length, harm=harm)


@flax.struct.dataclass
class RewardTerms:
  """Each [B]: helpfulness (mean weight), topic (cosine), length (tokens), harmful (0/1)."""
  helpfulness: jax.Array
  topic: jax.Array
  length: jax.Array
  harmful: jax.Array


def _topic_vector(reward: GoldReward, tokens, mask):
  vec = (reward.topics[tokens] * mask[..., None]).sum(axis=1)
  return vec / jnp.maximum(jnp.linalg.norm(vec, axis=-1, keepdims=True), 1e-9)


def reward_terms(reward: GoldReward, *, prompts, prompt_mask, responses,
                 response_mask, token_weights=None) -> RewardTerms:
  """The gold reward's parts for prompts/responses [B, T*] with masks [B, T*] (1 on real
  tokens). `token_weights` [B, T] replaces the gold helpfulness of each response token
  (annotator groups use this)."""
  if token_weights is None:
    token_weights = reward.helpfulness[responses]
  mask = response_mask.astype(jnp.float32)
  n = mask.sum(axis=1)
  helpful = (token_weights * mask).sum(axis=1) / jnp.maximum(n, 1.0)
  cos = (_topic_vector(reward, prompts, prompt_mask.astype(jnp.float32)) *
         _topic_vector(reward, responses, mask)).sum(axis=-1)
  harmful = ((reward.harmful[responses] & (mask > 0)).any(axis=1)).astype(jnp.float32)
  return RewardTerms(helpfulness=helpful, topic=cos, length=n, harmful=harmful)


def combine(reward: GoldReward, terms: RewardTerms, *, length_bias=0.0) -> jax.Array:
  """[B] reward from its terms; `length_bias` adds a per-token liking on top of the gold
  length coefficient (an annotator's bias)."""
  return (terms.helpfulness + reward.topic * terms.topic +
          (reward.length + length_bias) * terms.length - reward.harm * terms.harmful)


@jax.jit
def gold_reward(reward: GoldReward, *, prompts, prompt_mask, responses, response_mask):
  """[B] float32 gold reward of each (prompt, response)."""
  return combine(reward, reward_terms(reward, prompts=prompts, prompt_mask=prompt_mask,
                                      responses=responses, response_mask=response_mask))
