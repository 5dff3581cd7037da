r"""Iterated RLHF rounds from an SFT run: each round samples fresh comparisons from the
current policy, has the annotators label them, refits the reward model, and trains the
next policy by PPO (or DPO) from the current one (rlhf_jax/loops/rlhf_rounds.py).

  python -m rlhf_jax.main --config=configs/rlhf_rounds.py:tiny --workdir=runs/rounds_tiny

`rounds.init_run` names the SFT run (default runs/sft_tiny). Each stage's config is its
own file's variant under `stages.*` (reward_model, ppo, dpo, sft); the loop fills in the runs
they start from. A stopped loop resumes at the round and step it was in.

Variants:
  tiny       3 rounds, PPO (tiny, 50 iterations a round), the reward model refit on all
             comparisons so far; about 6 minutes on a 2-core CPU (13 on a busy one).
             Expected (one seed, from runs/sft_tiny): rounds/gold_reward 0.338 -> 0.647
             -> 0.965 -> 1.032 at rounds/kl_sft 6.3 / 25.2 / 44.3 nats; each PPO run's
             proxy is about 0 at its reference; rounds/rm_drift_gold_accuracy 0.05-0.11
             below rounds/rm_gold_accuracy.
  tiny_dpo   the same with DPO (150 steps a round) on the comparisons so far. Not
             measured here: no runtime or result is claimed.
  tiny_rejection_sampling  expert iteration: SFT (150 steps a round) on the best of 8
             samples of the current policy under the refit reward model. Not measured
             here: no runtime or result is claimed.
  small      the small variants of every stage, from runs/sft_small: hours on a CPU,
             meant for an accelerator; not run here, so no result is claimed.

Any leaf can be overridden: --config.rounds.rm_data=fresh --config.stages.ppo.ppo.kl_coef=0.1.
"""

import ml_collections

from rlhf_jax.config import load_named


def get_config(arg: str = 'tiny'):
  if arg not in ('tiny', 'tiny_dpo', 'tiny_rejection_sampling', 'small'):
    raise ValueError(f'unknown variant {arg!r} of configs/rlhf_rounds.py; '
                     'choose tiny, tiny_dpo, tiny_rejection_sampling or small')
  variant = 'small' if arg == 'small' else 'tiny'
  stages = ml_collections.ConfigDict(
      {name: load_named(name, variant) for name in ('reward_model', 'ppo', 'dpo', 'sft')})
  for stage in stages.values():
    stage.init.run = 'set by the loop'
    stage.train.progress = False
  stages.ppo.ppo.rm_run = 'set by the loop'
  rounds = ml_collections.ConfigDict(dict(
      num=3,
      init_run='runs/sft_small' if arg == 'small' else 'runs/sft_tiny',
      policy_update={'tiny_dpo': 'dpo', 'tiny_rejection_sampling': 'rejection_sampling'}.get(
          arg, 'ppo'),         # 'ppo' | 'dpo' | 'rejection_sampling'
      rm_data='all',           # 'all': every round's comparisons so far | 'fresh': this round's
  ))
  if arg != 'small':
    stages.ppo.train.update(steps=50, eval_every=25, ckpt_every=25)
    stages.dpo.train.update(steps=150, eval_every=50, ckpt_every=50)
    stages.sft.train.update(steps=150, eval_every=50, ckpt_every=50)
  return ml_collections.ConfigDict(dict(stage='rlhf_rounds', rounds=rounds, stages=stages))
