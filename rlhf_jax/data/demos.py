"""Demonstrations for SFT written by "expert annotators": for each world prompt, the best
of k samples of a policy under the gold reward (best-of-k, the simplest expert that is
measurably better than the policy it starts from; its KL to that policy is at most
log k - (k-1)/k), or under a reward model (rejection sampling, for expert iteration)."""
import jax
import numpy as np

from rlhf_jax.data.preferences import world_prompts
from rlhf_jax.world import reward as reward_lib

# prompts [N, P] left-padded, prompt_lengths [N], response [N, R] (PAD after EOS),
# mask [N, R] (1 on response tokens), gold [N] the demo's gold reward, sample_gold [N] the
# mean gold reward of the k samples it was chosen from, prompt_id [N].
FIELDS = ('prompts', 'prompt_lengths', 'response', 'mask', 'gold', 'sample_gold', 'prompt_id')


def best_of_k(sampler, params, *, world, key, num_prompts: int, k: int,
              prompt_len: int, score=None) -> dict:
  """score(prompts, prompt_lengths, responses, mask) -> [N] ranks the k samples (None: the
  gold reward); `gold` is always the chosen sample's gold reward."""
  prompts, lengths = world_prompts(world.lang, key=jax.random.fold_in(key, 0),
                                   num=num_prompts, max_len=prompt_len)
  many_prompts, many_lengths = np.repeat(prompts, k, axis=0), np.repeat(lengths, k)
  out = sampler.sample_in_chunks(params, many_prompts, many_lengths,
                                 jax.random.fold_in(key, 1))
  gold = np.asarray(reward_lib.gold_reward(
      world.gold, prompts=many_prompts, prompt_mask=many_prompts > 0, responses=out.response,
      response_mask=out.mask)).reshape(num_prompts, k)
  ranking = gold if score is None else np.asarray(
      score(many_prompts, many_lengths, out.response, out.mask)).reshape(num_prompts, k)
  best = ranking.argmax(axis=1)
  rows = np.arange(num_prompts) * k + best
  return dict(prompts=prompts, prompt_lengths=lengths, response=out.response[rows],
              mask=out.mask[rows], gold=gold[np.arange(num_prompts), best],
              sample_gold=gold.mean(axis=1),
              prompt_id=np.arange(num_prompts, dtype=np.int32))
