r"""A judge LM for AI feedback: a world LM fine-tuned to give a principle's verdict on two
responses, from the verdicts of a noisy annotator under that principle
(rlhf_jax/stages/judge.py, rlhf_jax/data/judge_docs.py).

  python -m rlhf_jax.main --config=configs/judge.py:tiny --workdir=runs/judge_tiny

`init.run` names the run the judge is made from (default runs/pretrain_tiny, the policy
constitutional AI starts from); its samples are the judge's training pairs, or those of
`judge_data.policy_run` when it names a run. `judge_data.other_run` (default
runs/sft_tiny) names another policy whose samples measure the judge's self-preference;
'' skips it. `constitution` holds the principles ({statement, about, weight};
world/constitution.py).

Variants:
  tiny       the judge is the tiny pretrained model (2 layers, d_model 64), 1024 prompts x
             4 samples (6112 pairs), 600 steps of 64; 2 min on a 2-core CPU shared with
             another job. Expected result, as measured (one run, the judge of
             configs/cai.py:tiny), on 1633 held-out pairs: agreement with the
             principle's truth 0.663 (harmless 0.916, helpful 0.664, on_topic 0.568; its
             teacher's 0.908), gold agreement 0.545, position flip rate 0.639, length
             bias -0.162, self-preference +0.131.
  tiny_wide  a judge of another size: made from runs/pretrain_tiny_wide
             (configs/pretrain.py:tiny with --config.model.d_model=128
             --config.model.n_layers=4 --config.model.d_ff=512), learning on
             runs/pretrain_tiny's samples. Expected result, as measured in
             experiments/constitutional.py (3 seeds): gold agreement 0.558 (the tiny
             judge's 0.549), position flip rate 0.572 (0.614); its policies' harm and
             gold within the tiny judge's intervals.

Any leaf can be overridden: --config.judge_data.teacher_temperature=0.1
--config.constitution.harmless.weight=4.
"""
import ml_collections

from rlhf_jax.config import feedback_config
from rlhf_jax.world.constitution import default_block


def judge_data_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_prompts=1024,
      responses_per_prompt=4,  # every pair of them is one judge document
      prompt_len=8,
      max_new_tokens=48,
      temperature=1.0,         # of the policy's samples
      teacher_temperature=0.3,  # the principle annotator's noise, in units of the
                                # principle utility's std (0: always the better one)
      eval_fraction=0.1,       # prompts held out, with all their pairs
      eval_pairs=1024,         # at most this many held-out pairs are read at eval
      policy_run='',           # whose samples the judge learns on; '': the init run's
      other_run='runs/sft_tiny',  # another policy's pairs (self-preference); '': none
  ))


def get_config(arg: str = 'tiny'):
  if arg not in ('tiny', 'tiny_wide'):
    raise ValueError(f'unknown variant {arg!r} of configs/judge.py; choose tiny or tiny_wide')
  config = feedback_config('judge')
  config.init.run = 'runs/pretrain_tiny' if arg == 'tiny' else 'runs/pretrain_tiny_wide'
  config.constitution = default_block()
  config.judge_data = judge_data_block()
  if arg == 'tiny_wide':
    config.judge_data.policy_run = 'runs/pretrain_tiny'
  config.optim.update(lr=1e-3, warmup_steps=20, weight_decay=0.0)
  config.train.update(steps=600, batch_size=64, log_every=50, eval_every=200, ckpt_every=200)
  return config
