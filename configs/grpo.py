r"""GRPO (and Dr.GRPO, RLOO, REINFORCE++) against a verifier, from a warm-started policy.

  python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain_tiny
  python -m rlhf_jax.main --config=configs/sft.py:task_tiny --workdir=runs/sft_task_tiny
  python -m rlhf_jax.main --config=configs/grpo.py:tiny --workdir=runs/grpo_tiny

`init.run` names the warm start: an SFT run on solved traces of the same task (sft.py:
task_tiny), so that pass@k > 0 from the first step; the policy and the frozen reference
both start there. `task` names the problems and their verifier (rlhf_jax/tasks), `grpo`
the method:

  advantage    grpo ((r - mean) / std in the group) | dr_grpo (r - mean) | rloo (leave
               one out) | reinforce_pp (batch-normalised)
  loss_agg     sequence (GRPO) | token (DAPO) | constant (Dr.GRPO: / (rows x max tokens))
  clip_low, clip_high   the ratio's clip range [1 - low, 1 + high] (DAPO clip-higher)
  kl           loss (k3 per token, as GRPO) | reward (as PPO) | off;  kl_coef its beta
  dynamic_sampling      drop groups whose rewards are all equal (DAPO)
  sample_dtype float32 | bfloat16 sampler; tis_cap > 0: truncated importance sampling

Variants:
  tiny        sum_mod over the tiny world vocab: 16 problems x 8 samples per step,
              100 steps, about 2 minutes on a 2-core CPU. Measured (one run, from
              sft.py:task_tiny): held-out pass@1 0.171 +- 0.013 -> 0.554 +- 0.033,
              greedy 0.31 -> 0.64, pass@8 0.74 -> 0.88 (docs/verifiable-rl.md).
  tiny_dapo   the same with DAPO's choices: token loss, clip 0.2 / 0.28, dynamic
              sampling, no KL. Expected: not measured yet; no result is claimed.
  tiny_orm    tiny against a learned verifier (grpo.reward='orm'): the training score is
              the P(correct) of the outcome reward model of grpo.rm_run
              (reward_model.py:task_tiny from the same warm start), logged as
              rl/orm_score; rl/pass_rate and eval/* stay the true verifier's, and the eval
              adds eval/orm_bon@k. Measured (one run, from sft.py:task_tiny, with the ORM
              of reward_model.py:task_tiny; 83 s): eval/orm_score 0.168 -> 0.425 while held-out pass@1 0.171 -> 0.153
              and pass@8 0.742 -> 0.172 in 100 steps (over-optimisation; tiny with the
              true verifier: 0.171 -> 0.554).
  small       for sft.py:task_small (a pretrain.py:small model): sum_mod of 12 values
              mod 97, 32 problems x 16 samples per step, 32 new tokens, 500 steps. Not
              run here (its pretraining takes 1.5 hours on this CPU); no result is
              claimed.
  tpu_v5e_16  a pod-slice shape (v5e-16, 16 chips): fsdp 16, 16 samples per problem,
              256 new tokens, bf16 sampling with TIS; the model is whatever init.run
              holds. Not run here: the stage runs in one process only for now (it refuses
              more with one error line), so no runtime or result is claimed.

Any leaf can be overridden: --config.grpo.advantage=rloo --config.task.name=lookup.
"""
import ml_collections

from rlhf_jax.config import feedback_config, task_block


def grpo_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      group_size=8,            # G samples per prompt
      advantage='grpo',        # 'grpo' | 'dr_grpo' | 'rloo' | 'reinforce_pp'
      loss_agg='sequence',     # 'sequence' | 'token' | 'constant'
      clip_low=0.2,
      clip_high=0.2,
      kl='loss',               # 'loss' (k3, GRPO) | 'reward' (PPO-style) | 'off'
      kl_coef=0.04,
      dynamic_sampling=False,  # drop zero-variance groups from the update
      epochs=1,                # passes over each batch of rollouts (old log-probs fixed)
      minibatches=2,
      num_prompts=4096,        # the training problem pool, fixed by seed
      max_new_tokens=16,
      temperature=1.0,
      sample_dtype='float32',  # the sampler's compute dtype: 'float32' | 'bfloat16'
      tis_cap=0.0,             # truncated importance sampling cap (0: off)
      eval_prompts=128,        # held-out problems for eval/pass@k (never trained on)
      eval_samples=8,          # n samples each: pass@k and maj@k for k = 1, 2, 4, .., n
      reward='verifier',       # 'verifier' (task.verify) | 'orm' (a learned verifier) |
                               # 'majority' (agreement with the group's vote, no check)
      rm_run='',               # reward='orm': an rm.objective='outcome' run on the same task
      rm_step=-1,              # its checkpoint; -1: the newest (pinned at resolve)
      data='',                 # only '': prompts-only JSONL has no answers to verify
                               # (refused); a JSONL of problems is task.name='jsonl'
  ))


def get_config(arg: str = 'tiny'):
  config = feedback_config('grpo')  # the world's gold reward is measured beside the verifier's
  config.init.run = 'runs/sft_task_tiny'
  config.task = task_block()
  config.grpo = grpo_block()
  config.optim.update(lr=1e-3, warmup_steps=5, weight_decay=0.0)
  config.train.update(steps=100, batch_size=16, log_every=10, eval_every=25, ckpt_every=25)
  if arg == 'tiny':
    pass
  elif arg == 'tiny_dapo':
    config.grpo.update(loss_agg='token', clip_high=0.28, dynamic_sampling=True, kl='off')
  elif arg == 'tiny_orm':
    config.grpo.update(reward='orm', rm_run='runs/orm_task_tiny')
  elif arg == 'small':
    config.init.run = 'runs/sft_task_small'
    config.task.update(num_operands=12, modulus=97)
    config.grpo.update(group_size=16, max_new_tokens=32, eval_prompts=256, eval_samples=16)
    config.train.update(steps=500, batch_size=32, log_every=10, eval_every=50, ckpt_every=50)
    config.optim.update(lr=1e-4)
  elif arg == 'tpu_v5e_16':
    config.init.run = 'runs/sft_task_tpu'
    config.grpo.update(group_size=16, max_new_tokens=256, sample_dtype='bfloat16',
                       tis_cap=2.0, eval_prompts=1024, eval_samples=16)
    config.mesh.update(data=1, fsdp=16, tensor=1)
    config.train.update(steps=1000, batch_size=64, eval_every=100, ckpt_every=100)
    config.optim.update(lr=1e-6)
  else:
    raise ValueError(f'unknown variant {arg!r} of configs/grpo.py; '
                     'choose tiny, tiny_dapo, tiny_orm, small or tpu_v5e_16')
  return config
