r"""The self-improvement loop on a verifiable task: each round the current policy samples
k solutions to fresh problems, a filter keeps some, and the next policy is fine-tuned on
them (expert iteration / STaR / ReST; rlhf_jax/loops/self_improve.py).

  python -m rlhf_jax.main --config=configs/self_improve.py:tiny --workdir=runs/si_tiny \
      --config.self_improve.init_run=runs/sft_task_tiny

`self_improve.init_run` names the warm start, an sft.py:task_tiny run (the task and world
come from it). The round's SFT (or GRPO) and, for the learned filter, its outcome reward
model are the `stages.sft`, `stages.grpo` and `stages.reward_model` configs (sft.py:
task_tiny, grpo.py:tiny and reward_model.py:task_tiny, cut down); the loop fills in the
runs they start from.

Variants:
  tiny   4 rounds of 128 fresh sum_mod problems x 4 samples, SFT 100 steps a round from
         the previous policy, filter exact, schedule replace: 85-90 s on a 2-core CPU
         (learned: 135-140 s).
         Expected (3 seeds, mean ± 95%, from the sft.py:task_tiny warm start at held-out
         pass@1 0.171, pass@8 0.742), at round 4: exact pass@1 0.735 ± 0.144, pass@8
         0.79, the fitted ceiling 0.74 ± 0.17; --config.self_improve.filter=learned
         0.232 ± 0.074 (its precision 0.53), pass@8 0.35; =self_consistency 0.149, pass@8
         0.21; =none 0.174, pass@8 0.57 (distinct traces 0.80 -> 0.68). With
         schedule=accumulate the same within the intervals (docs/self-improvement.md).
         trainer=grpo and init=base: not measured here, no result is claimed.

Filters (self_improve.filter): exact (the task's verifier), learned (an outcome reward
model refit each round on self_improve.label_budget exact labels of that round's samples,
plus those of earlier rounds), self_consistency (the samples agreeing with their prompt's
majority answer), none (keep everything). Schedules: replace (train on this round's kept
samples) | accumulate (on every round's so far). self_improve.init: previous (fine-tune
policy r into r+1, as ReST) | base (each round from the warm start, as STaR).
self_improve.trainer: sft (fine-tune on the kept samples) | grpo (`stages.grpo`, 30 steps
of grpo.py:tiny a round, on fresh problems, scored by the filter's verdict online).

Any leaf can be overridden: --config.self_improve.filter=learned --config.seed=1.
"""
import ml_collections

from rlhf_jax.config import load_named


def get_config(arg: str = 'tiny'):
  if arg != 'tiny':
    raise ValueError(f'unknown variant {arg!r} of configs/self_improve.py; choose tiny')
  sft = load_named('sft', 'task_tiny')
  rm = load_named('reward_model', 'task_tiny')
  grpo = load_named('grpo', 'tiny')
  for stage in (sft, rm, grpo):
    stage.init.run = 'set by the loop'
    stage.train.progress = False
  # The loop measures every policy itself (eval/*); the stages' own evals stay small.
  sft.sft.update(eval_prompts=32, eval_samples=4, eval_fraction=0.05)
  sft.optim.update(lr=1e-3, warmup_steps=10, end_lr_ratio=1.0)
  sft.train.update(steps=100, log_every=25, eval_every=100, ckpt_every=50)
  rm.outcome.update(eval_prompts=32, eval_samples=4)
  rm.outcome.labels_from = 'set by the loop'
  rm.train.update(steps=60, log_every=20, eval_every=60, ckpt_every=30)
  grpo.grpo.update(eval_prompts=32, eval_samples=4)
  grpo.train.update(steps=30, log_every=10, eval_every=30, ckpt_every=15)
  loop = ml_collections.ConfigDict(dict(
      init_run='runs/sft_task_tiny',  # the warm start (configs/sft.py:task_tiny)
      rounds=4,                # policies 1..rounds are trained; 0 is the warm start
      filter='exact',          # 'exact' | 'learned' | 'self_consistency' | 'none'
      schedule='replace',      # 'replace' | 'accumulate'
      init='previous',         # 'previous': policy r+1 from policy r | 'base': from init_run
      trainer='sft',           # 'sft': on the kept samples | 'grpo': online, scored by the
                               # filter's verdict (exact: verifier, learned: the ORM,
                               # self_consistency: the group's majority; not none)
      prompts=128,             # fresh problems per round (held-out problems removed)
      samples=4,               # k solutions sampled per problem
      temperature=1.0,
      label_budget=128,        # learned: exact labels bought per round
      eval_prompts=128,        # held-out problems every policy is measured on (eval/*)
      eval_samples=8,
      kl_rows=256,             # true world rows for self_improve/true_kl
  ))
  return ml_collections.ConfigDict(dict(
      stage='self_improve', seed=0, self_improve=loop,
      stages=ml_collections.ConfigDict(dict(sft=sft, reward_model=rm, grpo=grpo))))
