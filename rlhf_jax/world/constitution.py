"""Principles and constitutions: what AI feedback is asked to judge, and what each principle
means in the world, so that a judge's verdict under it can be checked against the truth.

A principle has a name, a statement in words (kept in the run's lineage; in text mode the
prompt a judge reads), a weight, and what it is about in the world:

  harm          u(x, y) = -[y holds a forbidden token]
  brevity       u(x, y) = -len(y)
  topic         u(x, y) = cos(e(x), e(y)), the gold reward's topic term
  helpfulness   u(x, y) = mean_t w[y_t], the gold reward's helpfulness term

A constitution is a list of principles; one is drawn per comparison with probability
proportional to its weight, as in Bai et al. 2022 ("Constitutional AI"). Principles are
ordered by name, so a principle's index does not depend on how the config was written.

In the world there are no words, so a judge LM reads a principle as a tag: one fixed
content token (`tag_tokens`) that stands for it, at the start of the judge's document and
again before the verdict (rlhf_jax/data/judge_docs.py).
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.world import reward as reward_lib

ABOUT = ('harm', 'brevity', 'topic', 'helpfulness')


@dataclasses.dataclass(frozen=True)
class Principle:
  name: str
  statement: str
  about: str
  weight: float


def default_block() -> ml_collections.ConfigDict:
  """The default constitution, one entry per principle: {statement, about, weight}."""
  entry = lambda statement, about, weight: dict(statement=statement, about=about, weight=weight)
  return ml_collections.ConfigDict(dict(
      harmless=entry('Which response contains nothing harmful or dangerous?', 'harm', 2.0),
      helpful=entry('Which response is more helpful to the person who asked?',
                    'helpfulness', 1.0),
      on_topic=entry('Which response stays closer to what the prompt is about?', 'topic', 1.0),
  ))


def from_block(block) -> tuple[Principle, ...]:
  """The principles of a constitution block, checked: at least one, each `about` one of
  ABOUT, weights >= 0 and not all 0."""
  if block is None or not len(block):
    raise UserError('constitution: it has no principles; give at least one '
                    '(--config.constitution.NAME.statement=... .about=... .weight=...)')
  out = []
  for name in sorted(block.keys()):
    entry = block[name]
    missing = [k for k in ('statement', 'about', 'weight') if k not in entry]
    if missing:
      raise UserError(f'constitution.{name}: missing {", ".join(missing)}')
    if entry['about'] not in ABOUT:
      raise UserError(f'constitution.{name}.about={entry["about"]!r} is not one of {ABOUT}')
    weight = float(entry['weight'])
    if not weight >= 0:
      raise UserError(f'constitution.{name}.weight={entry["weight"]} must be >= 0')
    if not str(entry['statement']).strip():
      raise UserError(f'constitution.{name}.statement is empty')
    out.append(Principle(name=name, statement=str(entry['statement']), about=entry['about'],
                         weight=weight))
  if sum(p.weight for p in out) <= 0:
    raise UserError('constitution: every weight is 0; at least one must be positive')
  return tuple(out)


def draw(principles, *, key, num: int) -> np.ndarray:
  """[num] int32 principle indices, each drawn with probability weight / total."""
  w = np.array([p.weight for p in principles], np.float64)
  return np.asarray(jax.random.choice(key, len(principles), (num,), p=jnp.asarray(w / w.sum())),
                    np.int32)


def utility(gold: reward_lib.GoldReward, *, about: str, prompts, prompt_mask, responses,
            response_mask) -> np.ndarray:
  """[B] float64 utility of each response under a principle about `about` (the table in the
  module docstring)."""
  terms = reward_lib.reward_terms(gold, prompts=prompts, prompt_mask=prompt_mask,
                                  responses=responses, response_mask=response_mask)
  value = {'harm': lambda: -terms.harmful, 'brevity': lambda: -terms.length,
           'topic': lambda: terms.topic, 'helpfulness': lambda: terms.helpfulness}[about]()
  return np.asarray(value, np.float64)


def utilities(gold, principles, *, which, prompts, prompt_mask, responses,
              response_mask) -> np.ndarray:
  """[B] float64 utility of row b's response under principle which[b]."""
  out = np.zeros(len(which), np.float64)
  for i, p in enumerate(principles):
    rows = np.nonzero(np.asarray(which) == i)[0]
    if len(rows):
      out[rows] = utility(gold, about=p.about, prompts=prompts[rows],
                          prompt_mask=prompt_mask[rows], responses=responses[rows],
                          response_mask=response_mask[rows])
  return out


def tag_tokens(gold: reward_lib.GoldReward, count: int) -> np.ndarray:
  """[count] int32: the world tokens that name principles 0..count-1 (and, after them,
  the two verdict tokens: see judge_docs). The highest content ids that are not
  forbidden, so that a tag is never a harm the judge must find in a response."""
  harmful = np.asarray(gold.harmful)
  ids = [t for t in range(len(harmful) - 1, reward_lib._FIRST_CONTENT - 1, -1)
         if not harmful[t]]
  if len(ids) < count:
    raise UserError(f'constitution: the world has {len(ids)} usable tokens, '
                    f'{count} are needed as principle tags and verdicts')
  return np.asarray(ids[:count], np.int32)
