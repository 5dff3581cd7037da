r"""Distillation: a small student learns a frozen teacher's distributions.

  python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain_tiny
  python -m rlhf_jax.main --config=configs/distill.py:tiny --workdir=runs/distill_tiny

`distill.teacher_run` names the teacher (any run on the world: pretrain, SFT, DPO, PPO);
the world, gold-reward and annotator blocks are taken from it. The student is a fresh
model of this file's model block (or `distill.student_run`, an earlier run). Losses
(`distill.loss`, rlhf_jax/train/distill_losses.py): kd (alpha, temperature), reverse_kl,
gkd (beta; with distill.on_policy_fraction = lambda of each batch sampled by the student),
seq_kd (cross-entropy on the teacher's samples) and ce (no teacher: the same student on
the same number of the world's real tokens, the baseline of the gap closed).

Every tiny variant trains the 1-layer d_model-32 student (21k parameters) of the 2-layer
d_model-64 teacher of pretrain.py:tiny (139k) for 300 steps of 32 rows: 25-45 s on a 2-core
CPU (measured with two runs sharing the cores).

Variants:
  tiny          kd at temperature 1 on the world's true sequences. Expected (3 seeds, from
                a default pretrain.py:tiny teacher, true KL 0.042): eval/true_kl 0.046 ±
                0.003 nats/token at step 300, 0.93 of the gap closed.
  tiny_scratch  ce on the same true sequences, no teacher: eval/true_kl 0.096 ± 0.008.
  tiny_seq_kd   seq_kd on the teacher's samples (after BOS).
  tiny_gkd      gkd, beta 0.5, half of each batch the student's own samples.
  tiny_ppo      kd of an RLHF'd teacher (distill.teacher_run=runs/ppo_tiny) on its samples
                after the world's prompts; policy/* reports the gold reward the student
                keeps and its KL to the teacher's reference.
  small         a 4-layer d_model-256 student of a pretrain.py:small teacher; not run here
                (the teacher takes 1.5 hours on this CPU); no result is claimed.
  tpu_v4_32     a 12-layer d_model-1024 student of pretrain.py:tpu_v4_32 on a v4-32
                (fsdp 4 x tensor 4); not run here; no runtime or result is claimed.

Expected figures: docs/distillation.md.
"""
import ml_collections

from rlhf_jax.config import annotators_block, base_config, policy_eval_block, reward_block


def get_config(arg: str = 'tiny'):
  config = base_config('distill')
  config.reward = reward_block()
  config.annotators = annotators_block()
  config.policy_eval = policy_eval_block()
  config.distill = ml_collections.ConfigDict(dict(
      teacher_run='runs/pretrain_tiny',
      teacher_step=-1,         # -1: its newest checkpoint (pinned when the run starts)
      student_run='',          # '': a fresh student of the model block
      student_step=-1,
      loss='kd',               # kd | reverse_kl | gkd | seq_kd | ce
      temperature=1.0,         # softening of both distributions (kd: the T^2 factor)
      alpha=1.0,               # kd: weight of the soft term; 1 - alpha on the hard labels
      beta=0.5,                # gkd: the JSD's mixture weight (0: forward KL, 1: reverse)
      on_policy_fraction=0.0,  # lambda: rows of each batch the student samples itself
      teacher_top_k=0,         # > 0: the teacher's top-k logits only, the rest one bucket
      data='world',            # 'world': true sequences after BOS | 'teacher': its samples
      prompt_len=1,            # teacher data: 1 = BOS; more: the world's prompts (BOS and
                               # 1..prompt_len-1 tokens), as the RLHF stages use
      num_prompts=2048,        # teacher data with prompt_len > 1: the prompt pool
      max_new_tokens=48,       # response tokens of every row (world rows: tokens after BOS)
      sample_temperature=1.0,  # of the teacher's and the student's samples
      eval_prompts=256,        # rows each KL to the teacher is measured on
  ))
  config.model.update(d_model=32, n_layers=1, n_heads=2, d_ff=128)
  config.optim.update(lr=3e-3, warmup_steps=20)
  config.train.update(steps=300, batch_size=32, log_every=25, eval_every=100, ckpt_every=100)
  if arg == 'tiny':
    pass
  elif arg == 'tiny_scratch':
    config.distill.loss = 'ce'
  elif arg == 'tiny_seq_kd':
    config.distill.update(loss='seq_kd', data='teacher')
  elif arg == 'tiny_gkd':
    config.distill.update(loss='gkd', beta=0.5, on_policy_fraction=0.5)
  elif arg == 'tiny_ppo':
    config.distill.update(teacher_run='runs/ppo_tiny', data='teacher', prompt_len=8)
  elif arg == 'small':
    config.distill.teacher_run = 'runs/pretrain_small'
    config.model.update(d_model=256, n_layers=4, n_heads=4, d_ff=768)
    config.distill.max_new_tokens = 256
    config.train.update(steps=2000, batch_size=16, seq_len=256, eval_every=200,
                        ckpt_every=200)
    config.optim.update(lr=1e-3, warmup_steps=100)
  elif arg == 'tpu_v4_32':
    config.distill.teacher_run = 'runs/pretrain_tpu_v4_32'
    config.model.update(d_model=1024, n_layers=12, n_heads=8, d_ff=2816, dtype='bfloat16',
                        remat='dots')
    config.distill.update(max_new_tokens=1024, teacher_top_k=64)
    config.mesh.update(data=-1, fsdp=4, tensor=4)
    config.train.update(steps=20000, batch_size=256, seq_len=1024, log_every=50,
                        eval_every=1000, ckpt_every=1000)
    config.optim.update(lr=3e-4, warmup_steps=1000)
  else:
    raise ValueError(f'unknown variant {arg!r} of configs/distill.py; choose tiny, '
                     'tiny_scratch, tiny_seq_kd, tiny_gkd, tiny_ppo, small or tpu_v4_32')
  return config
