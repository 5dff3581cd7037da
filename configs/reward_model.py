r"""Reward model on annotator labels of the SFT policy's samples, trunk from an SFT run.

  python -m rlhf_jax.main --config=configs/reward_model.py:tiny --workdir=runs/rm_tiny

`init.run` names the SFT run (default runs/sft_tiny; see configs/sft.py). The preference
set is made once in DIR/preferences (1024 world prompts x 4 responses, all 6 pairs of each
labelled by a random annotator of the pool) unless `prefs.dir` names an existing one.

On a local preference file instead (docs/local-datasets.md), from an SFT run on JSONL:

  python -m rlhf_jax.main --config=configs/reward_model.py:tiny --workdir=runs/rm_jsonl \
      --config.init.run=runs/sft_jsonl --config.prefs.data=jsonl:pairs.jsonl \
      --config.prefs.prompt_len=128 --config.prefs.max_new_tokens=256

Variants:
  tiny       one reward model, 400 steps of 64 pairs; about two minutes on a 2-core CPU.
             Expected: rm/gold_accuracy near 0.75 against a noise ceiling near 0.93
             (annotator temperature 0.1, a quarter of them in the minority group).
  tiny_ensemble  the same with 4 bootstrapped members (rm/ensemble_std > 0).
  small      for an sft.py:small run.
  task_tiny  an outcome reward model, a learned verifier (rm.objective='outcome'): from
             the GRPO warm start (sft.py:task_tiny), 4 samples of it to each of 3900
             problems of grpo.py:tiny's training pool, labelled 1/0 by the task's
             verifier, BCE on the head's score (sigmoid: P(correct)); held-out orm/* on
             8 samples of each of GRPO's 128 eval problems. The task, pool, new tokens
             and eval sizes are read from configs/grpo.py:tiny at build time.
             600 steps; 65 s on a 2-core CPU. Measured (one run, from sft.py:task_tiny):
             held-out accuracy 0.829 (= 1 - base rate 0.171: it never judges a response
             right), false-positive rate 0.000, false-negative rate 1.000, AUC 0.614
             (docs/verifiable-rl.md, "A learned verifier").

Any leaf can be overridden: --config.annotators.temperature=0 --config.rm.ensemble=4.
"""
import ml_collections

from rlhf_jax.config import feedback_config, jsonl_prefs_fields, load_named, prefs_block


def get_config(arg: str = 'tiny'):
  config = feedback_config('reward_model')
  config.init.run = 'runs/sft_tiny'
  config.prefs = prefs_block()
  config.prefs.update(jsonl_prefs_fields())
  config.rm = ml_collections.ConfigDict(dict(
      ensemble=1,              # K members, vmapped
      bootstrap=True,          # members weigh pairs by Poisson(1) draws (K > 1 only)
      pooling='mean',          # 'mean' over response tokens' hidden states | 'last' token's
      objective='pairs',       # 'pairs': Bradley-Terry on preferences | 'outcome': BCE on a
                               # task verifier's 1/0 labels (needs task and outcome blocks)
  ))
  config.optim.update(lr=1e-3, warmup_steps=20, weight_decay=0.0)
  config.train.update(steps=400, batch_size=64, log_every=25, eval_every=100, ckpt_every=100)
  if arg == 'tiny':
    pass
  elif arg == 'tiny_ensemble':
    config.rm.ensemble = 4
  elif arg == 'task_tiny':
    grpo = load_named('grpo', 'tiny')  # read at build time, as ppo.py:task_tiny does
    g = grpo.grpo
    config.init.run = grpo.init.run
    config.task = ml_collections.ConfigDict(grpo.task.to_dict())
    config.rm.objective = 'outcome'
    config.outcome = ml_collections.ConfigDict(dict(
        pool_prompts=g.num_prompts,  # GRPO's training pool (same seed: the same problems)
        num_problems=3900,           # its first problems the ORM learns on (nearly all)
        samples_per_problem=4,       # responses of the init policy to each, verifier-labelled
        max_new_tokens=g.max_new_tokens,
        temperature=1.0,
        eval_prompts=g.eval_prompts,  # GRPO's held-out problems (never trained on)
        eval_samples=g.eval_samples,  # responses to each: orm/* and orm/bon@k
    ))
    del config['prefs']  # no preference pairs
    config.train.update(steps=600, batch_size=64, log_every=25, eval_every=150,
                        ckpt_every=150)
  elif arg == 'small':
    config.init.run = 'runs/sft_small'
    config.prefs.update(num_prompts=4096, prompt_len=32, max_new_tokens=128)
    config.policy_eval.update(prompt_len=32, max_new_tokens=128)
    config.train.update(steps=2000, batch_size=32, eval_every=250, ckpt_every=250)
    config.optim.update(lr=1e-4, warmup_steps=100)
  else:
    raise ValueError(f'unknown variant {arg!r} of configs/reward_model.py; '
                     'choose tiny, tiny_ensemble, task_tiny or small')
  return config
