"""The whole world of a config: true language, gold reward and annotator pool, built from
the `world`, `reward` and `annotators` blocks (each seeded by its own block's seed)."""
import dataclasses

from rlhf_jax.world import annotators, language
from rlhf_jax.world import reward as reward_lib


@dataclasses.dataclass(frozen=True)
class World:
  lang: language.Language
  gold: reward_lib.GoldReward
  pool: annotators.AnnotatorPool


def from_config(config) -> World:
  w, r, a = config.world, config.reward, config.annotators
  lang = language.from_block(w)
  gold = reward_lib.make_gold_reward(lang, seed=r.seed, topic=r.topic, length=r.length,
                                     harm=r.harm, num_harmful=r.num_harmful,
                                     topic_dim=r.topic_dim)
  pool = annotators.make_pool(gold, seed=a.seed, num=a.num,
                              minority_fraction=a.minority_fraction,
                              minority_corr=a.minority_corr, length_bias=a.length_bias,
                              length_bias_spread=a.length_bias_spread,
                              temperature=a.temperature,
                              temperature_spread=a.temperature_spread,
                              # A config.json written before these fields existed: none.
                              unreliable_fraction=a.get('unreliable_fraction', 0.0),
                              unreliable_temperature=a.get('unreliable_temperature', 10.0),
                              unreliable_flip=a.get('unreliable_flip', False))
  return World(lang=lang, gold=gold, pool=pool)
