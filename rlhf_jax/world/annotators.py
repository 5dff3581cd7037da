"""Simulated annotators: people who compare two responses by Bradley-Terry on their own
utility, and ways to aggregate their labels without looking at the truth.

Annotator a in group g has utility

  u_a(x, y) = gold reward of (x, y) with group g's helpfulness weights + b_a * len(y)

(b_a: a liking for length, the classic road to reward hacking) and prefers y1 to y2 with
probability sigmoid((u_a(x, y1) - u_a(x, y2)) / tau_a) (tau_a: noise; 0 means always the
better one). Group 0 (the majority) weighs helpfulness by the gold weights; group 1 (the
minority) by weights correlated `minority_corr` with them.

Unreliable annotators (a seeded random `unreliable_fraction` of the pool, of either group)
label with their own temperature `unreliable_temperature` and, with `unreliable_flip`,
prefer the response their utility ranks lower (adversarial labels): the planted faults that
majority vote and consistency weighting have to survive.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.world.reward import GoldReward, combine, reward_terms


@flax.struct.dataclass
class AnnotatorPool:
  """group: [A] int32 (0 majority, 1 minority); length_bias: [A] float32 per-token liking;
  temperature: [A] float32 noise (0: deterministic); group_helpfulness: [2, V] float32;
  sign: [A] float32, +1, or -1 for an adversarial annotator (it prefers the worse one)."""
  group: jax.Array
  length_bias: jax.Array
  temperature: jax.Array
  group_helpfulness: jax.Array
  sign: jax.Array

  @property
  def size(self) -> int:
    return self.group.shape[0]


def make_pool(reward: GoldReward, *, seed: int, num: int, minority_fraction: float = 0.2,
              minority_corr: float = 0.3, length_bias: float = 0.0,
              length_bias_spread: float = 0.0, temperature: float = 0.5,
              temperature_spread: float = 0.0, unreliable_fraction: float = 0.0,
              unreliable_temperature: float = 10.0,
              unreliable_flip: bool = False) -> AnnotatorPool:
  """`num` annotators; the last round(num * minority_fraction) are the minority. Biases and
  temperatures are drawn uniformly within +- spread of their means (clipped at 0). Then
  round(num * unreliable_fraction) annotators, drawn at random, get temperature
  `unreliable_temperature` and, with `unreliable_flip`, sign -1 (drawn last, so that a
  pool without them is the pool of before)."""
  if num <= 0 or not 0 <= minority_fraction < 1 or not -1 <= minority_corr <= 1:
    raise UserError('annotators: num must be positive, minority_fraction in [0, 1), '
                    'minority_corr in [-1, 1]')
  if temperature < 0:
    raise UserError(f'annotators: temperature={temperature} must be >= 0')
  if not 0 <= unreliable_fraction <= 1 or unreliable_temperature < 0:
    raise UserError(f'annotators: unreliable_fraction={unreliable_fraction} must be in '
                    f'[0, 1], unreliable_temperature={unreliable_temperature} >= 0')
  rng = np.random.default_rng(seed)
  minority = int(round(num * minority_fraction))
  group = np.array([0] * (num - minority) + [1] * minority, np.int32)
  gold = np.asarray(reward.helpfulness, np.float64)
  other = rng.normal(size=gold.shape) * (gold != 0)
  minority_w = minority_corr * gold + np.sqrt(1 - minority_corr ** 2) * other
  spread = lambda mean, width: np.maximum(mean + rng.uniform(-width, width, num), 0.0)
  biases = spread(length_bias, length_bias_spread)
  temperatures = spread(temperature, temperature_spread)
  sign = np.ones(num)
  unreliable = int(round(num * unreliable_fraction))
  if unreliable:
    which = rng.permutation(num)[:unreliable]
    temperatures[which] = unreliable_temperature
    sign[which] = -1.0 if unreliable_flip else 1.0
  return AnnotatorPool(
      group=jnp.asarray(group),
      length_bias=jnp.asarray(biases, jnp.float32),
      temperature=jnp.asarray(temperatures, jnp.float32),
      group_helpfulness=jnp.asarray(np.stack([gold, minority_w]), jnp.float32),
      sign=jnp.asarray(sign, jnp.float32))


def utility(pool: AnnotatorPool, reward: GoldReward, *, annotator, prompts, prompt_mask,
            responses, response_mask) -> jax.Array:
  """[B] utility of each row's response to the annotator of that row (annotator: [B])."""
  by_group = pool.group_helpfulness[:, responses]  # [2, B, T]: both groups' token weights
  weights = jnp.where(pool.group[annotator][:, None] == 0, by_group[0], by_group[1])
  terms = reward_terms(reward, prompts=prompts, prompt_mask=prompt_mask, responses=responses,
                       response_mask=response_mask, token_weights=weights)
  return combine(reward, terms, length_bias=pool.length_bias[annotator])


@jax.jit
def preference_prob(pool: AnnotatorPool, reward: GoldReward, *, annotator, prompts,
                    prompt_mask, first, first_mask, second, second_mask) -> jax.Array:
  """[B] probability that annotator[b] prefers `first` to `second` (Bradley-Terry; an
  adversarial annotator's on the negated utility gap)."""
  kw = dict(annotator=annotator, prompts=prompts, prompt_mask=prompt_mask)
  diff = pool.sign[annotator] * (
      utility(pool, reward, responses=first, response_mask=first_mask, **kw) -
      utility(pool, reward, responses=second, response_mask=second_mask, **kw))
  tau = pool.temperature[annotator]
  soft = jax.nn.sigmoid(diff / jnp.maximum(tau, 1e-12))
  hard = jnp.where(diff > 0, 1.0, jnp.where(diff < 0, 0.0, 0.5))
  return jnp.where(tau > 0, soft, hard)


def label(pool: AnnotatorPool, reward: GoldReward, *, key, **pair) -> jax.Array:
  """[B] int32: 1 where annotator[b] prefers `first`, drawn with its Bradley-Terry
  probability (arguments as `preference_prob`)."""
  p = preference_prob(pool, reward, **pair)
  return (jax.random.uniform(key, p.shape) < p).astype(jnp.int32)


def majority_vote(labels: np.ndarray, observed: np.ndarray) -> np.ndarray:
  """labels, observed: [P, A] (1 = prefers first; observed 0 where annotator a did not
  label pair p). Returns [P] in {0, 0.5, 1} (0.5: a tie)."""
  votes = (labels * observed).sum(axis=1)
  count = observed.sum(axis=1)
  return np.where(2 * votes > count, 1.0, np.where(2 * votes < count, 0.0, 0.5))


def consistency_weights(labels: np.ndarray, observed: np.ndarray, *, iterations: int = 20,
                        prior: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Each annotator's accuracy, estimated from overlapping labels only (one-coin
  Dawid-Skene by EM): start from the majority vote, estimate each annotator's agreement
  with the current soft consensus, re-weight votes by log-odds of that accuracy, repeat.

  Returns (accuracy [A], consensus [P] = probability that `first` is preferred). `prior`
  adds that many pseudo-agreements and pseudo-disagreements per annotator.
  """
  labels = np.asarray(labels, np.float64)
  observed = np.asarray(observed, np.float64)
  if not (observed.sum(axis=1) > 0).all():
    raise UserError('consistency weighting: a pair has no label')
  consensus = majority_vote(labels, observed)
  for _ in range(iterations):
    agree = (observed * (labels * consensus[:, None] +
                         (1 - labels) * (1 - consensus[:, None]))).sum(axis=0)
    accuracy = (agree + prior) / (observed.sum(axis=0) + 2 * prior)
    accuracy = np.clip(accuracy, 1e-3, 1 - 1e-3)
    logit = np.log(accuracy / (1 - accuracy))
    score = (observed * (2 * labels - 1) * logit).sum(axis=1)
    consensus = 1 / (1 + np.exp(-score))
  return accuracy, consensus
