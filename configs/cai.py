r"""Constitutional AI on the world: a judge LM, SL-CAI (SFT on the policy's responses
revised under the judge's critiques), then RL-CAI (a reward model on judge-labelled
comparisons and PPO against it, or DPO on them); rlhf_jax/loops/constitutional.py.

  python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain_tiny
  python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=runs/sft_tiny
  python -m rlhf_jax.main --config=configs/cai.py:tiny --workdir=runs/cai_tiny

`cai.init_run` is the policy CAI starts from: the pretrained policy (default
runs/pretrain_tiny), which has never been taught to avoid the world's forbidden tokens.
The judge is made from the same run (stages.judge, configs/judge.py:tiny) unless
`cai.judge_run` names a judge run; its self-preference is measured on the samples of
stages.judge.judge_data.other_run (default runs/sft_tiny). `constitution` holds the
principles ({statement, about, weight}), used by the judge's training, the critiques and
the labels; `judge.human_fraction` of RL-CAI's comparisons go to the annotators instead.

Variants:
  tiny       SL -> RL with PPO: the judge (600 steps), 2048 prompts with 2 revisions,
             SFT 300 steps, a reward model on 1024 prompts x 4 samples of the SL policy,
             all labelled by the judge (human_fraction 0), PPO 100 iterations; 4 min 49 s
             on a 2-core CPU shared with another job. Measured (one seed): gold reward
             -0.467 -> -0.132 (SL) -> 0.210 (RL), harm rate 0.336 -> 0.199 -> 0.016, KL
             to the init policy 0.41 / 1.40 nats, response length 17.6 -> 12.8 -> 5.3
             tokens (the judge prefers short responses, and PPO finds it); 6067 judge
             labels, 0 human (docs/constitutional-ai.md).
  tiny_sl    SL-CAI alone (experiments/constitutional.py runs it once per judge and seed).
             Measured there (3 seeds, ± 95%): harm 0.336 -> 0.208 ± 0.020, gold -0.467 ->
             -0.166 ± 0.072; about 7 min each with the judge.
  tiny_rl    RL-CAI alone, from the init policy (there: from the SL policy, with
             cai.judge_run naming the judge). Measured there from the SL policies with
             human_fraction 0 and --config.stages.reward_model.train.steps=200 (3 seeds):
             harm 0.009 ± 0.022, gold 0.237 ± 0.124, KL to SL 1.2 nats; 80-110 s each.
  tiny_rm    SL -> RL with a reward-model judge (semi-automated RLHF): a reward model on
             384 human comparisons labels the rest. Expected result, as measured (one
             seed, after pretrain.py:tiny and sft.py:tiny as above): gold -0.467 -> 0.006
             (SL) -> 0.360 ± 0.034 (RL), harm rate 0.336 -> 0.117 -> 0.020, KL to the
             init policy 0.47 / 6.31 nats, response length 17.6 -> 13.9 -> 5.2 tokens,
             6083 comparisons labelled by the judge; about 4 min on a 2-core CPU.
  tiny_dpo   SL -> RL with DPO on the judge's comparisons instead of reward model + PPO.
             Expected result, as measured (one seed, after pretrain.py:tiny and sft.py:tiny
             as above): gold -0.467 -> -0.132 (SL) -> 0.215 ± 0.025 (DPO), harm rate
             0.336 -> 0.199 -> 0.000, KL to the init policy 2.09 nats, response length
             17.6 -> 12.8 -> 2.4 tokens (tiny's PPO: 5.3), 6067 judge labels; about 3.5
             min on a 2-core CPU.
  tiny_direct  SL -> RL with direct RLAIF: PPO whose reward is the judge's order-averaged
             verdict on each rollout against the SL policy's response to the same prompt
             (stages/ppo.py, ppo.reward='judge'); no reward model. Measured with
             --config.cai.plan=rl from the experiment's SL policies and tiny judges (3
             seeds, ± 95%): harm 0.208 -> 0.025 ± 0.015, gold -0.166 -> 0.173 ± 0.055,
             KL to SL 0.64 nats, 6400 judge labels; about 90 s each.

Any leaf can be overridden: --config.judge.human_fraction=0.5 --config.cai.revisions=4
--config.stages.ppo.ppo.kl_coef=0.1.
"""
import ml_collections

from rlhf_jax.config import load_named
from rlhf_jax.world.constitution import default_block

VARIANTS = ('tiny', 'tiny_sl', 'tiny_rl', 'tiny_rm', 'tiny_dpo', 'tiny_direct')


def get_config(arg: str = 'tiny'):
  if arg not in VARIANTS:
    raise ValueError(f'unknown variant {arg!r} of configs/cai.py; choose one of {VARIANTS}')
  stages = ml_collections.ConfigDict({
      'judge': load_named('judge', 'tiny'),
      **{name: load_named(name, 'tiny') for name in ('sft', 'reward_model', 'ppo', 'dpo')}})
  for name, stage in stages.items():
    stage.init.run = 'set by the loop'
    stage.train.progress = False
  del stages.judge['constitution']  # the loop's own, below, goes to every stage that uses one
  stages.ppo.ppo.rm_run = 'set by the loop'
  stages.ppo.train.update(steps=100, eval_every=50, ckpt_every=50)
  cai = ml_collections.ConfigDict(dict(
      init_run='runs/pretrain_tiny',
      judge_run='',            # '': train the judge in DIR/judge from stages.judge
      judge_init='',           # the run that judge is made from; '': init_run (another
                               # pretrain run: a judge of another size)
      plan={'tiny_sl': 'sl', 'tiny_rl': 'rl'}.get(arg, 'sl_rl'),  # 'sl_rl' | 'sl' | 'rl'
      rl={'tiny_dpo': 'dpo', 'tiny_direct': 'direct'}.get(arg, 'ppo'),  # RL-CAI: 'ppo'
                               # (reward model) | 'dpo' | 'direct' (the judge's score)
      revisions=2,             # critique-revision rounds per response
      num_prompts=2048,        # SL-CAI demonstrations
      prompt_len=8,
      max_new_tokens=48,
      temperature=1.0,
  ))
  judge = ml_collections.ConfigDict(dict(
      kind='rm' if arg == 'tiny_rm' else 'lm',  # 'lm' (a judge LM) | 'rm' (a reward model
                                                # on a human budget)
      run='set by the loop',
      human_fraction=0.0,      # comparisons labelled by the annotators instead of the judge
      human_budget=384,        # kind 'rm': the human comparisons its reward model learns from
  ))
  return ml_collections.ConfigDict(dict(stage='constitutional', seed=0, cai=cai, judge=judge,
                                        constitution=default_block(), stages=stages))
