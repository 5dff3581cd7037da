"""How a world language model is taught to judge: documents that state a principle, a
prompt, two responses, and the verdict of a noisy annotator under that principle.

A judge document (world tokens; the principle's tag and the two verdict tokens are
content tokens set aside by constitution.tag_tokens):

  BOS  tag(p)  x_1..x_m  EOS  y1_1..y1_n EOS  y2_1..y2_k EOS  tag(p)  ->  FIRST | SECOND

The LM is trained to put the verdict token after the document (loss on it alone); its
reading of a pair is P(FIRST) / (P(FIRST) + P(SECOND)) there, the log-probs of the answer
tokens as RLAIF (Lee et al. 2023) reads its judge. The teacher is an annotator who
compares the pair under the principle by Bradley-Terry, P(first) = sigmoid(gap / (tau *
scale_p)), gap the principle's utility of first minus second (world/constitution.py) and
scale_p that utility's standard deviation over the set's responses, so that tau is the
same amount of noise for every principle whatever its units.

A judge set (array_store folder) holds the pairs, each principle drawn by weight, with
the teacher's label and the truth: first, first_mask, second, second_mask [N, R];
prompts [N, P]; prompt_lengths, prompt_id, principle, label (1: first better), truth_gap
(principle utility gap), gold_gap (gold reward gap), teacher_prob [N].
"""
import jax
import numpy as np

from rlhf_jax.data import preferences
from rlhf_jax.sampling import left_pad
from rlhf_jax.world import constitution, language
from rlhf_jax.world import reward as reward_lib

FIELDS = ('prompts', 'prompt_lengths', 'prompt_id', 'first', 'first_mask', 'second',
          'second_mask', 'principle', 'label', 'truth_gap', 'gold_gap', 'teacher_prob')


class Vocabulary:
  """The judge's special tokens: verdict tokens `first`, `second` and a tag per principle."""

  def __init__(self, gold, num_principles: int):
    ids = constitution.tag_tokens(gold, num_principles + 2)
    self.first, self.second = int(ids[0]), int(ids[1])
    self.tags = ids[2:]


def width(prompt_width: int, response_width: int) -> int:
  """Columns of a document of prompts [., P] (BOS included) and two responses [., R]."""
  return prompt_width + 2 * response_width + 3


def documents(vocab: Vocabulary, *, prompts, prompt_lengths, first, first_mask, second,
              second_mask, principle):
  """(docs [N, D] int32 left-padded, lengths [N]) of the pairs in this order, D = width(P, R).
  The prompt's own BOS is the document's; the responses keep their EOS."""
  prompts, first, second = (np.asarray(a) for a in (prompts, first, second))
  p, r = prompts.shape[1], first.shape[1]
  rows = []
  for b in range(len(prompts)):
    content = prompts[b, p - int(prompt_lengths[b]) + 1:]  # left-padded, BOS first
    tag = int(vocab.tags[principle[b]])
    rows.append(np.concatenate([
        [language.BOS_ID, tag], content, [language.EOS_ID],
        first[b, np.asarray(first_mask[b]) > 0], second[b, np.asarray(second_mask[b]) > 0],
        [tag]]).astype(np.int32))
  return left_pad(rows, length=width(p, r))


def make(*, world, principles, sampler, params, key, num_prompts: int, prompt_len: int,
         responses_per_prompt: int, temperature: float) -> tuple[dict, dict]:
  """(arrays of FIELDS, lineage figures): every pair of `responses_per_prompt` samples of
  the policy to each of `num_prompts` world prompts, a principle drawn for each by
  weight, labelled by the principle's noisy annotator at `temperature` (0: the better
  one; a tie under the principle is a coin flip at any temperature)."""
  prompts, lengths = preferences.world_prompts(world.lang, key=jax.random.fold_in(key, 0),
                                               num=num_prompts, max_len=prompt_len)
  raw = preferences.sample_pairs(sampler, params, prompts=prompts, prompt_lengths=lengths,
                                 key=jax.random.fold_in(key, 1), k=responses_per_prompt)
  same = ((raw['first'] * raw['first_mask']) == (raw['second'] * raw['second_mask'])).all(1)
  raw = {k: np.asarray(v)[~same] for k, v in raw.items()}
  n = len(raw['prompts'])
  which = constitution.draw(principles, key=jax.random.fold_in(key, 2), num=n)
  mask = raw['prompts'] > 0
  util = lambda y, m: constitution.utilities(world.gold, principles, which=which,
                                             prompts=raw['prompts'], prompt_mask=mask,
                                             responses=y, response_mask=m)
  u1, u2 = util(raw['first'], raw['first_mask']), util(raw['second'], raw['second_mask'])
  scale = np.ones(len(principles))
  for i in range(len(principles)):
    both = np.concatenate([u1[which == i], u2[which == i]])
    scale[i] = both.std() if len(both) > 1 and both.std() > 0 else 1.0
  gap = u1 - u2
  z = gap / scale[which]
  prob = np.where(gap == 0, 0.5, 1 / (1 + np.exp(-z / max(temperature, 1e-12)))
                  if temperature > 0 else (gap > 0).astype(np.float64))
  label = np.asarray(jax.random.uniform(jax.random.fold_in(key, 3), (n,))) < prob
  gold = lambda y, m: np.asarray(reward_lib.gold_reward(
      world.gold, prompts=raw['prompts'], prompt_mask=mask, responses=y, response_mask=m),
      np.float64)
  arrays = dict(prompts=raw['prompts'], prompt_lengths=raw['prompt_lengths'],
                prompt_id=raw['prompt_ids'], first=raw['first'], first_mask=raw['first_mask'],
                second=raw['second'], second_mask=raw['second_mask'], principle=which,
                label=label.astype(np.int32), truth_gap=gap.astype(np.float32),
                gold_gap=(gold(raw['first'], raw['first_mask']) -
                          gold(raw['second'], raw['second_mask'])).astype(np.float32),
                teacher_prob=prob.astype(np.float32))
  figures = {'pairs': n, 'dropped_identical': int(same.sum()),
             'utility_scale': {p.name: float(s) for p, s in zip(principles, scale)},
             'teacher_temperature': temperature}
  return arrays, figures
