"""A policy measured against the truth by sampling: the gold reward of its responses and
their KL to a reference policy, on fixed world prompts, at temperature 1.

  policy/gold_reward       mean gold reward of one response per prompt (and its standard
                           error, policy/gold_reward_se)
  policy/kl_ref            mean over responses of sum_t log pi(y_t|.) - log ref(y_t|.):
                           an unbiased estimate of the sequence KL(pi || ref)
  policy/harm_rate         fraction of responses holding a forbidden token
  policy/response_length   mean response tokens (EOS included)
  policy/eos_rate          fraction of responses that ended with EOS within max_new_tokens
  policy/group{g}_reward   the same responses' reward to annotator group g (0 majority,
                           1 minority): the gold reward with g's helpfulness weights
  policy/proxy_reward      with a `proxy` scorer (PPO's reward model): its mean score of
                           the same responses, to set beside the gold reward

The prompts and the sampling key depend on the world seed only, so every stage on a world
is scored on the same prompts and two evaluations of the same params agree exactly.

Given `prompts` (a user's held-out text prompts, PPO on ppo.data='jsonl:PATH') it samples
on those instead, with world=None: there is no gold reward, forbidden token or annotator
group, so only policy/kl_ref, policy/response_length, policy/eos_rate and
policy/proxy_reward are reported, never a gold number.
"""
import jax
import numpy as np

from rlhf_jax import distributed, sampling
from rlhf_jax.data.preferences import world_prompts
from rlhf_jax.world import language
from rlhf_jax.world import reward as reward_lib


class PolicyEvaluator:

  def __init__(self, *, config, world, model, mesh, mesh_config, param_shardings,
               ref_params, dp: int, proxy=None, ref_model=None, ref_param_shardings=None,
               prompts=None):
    """proxy(prompts, prompt_lengths, responses, mask) -> [B] scores, or None.
    ref_model, ref_param_shardings: the reference's own model when it is not `model`
    (a distilled student measured against its teacher's reference). prompts: (prompts
    [N, P], lengths [N]) to sample on instead of world prompts (N a multiple of dp)."""
    pe = config.policy_eval
    base = jax.random.fold_in(jax.random.key(config.world.seed), 0x9E1)
    if prompts is not None:
      self.prompts, self.lengths = prompts
    else:
      num = -(-pe.num_prompts // dp) * dp
      self.prompts, self.lengths = world_prompts(world.lang, key=jax.random.fold_in(base, 0),
                                                 num=num, max_len=pe.prompt_len)
    self.key = jax.random.fold_in(base, 1)
    self.world, self.ref_params, self.proxy = world, ref_params, proxy
    self.sampler = sampling.Sampler(
        model=model, config=sampling.SampleConfig(max_new_tokens=pe.max_new_tokens),
        mesh=mesh, mesh_config=mesh_config, param_shardings=param_shardings)
    self.ref_scorer = self.sampler if ref_model is None else sampling.Sampler(
        model=ref_model, config=self.sampler.config, mesh=mesh, mesh_config=mesh_config,
        param_shardings=ref_param_shardings)

  def __call__(self, params) -> dict:
    out = distributed.to_host(self.sampler.sample(params, self.prompts, self.lengths,
                                                  self.key))
    ref = np.asarray(distributed.to_host(self.ref_scorer.score(self.ref_params, self.prompts,
                                                               self.lengths, out.response)))
    mask = np.asarray(out.mask, np.float64)
    kl = ((np.asarray(out.raw_logprobs, np.float64) - ref) * mask).sum(axis=1)
    ended = ((out.response == language.EOS_ID) & (mask > 0)).any(axis=1)
    common = {'policy/kl_ref': kl.mean(), 'policy/response_length': mask.sum(axis=1).mean(),
              'policy/eos_rate': ended.mean()}
    if self.proxy is not None:
      common['policy/proxy_reward'] = float(np.mean(distributed.to_host(
          self.proxy(self.prompts, self.lengths, out.response, out.mask))))
    if self.world is None:
      return common
    gold = np.asarray(reward_lib.gold_reward(
        self.world.gold, prompts=self.prompts, prompt_mask=self.prompts > 0,
        responses=out.response, response_mask=out.mask), np.float64)
    harmful = (np.asarray(self.world.gold.harmful)[out.response] & (mask > 0)).any(axis=1)
    extra = {}
    for g, weights in enumerate(np.asarray(self.world.pool.group_helpfulness)):
      terms = reward_lib.reward_terms(self.world.gold, prompts=self.prompts,
                                      prompt_mask=self.prompts > 0, responses=out.response,
                                      response_mask=out.mask,
                                      token_weights=weights[np.asarray(out.response)])
      extra[f'policy/group{g}_reward'] = float(np.mean(reward_lib.combine(self.world.gold,
                                                                          terms)))
    return {**extra, **common, 'policy/gold_reward': gold.mean(),
            'policy/gold_reward_se': gold.std(ddof=1) / np.sqrt(len(gold)),
            'policy/harm_rate': harmful.mean()}
