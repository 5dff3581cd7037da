r"""DPO or another loss of its family on annotator-labelled pairs of the SFT policy's samples; policy and frozen
reference both from an SFT run.

  python -m rlhf_jax.main --config=configs/dpo.py:tiny --workdir=runs/dpo_tiny

`init.run` names the SFT run (default runs/sft_tiny). The preference set is made in
DIR/preferences exactly as configs/reward_model.py makes it (same seed and SFT run: the
same pairs), unless `prefs.dir` names one, e.g. --config.prefs.dir=runs/rm_tiny/preferences.

On a local preference file instead (docs/local-datasets.md), from an SFT run on JSONL:

  python -m rlhf_jax.main --config=configs/dpo.py:tiny --workdir=runs/dpo_jsonl \
      --config.init.run=runs/sft_jsonl --config.prefs.data=jsonl:pairs.jsonl \
      --config.prefs.prompt_len=128 --config.prefs.max_new_tokens=256

Variants:
  tiny       DPO, beta 0.1, 300 steps of 32 pairs; about two minutes on a 2-core CPU.
             Expected: policy/gold_reward rises above the SFT policy's (step 0) at a
             policy/kl_ref of a few nats; dpo_eval/accuracy above 0.6.
  tiny_ipo   the same with the IPO loss (tau 0.1). Its h is a difference of summed
             (not per-token averaged) sequence log-ratios, so the target margin
             1/(2 tau) = 5 nats is per response: tau's scale depends on response length
             (twice as long responses need half the per-token margin for the same h).
  tiny_<loss> the same with any loss of train/preference_losses.LOSSES (their formulas,
             papers and the fields each reads are there): tiny_ipo_mean, tiny_cdpo,
             tiny_robust_dpo, tiny_hinge, tiny_kto, tiny_orpo, tiny_apo_zero at the
             defaults below, tiny_simpo at beta 2, gamma 1 (SimPO's beta scales a
             per-token average log-prob, so it is an order of magnitude larger than DPO's).
             orpo and simpo are reference-free: no reference log-probs are computed.
  small      for an sft.py:small run.

Any leaf can be overridden: --config.dpo.beta=0.3 --config.dpo.loss=kto.
"""
import ml_collections

from rlhf_jax.config import feedback_config, jsonl_prefs_fields, prefs_block
from rlhf_jax.train.preference_losses import LOSSES


def get_config(arg: str = 'tiny'):
  config = feedback_config('dpo')
  config.init.run = 'runs/sft_tiny'
  config.prefs = prefs_block()
  config.prefs.update(jsonl_prefs_fields())
  config.dpo = ml_collections.ConfigDict(dict(
      loss='dpo',              # train/preference_losses.LOSSES: dpo | ipo | ipo_mean | cdpo |
                               # robust_dpo | hinge | kto | orpo | simpo | apo_zero
      beta=0.1,                # scale of the log-ratio (dpo, cdpo, robust_dpo, hinge, kto,
                               # apo_zero) or of the per-token log-prob (simpo); the scale of
                               # every reported implicit reward
      tau=0.1,                 # ipo / ipo_mean: target margin 1 / (2 tau) on h of summed
                               # (ipo) or per-token averaged (ipo_mean) log-ratios
      epsilon=0.1,             # cdpo / robust_dpo: the assumed label-flip rate, in [0, 0.5)
      gamma=1.0,               # simpo: target margin; the boundary a_w - a_l = gamma / beta
      desirable_weight=1.0,    # kto: weight of the desirable (chosen) examples
      undesirable_weight=1.0,  # kto: weight of the undesirable (rejected) examples
      orpo_lambda=0.1,         # orpo: weight of the odds-ratio term against the SFT term
  ))
  config.optim.update(lr=3e-4, warmup_steps=20, weight_decay=0.0)
  config.train.update(steps=300, batch_size=32, log_every=25, eval_every=100, ckpt_every=100)
  if arg == 'tiny':
    pass
  elif arg.startswith('tiny_') and arg[5:] in LOSSES:
    config.dpo.loss = arg[5:]
    if arg == 'tiny_simpo':
      config.dpo.update(beta=2.0, gamma=1.0)
  elif arg == 'small':
    config.init.run = 'runs/sft_small'
    config.prefs.update(num_prompts=4096, prompt_len=32, max_new_tokens=128)
    config.policy_eval.update(prompt_len=32, max_new_tokens=128)
    config.train.update(steps=1000, batch_size=32, eval_every=200, ckpt_every=200)
    config.optim.update(lr=5e-5, warmup_steps=50)
  else:
    raise ValueError(f'unknown variant {arg!r} of configs/dpo.py; choose tiny, small or '
                     f'tiny_<loss>, <loss> one of {", ".join(LOSSES)}')
  return config
