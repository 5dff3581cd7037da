r"""Pretraining a decoder Transformer on the ground-truth world (or a text corpus).

  python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain_tiny

Variants:
  tiny       2 layers, d_model 64, world vocab 64; about a minute on a 2-core CPU.
             Expected: eval/true_kl falls from ~2.8 nats/token at step 0 to ~0.04
             at step 300 (3 seeds; the world's entropy rate is 1.773 nats/token).
  small      the benchmark size: 8 layers, d_model 512, seq 256, world vocab 1024; 2000
             steps of 8 x 256 tokens, about 1.5 hours on a 2-core CPU at the benchmarked
             746 tokens/s (`python -m rlhf_jax.bench --config=configs/pretrain.py:small`).
             Expected: eval/true_kl falls towards 0; its end value has not been measured
             here (no accelerator), so none is claimed.
  tpu_v4_32  a pod-slice example (v4-32: 4 hosts, 16 chips = 16 JAX devices): 24 layers,
             d_model 2048, fsdp 4 x tensor 4, bf16 compute, world vocab 32768.
             launch/tpu_vm.sh runs it on every host (see the README). Not run here
             (it needs the slice); no runtime or result is claimed.

Any leaf can be overridden: --config.train.steps=1000 --config.data.source=text:PATH.
"""
from rlhf_jax.config import base_config


def get_config(arg: str = 'tiny'):
  config = base_config('pretrain')
  if arg == 'tiny':
    pass  # the blocks' defaults are the tiny sizes
  elif arg == 'small':
    config.model.update(d_model=512, n_layers=8, n_heads=8, d_ff=1536)
    config.world.update(vocab_size=1024, branching=32, eos_prob=0.01)
    config.train.update(steps=2000, batch_size=8, seq_len=256, log_every=20, eval_every=200,
                        ckpt_every=200)
    config.optim.update(lr=1e-3, warmup_steps=100)
  elif arg == 'tpu_v4_32':
    config.model.update(d_model=2048, n_layers=24, n_heads=16, d_ff=5632, dtype='bfloat16',
                        remat='dots')
    config.world.update(vocab_size=32768, branching=64, eos_prob=0.002)
    config.mesh.update(data=-1, fsdp=4, tensor=4)
    config.train.update(steps=20000, batch_size=256, seq_len=1024, log_every=50,
                        eval_every=1000, ckpt_every=1000)
    config.optim.update(lr=3e-4, warmup_steps=1000)
    config.data.vocab_size = 32768
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/pretrain.py; "
                     "choose tiny, small or tpu_v4_32")
  return config
