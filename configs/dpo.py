r"""DPO (or IPO) on annotator-labelled pairs of the SFT policy's samples; policy and frozen
reference both from an SFT run.

  python -m rlhf_jax.main --config=configs/dpo.py:tiny --workdir=runs/dpo_tiny

`init.run` names the SFT run (default runs/sft_tiny). The preference set is made in
DIR/preferences exactly as configs/reward_model.py makes it (same seed and SFT run: the
same pairs), unless `prefs.dir` names one, e.g. --config.prefs.dir=runs/rm_tiny/preferences.

Variants:
  tiny       DPO, beta 0.1, 300 steps of 32 pairs; about two minutes on a 2-core CPU.
             Expected: policy/gold_reward rises above the SFT policy's (step 0) at a
             policy/kl_ref of a few nats; dpo_eval/accuracy above 0.6.
  tiny_ipo   the same with the IPO loss (tau 0.1). Its h is a difference of summed
             (not per-token averaged) sequence log-ratios, so the target margin
             1/(2 tau) = 5 nats is per response: tau's scale depends on response length
             (twice as long responses need half the per-token margin for the same h).
  small      for an sft.py:small run.

Any leaf can be overridden: --config.dpo.beta=0.3 --config.dpo.loss=ipo.
"""
import ml_collections

from rlhf_jax.config import feedback_config, prefs_block


def get_config(arg: str = 'tiny'):
  config = feedback_config('dpo')
  config.init.run = 'runs/sft_tiny'
  config.prefs = prefs_block()
  config.dpo = ml_collections.ConfigDict(dict(
      loss='dpo',              # 'dpo' | 'ipo'
      beta=0.1,                # DPO inverse temperature (also scales reported rewards)
      tau=0.1,                 # IPO regularisation: target margin 1 / (2 tau) on h of
                               # summed (not per-token averaged) sequence log-probs
  ))
  config.optim.update(lr=3e-4, warmup_steps=20, weight_decay=0.0)
  config.train.update(steps=300, batch_size=32, log_every=25, eval_every=100, ckpt_every=100)
  if arg == 'tiny':
    pass
  elif arg == 'tiny_ipo':
    config.dpo.loss = 'ipo'
  elif arg == 'small':
    config.init.run = 'runs/sft_small'
    config.prefs.update(num_prompts=4096, prompt_len=32, max_new_tokens=128)
    config.policy_eval.update(prompt_len=32, max_new_tokens=128)
    config.train.update(steps=1000, batch_size=32, eval_every=200, ckpt_every=200)
    config.optim.update(lr=5e-5, warmup_steps=50)
  else:
    raise ValueError(f'unknown variant {arg!r} of configs/dpo.py; choose tiny, tiny_ipo or small')
  return config
