"""Comparisons labelled by a mixture of people and a judge (AI feedback; Bai et al. 2022,
RLAIF of Lee et al. 2023, semi-automated RLHF): a seeded `human_fraction` of the pairs goes
to the simulated annotators exactly as the human-feedback stage labels them
(preferences.label_pairs), the rest to the judge under a principle of the constitution
drawn by weight. Every pair records who labelled it (PreferencePairs.labeller) and, for
the judge's, the principle.

A judge's label is soft, as RLAIF's distilled labels are: the pair is oriented so that
chosen is the response the order-averaged verdict p prefers (p = 1/2 keeps the order),
and soft_label = max(p, 1 - p) is what a reward model or DPO learns from.

With human_fraction = 1 no judge is asked and the set is the human-feedback stage's set,
label for label (the same draws with the same key).
"""
import jax
import numpy as np

from rlhf_jax.data import preferences
from rlhf_jax.world import constitution
from rlhf_jax.world import reward as reward_lib


def judge_pairs(*, prompts, prompt_lengths, prompt_ids, first, first_mask, second,
                second_mask, gold, judge, principles, key,
                round_: int) -> preferences.PreferencePairs:
  """Every pair labelled by `judge` under a principle drawn by weight (see the module
  docstring); pairs whose two responses are identical are dropped."""
  same = ((first * first_mask) == (second * second_mask)).all(axis=1)
  keep = np.nonzero(~same)[0]
  prompts, prompt_lengths, prompt_ids = prompts[keep], prompt_lengths[keep], prompt_ids[keep]
  first, first_mask, second, second_mask = (np.asarray(a)[keep] for a in
                                            (first, first_mask, second, second_mask))
  n = len(keep)
  which = constitution.draw(principles, key=key, num=n)
  fwd, bwd = judge.readings(prompts=prompts, prompt_lengths=prompt_lengths, first=first,
                            first_mask=first_mask, second=second, second_mask=second_mask,
                            principle=which)
  p = (np.asarray(fwd, np.float64) + np.asarray(bwd, np.float64)) / 2
  turn = p < 0.5
  swap = lambda a, b: np.where(turn.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)
  chosen, chosen_mask = swap(first, second), swap(first_mask, second_mask)
  rejected, rejected_mask = swap(second, first), swap(second_mask, first_mask)
  gold_of = lambda y, m: np.asarray(reward_lib.gold_reward(
      gold, prompts=prompts, prompt_mask=prompts > 0, responses=y, response_mask=m),
      np.float32)
  soft = np.maximum(p, 1 - p).astype(np.float32)
  return preferences.PreferencePairs(
      prompts=np.asarray(prompts, np.int32), prompt_lengths=np.asarray(prompt_lengths, np.int32),
      chosen=np.asarray(chosen, np.int32), rejected=np.asarray(rejected, np.int32),
      chosen_mask=np.asarray(chosen_mask, np.float32),
      rejected_mask=np.asarray(rejected_mask, np.float32),
      annotator=np.full(n, -1, np.int32), group=np.full(n, -1, np.int32),
      gold_chosen=gold_of(chosen, chosen_mask), gold_rejected=gold_of(rejected, rejected_mask),
      annotator_prob=soft, prompt_id=np.asarray(prompt_ids, np.int32),
      round=np.full(n, round_, np.int32), raw_annotator=np.full((n, 1), -1, np.int32),
      raw_label=np.zeros((n, 1), np.int32), raw_prob=np.zeros((n, 1), np.float32),
      soft_label=soft, labeller=np.full(n, preferences.JUDGE, np.int32),
      principle=which.astype(np.int32))


def label_mixed(raw: dict, *, gold, pool, judge, principles, human_fraction: float, key,
                round_: int, labels_per_pair: int = 1,
                method: str = 'single') -> preferences.PreferencePairs:
  """The pairs of `raw` (preferences.sample_pairs' output) labelled by the mixture. The
  annotators' part is labelled with `key` itself, the judge's with keys folded from it."""
  n = len(raw['prompts'])
  human = np.asarray(jax.random.uniform(jax.random.fold_in(key, 0xA1F), (n,))) < human_fraction
  if human_fraction >= 1:
    human[:] = True
  parts = []
  take = lambda rows: {k: np.asarray(v)[rows] for k, v in raw.items()}
  if human.any():
    parts.append(preferences.label_pairs(**take(np.nonzero(human)[0]), gold=gold, pool=pool,
                                         key=key, round_=round_,
                                         labels_per_pair=labels_per_pair, method=method))
  if (~human).any():
    parts.append(judge_pairs(**take(np.nonzero(~human)[0]), gold=gold, judge=judge,
                             principles=principles, key=jax.random.fold_in(key, 0xA20),
                             round_=round_))
  if len(parts) == 1:
    return parts[0]
  k = max(p.raw_annotator.shape[1] for p in parts)
  pad = lambda a, fill: np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=fill)
  fields = {}
  for name in preferences.ALL_FIELDS:
    cols = [np.asarray(getattr(p, name)) for p in parts]
    if name in ('raw_annotator', 'raw_label', 'raw_prob'):
      cols = [pad(c, -1 if name == 'raw_annotator' else 0) for c in cols]
    fields[name] = np.concatenate(cols)
  return preferences.PreferencePairs(**fields)
