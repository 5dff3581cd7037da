r"""PPO from an SFT policy against a reward model, measured against the gold reward.

  python -m rlhf_jax.main --config=configs/ppo.py:tiny --workdir=runs/ppo_tiny

`init.run` names the SFT run (policy, reference and, with ppo.value='critic', the critic's
start); `ppo.rm_run` the reward_model run whose ensemble scores the responses (the gold
reward and annotator blocks are taken from it), each member centred (ppo.reward_norm=mean,
or mean_std to also scale it to unit std) on the run's own samples of the SFT policy, kept
in DIR/reward_norm.json. With --config.ppo.reward=gold the policy optimises the gold reward
itself (an oracle, for comparison).

Variants:
  tiny        100 iterations of 64 rollouts (prompts of up to 8 tokens, 48 new tokens),
              4 epochs x 4 minibatches each, fixed beta 0.05; about 45 s on a 2-core
              CPU. Expected (runs/rm_tiny): policy/gold_reward 0.34 (SFT) -> 0.63 at
              step 25 (KL 5 nats) and 0.68 at step 50 (KL 17), then about 0.66 at KL
              20 while policy/proxy_reward keeps rising (-0.02 -> 3.4 -> 4.3): past
              step 50 the KL buys proxy reward only (over-optimisation).
  tiny_adaptive  the same with the adaptive KL controller (target 4 nats).
  task_tiny   PPO with its critic against a verifier (ppo.reward='task'), the "PPO" of
              the GRPO comparison: from the GRPO warm start (sft.py:task_tiny), the task,
              problem pool, new tokens, eval problems and schedule of grpo.py:tiny, read
              from that file, and as many rollouts per step as it has (train.batch_size
              x group_size, one response per problem here); no reward model, no EOS
              penalty (the verifier scores a response without EOS 0). Its eval/* are
              GRPO's, on the same held-out problems. Measured (one run, from sft.py:
              task_tiny): held-out pass@1 0.171 -> 0.900 +- 0.019 in 100 steps, about 3
              minutes on a 2-core CPU.
  small       for sft.py:small and reward_model.py:small runs.

Your own prompts (docs/local-datasets.md), from SFT and reward-model runs on JSONL:

  python -m rlhf_jax.main --config=configs/ppo.py:tiny --workdir=runs/ppo_jsonl \
      --config.init.run=runs/sft_jsonl --config.ppo.rm_run=runs/rm_jsonl \
      --config.ppo.data=jsonl:prompts.jsonl --config.ppo.prompt_len=128

rollouts and reward statistics on the file's prompts, policy/* (reward model score, KL)
on its held-out ones, no gold numbers; ppo.reward must be 'rm'.

Any leaf can be overridden: --config.ppo.kl_coef=0.1 --config.ppo.value=critic.
"""
import ml_collections

from rlhf_jax.config import feedback_config, load_named


def get_config(arg: str = 'tiny'):
  config = feedback_config('ppo')
  config.init.run = 'runs/sft_tiny'
  config.ppo = ml_collections.ConfigDict(dict(
      reward='rm',             # 'rm': the reward model of rm_run | 'gold': the world's (oracle)
      rm_run='runs/rm_tiny',
      rm_step=-1,              # its checkpoint; -1: the newest
      reward_norm='mean',      # members centred on the reference's samples | 'mean_std':
                               # also divided by their std there (Huang et al. 2024)
      reward_norm_prompts=1024,  # reference samples (one per world prompt) for those stats
      value='head',            # 'head' on the policy trunk | 'critic': a separate Transformer
      num_prompts=4096,        # the rollout prompt pool, fixed by seed
      prompt_len=8,
      max_new_tokens=48,
      no_eos_penalty=-1.0,     # added to the score of a response that ends without EOS
      continuous_slots=0,      # 0: the static sampler over each batch; > 0 (a multiple of
                               # the data-parallel size, <= train.batch_size): continuous
                               # batching of the rollouts through that many cache rows in
                               # the jitted step, with row keys (other tokens than 0's)
      kl_control='fixed',      # 'fixed' | 'adaptive' (Ziegler et al.)
      kl_coef=0.05,            # beta of the per-token penalty -beta (log pi - log ref)
      kl_target=4.0,           # adaptive: target sequence KL (nats)
      kl_horizon=10000.0,      # adaptive: rollouts over which beta adapts by at most 20%
      epochs=4,
      minibatches=4,
      clip=0.2,
      value_clip=0.2,
      value_coef=0.5,
      entropy_coef=0.0,
      gamma=1.0,
      lam=0.95,
      whiten=True,             # whiten advantages over the batch's response tokens
      data='',                 # '': world prompts; 'jsonl:PATH': a local file of {"prompt"}
                               # rows (data/jsonl.py) for the rollouts and the reward
                               # statistics; init.run and rm_run runs on text, reward 'rm'
      overlong='error',        # jsonl: a prompt over prompt_len tokens is an 'error' | 'drop'
      eval_fraction=0.1,       # jsonl: prompts held out of the pool for policy/* (RM and KL)
  ))
  config.optim.update(lr=1e-4, warmup_steps=10, weight_decay=0.0)
  config.train.update(steps=100, batch_size=64, log_every=10, eval_every=25, ckpt_every=25)
  if arg == 'tiny':
    pass
  elif arg == 'tiny_adaptive':
    config.ppo.kl_control = 'adaptive'
  elif arg == 'task_tiny':
    grpo = load_named('grpo', 'tiny')  # read at build time, so the two stay in step
    g = grpo.grpo
    config.init.run = grpo.init.run
    config.task = ml_collections.ConfigDict(grpo.task.to_dict())
    config.ppo.update(reward='task', rm_run='', value='critic', num_prompts=g.num_prompts,
                      max_new_tokens=g.max_new_tokens, no_eos_penalty=0.0)
    config.ppo.eval_prompts = g.eval_prompts   # held-out problems for eval/pass@k
    config.ppo.eval_samples = g.eval_samples   # samples each: pass@k, maj@k, k = 1, 2, .., n
    t = grpo.train
    config.train.update(steps=t.steps, batch_size=t.batch_size * g.group_size,
                        log_every=t.log_every, eval_every=t.eval_every,
                        ckpt_every=t.ckpt_every)
  elif arg == 'small':
    config.init.run = 'runs/sft_small'
    config.ppo.update(rm_run='runs/rm_small', prompt_len=32, max_new_tokens=128)
    config.policy_eval.update(prompt_len=32, max_new_tokens=128)
    config.train.update(steps=300, batch_size=64, eval_every=50, ckpt_every=50)
    config.optim.update(lr=2e-5)
  else:
    raise ValueError(f'unknown variant {arg!r} of configs/ppo.py; '
                     'choose tiny, tiny_adaptive, task_tiny or small')
  return config
