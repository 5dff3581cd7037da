"""SL-CAI's critiques and revisions in the world (Bai et al. 2022, the supervised stage):
the policy answers each prompt; then, up to `revisions` times, a principle is drawn by
weight, the policy writes a fresh draft, and the judge compares the current response with
the draft under the principle. The judge's preference for the draft is the critique (the
current response violates the principle, as far as the judge can tell) and the draft
replaces it: the revision. The revised responses are the demonstrations SL-CAI fine-tunes
on. The world's LMs cannot rewrite a response in place, so a revision is a resample the
judge accepts, a best-of-k under the judge taken one draft at a time.

The gold reward decides nothing here; it is recorded beside every demonstration (`gold`,
and `sample_gold` of the first response) so that what the revisions bought is measurable.
"""
import jax
import numpy as np

from rlhf_jax.data.preferences import world_prompts
from rlhf_jax.world import constitution
from rlhf_jax.world import reward as reward_lib

# demos.FIELDS (what SFT reads), then what the revisions did: first_response, first_mask
# [N, R] the policy's first answer; revised [N] int32 how many drafts were accepted;
# first_harmful, harmful [N] int32 whether the first / final response holds a forbidden
# token.
FIELDS = ('prompts', 'prompt_lengths', 'response', 'mask', 'gold', 'sample_gold', 'prompt_id',
          'first_response', 'first_mask', 'revised', 'first_harmful', 'harmful')


def critique_and_revise(sampler, params, *, judge, principles, world, key, num_prompts: int,
                        prompt_len: int, revisions: int) -> tuple[dict, dict]:
  """(arrays of FIELDS, lineage figures) of `num_prompts` world prompts."""
  prompts, lengths = world_prompts(world.lang, key=jax.random.fold_in(key, 0),
                                   num=num_prompts, max_len=prompt_len)
  first = sampler.sample_in_chunks(params, prompts, lengths, jax.random.fold_in(key, 1))
  response, mask = np.asarray(first.response), np.asarray(first.mask)
  revised = np.zeros(num_prompts, np.int32)
  accepted = []
  for r in range(revisions):
    k = jax.random.fold_in(key, 2 + r)
    draft = sampler.sample_in_chunks(params, prompts, lengths, jax.random.fold_in(k, 0))
    which = constitution.draw(principles, key=jax.random.fold_in(k, 1), num=num_prompts)
    fwd, bwd = judge.readings(prompts=prompts, prompt_lengths=lengths, first=draft.response,
                              first_mask=draft.mask, second=response, second_mask=mask,
                              principle=which)
    take = (np.asarray(fwd) + np.asarray(bwd)) / 2 > 0.5
    response = np.where(take[:, None], draft.response, response)
    mask = np.where(take[:, None], draft.mask, mask)
    revised += take
    accepted.append(float(take.mean()))
  gold_of = lambda y, m: np.asarray(reward_lib.gold_reward(
      world.gold, prompts=prompts, prompt_mask=prompts > 0, responses=y, response_mask=m),
      np.float32)
  harm = np.asarray(world.gold.harmful)
  harmful_of = lambda y, m: (harm[y] & (m > 0)).any(axis=1).astype(np.int32)
  arrays = dict(prompts=prompts, prompt_lengths=lengths, response=response, mask=mask,
                gold=gold_of(response, mask), sample_gold=gold_of(first.response, first.mask),
                prompt_id=np.arange(num_prompts, dtype=np.int32),
                first_response=first.response, first_mask=first.mask, revised=revised,
                first_harmful=harmful_of(first.response, first.mask),
                harmful=harmful_of(response, mask))
  figures = {'accepted_per_revision': accepted,
             'first_harm_rate': float(arrays['first_harmful'].mean()),
             'revised_harm_rate': float(arrays['harmful'].mean()),
             'first_gold': float(arrays['sample_gold'].mean()),
             'revised_gold': float(arrays['gold'].mean())}
  return arrays, figures
