r"""Supervised fine-tuning on best-of-k demonstrations, from a pretraining run.

  python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain_tiny
  python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=runs/sft_tiny

`init.run` names the pretraining run (default runs/pretrain_tiny); the model and world
blocks are taken from its config.json. The demonstrations are the best of
`sft.samples_per_prompt` samples of the pretrained policy under the gold reward, written
once to DIR/demos. The loss covers response tokens only.

Variants:
  tiny       2048 prompts, best of 8, 300 steps; about a minute on a 2-core CPU.
             Expected (from a default pretrain.py:tiny run): policy/gold_reward rises
             from -0.47 (the pretrained policy, step 0) to 0.34 at step 300, towards
             sft/demo_gold_reward 0.70, at a policy/kl_ref of 0.8 nats (one seed).
  task_tiny  the warm start for RL against a verifier (configs/grpo.py:tiny): 2048 solved
             traces of the task in the `task` block (default sum_mod), none of them an
             eval problem; 300 steps at a constant lr 3e-3, stopped part-way on purpose.
             eval/* reports pass@k on GRPO's held-out problems. Measured (one run, from a
             default pretrain.py:tiny run): held-out pass@1 0.171 +- 0.013 (chance 1/7),
             greedy 0.31, pass@8 0.74. The task is learnt abruptly: pass@1 stays at
             chance to step 275 (token accuracy 0.90), and a run continued past 300
             reaches 0.9 within 50-100 steps, leaving RL nothing to do; from a start at
             chance, 100 GRPO steps did not leave chance (docs/verifiable-rl.md).
  small      for a pretrain.py:small run (init.run=runs/pretrain_small).
  task_small the warm start of configs/grpo.py:small, for a pretrain.py:small run:
             sum_mod of 12 values mod 97 over the world vocab of 1024, 8192 traces,
             1000 steps. Not run here (pretrain.py:small takes 1.5 hours on this CPU);
             no result is claimed.

On a local JSONL file instead (docs/local-datasets.md), from a pretraining run on text:

  python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=runs/sft_jsonl \
      --config.init.run=runs/pretrain_text --config.sft.data=jsonl:demos.jsonl \
      --config.sft.prompt_len=128 --config.sft.max_new_tokens=256

Any leaf can be overridden: --config.init.run=DIR --config.sft.samples_per_prompt=16.
"""
import ml_collections

from rlhf_jax.config import feedback_config, task_block


def get_config(arg: str = 'tiny'):
  config = feedback_config('sft')
  config.init.run = 'runs/pretrain_tiny'
  config.sft = ml_collections.ConfigDict(dict(
      num_prompts=2048,
      samples_per_prompt=8,    # k of best-of-k
      prompt_len=8,
      max_new_tokens=48,
      temperature=1.0,
      eval_fraction=0.1,       # prompts held out for eval/loss
      data='',                 # '': best-of-k demonstrations on the world; 'jsonl:PATH': a
                               # local file of {"prompt", "completion"} or {"messages"}
                               # rows (data/jsonl.py), init.run a run on text
      overlong='error',        # jsonl: a row over prompt_len / max_new_tokens tokens is an
                               # 'error' | 'drop' (left out, counted in DIR/jsonl's lineage)
  ))
  config.optim.update(lr=1e-3, warmup_steps=20)
  config.train.update(steps=300, batch_size=32, log_every=25, eval_every=100, ckpt_every=100)
  if arg == 'tiny':
    pass
  elif arg == 'task_tiny':  # the warm start of configs/grpo.py:tiny
    config.task = task_block()
    config.sft.update(num_prompts=2048, max_new_tokens=16, eval_prompts=128, eval_samples=8)
    config.optim.update(lr=3e-3, end_lr_ratio=1.0)
    config.train.update(steps=300, eval_every=100, ckpt_every=100)
  elif arg == 'small':
    config.init.run = 'runs/pretrain_small'
    config.sft.update(num_prompts=8192, prompt_len=32, max_new_tokens=128)
    config.policy_eval.update(prompt_len=32, max_new_tokens=128)
    config.train.update(steps=1000, batch_size=32, eval_every=200, ckpt_every=200)
    config.optim.update(lr=3e-4, warmup_steps=50)
  elif arg == 'task_small':
    config.init.run = 'runs/pretrain_small'
    config.task = task_block()
    config.task.update(num_operands=12, modulus=97)
    config.sft.update(num_prompts=8192, max_new_tokens=32, eval_prompts=256, eval_samples=16)
    config.optim.update(lr=3e-4, warmup_steps=50, end_lr_ratio=1.0)
    config.train.update(steps=1000, eval_every=200, ckpt_every=200)
  else:
    raise ValueError(f'unknown variant {arg!r} of configs/sft.py; choose tiny, task_tiny, '
                     'small or task_small')
  return config
