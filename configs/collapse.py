r"""Model collapse with the pretraining Transformer: generation 0 trains on real data (the
world's true samples, or a text corpus), each later generation on what earlier models
sampled, mixed with real data as `collapse.schedule` says (rlhf_jax/loops/collapse.py).

  python -m rlhf_jax.main --config=configs/collapse.py:tiny --workdir=runs/collapse_tiny

Variants:
  tiny        the tiny world and Transformer, 5 generations of 1024 rows (150 steps each,
              from scratch), schedule replace; about 4 minutes on a 2-core CPU.
              Expected: true KL and perplexity rise and tail mass falls generation by
              generation (`--config.collapse.schedule=accumulate` keeps them near gen 0).
  small       the small world and model (vocab 1024), 10 generations of 8192 rows (1000
              steps each): hours on a CPU, meant for an accelerator; not run here, so no
              runtime or result is claimed beyond the direction tiny shows.

Real text: --config.data.source=text:PATH --config.data.vocab_size=1000 (true KL is then
not defined; perplexity and tail mass are measured on the corpus's held-out documents).
Generation 0 trains on `collapse.samples` training documents drawn at random with the run's
seed (all of them if there are fewer; DIR/real/lineage.json says how many).
Any leaf can be overridden: --config.collapse.init=finetune --config.collapse.temperature=0.9.
"""
import ml_collections

from rlhf_jax.config import base_config


def get_config(arg: str = 'tiny'):
  config = base_config('collapse')
  config.collapse = ml_collections.ConfigDict(dict(
      generations=5,
      samples=1024,            # rows per generation: the real set, and each model's samples
      heldout_rows=512,        # fixed real rows every generation is measured on
      schedule='replace',      # 'replace' | 'accumulate' | 'mix'
      mix_fraction=0.5,        # mix: share of each generation's rows that are fresh real data
      temperature=1.0,         # sampling temperature of the synthetic data
      continuous_slots=0,      # 0: the static sampler; > 0: continuous batching through
                               # that many cache rows, with row keys (other rows than 0's)
      init='scratch',          # 'scratch' | 'finetune' (from the previous generation)
  ))
  if arg == 'tiny':
    config.train.update(steps=150, eval_every=50, ckpt_every=50, log_every=25)
  elif arg == 'small':
    config.model.update(d_model=256, n_layers=4, n_heads=4, d_ff=768)
    config.world.update(vocab_size=1024, branching=32, eos_prob=0.02)
    config.train.update(steps=1000, batch_size=32, seq_len=128, eval_every=250,
                        ckpt_every=250)
    config.collapse.update(generations=10, samples=8192, heldout_rows=1024)
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/collapse.py; choose tiny or small")
  return config
