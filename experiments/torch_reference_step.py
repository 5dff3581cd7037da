r"""The `small` train step in PyTorch (eager), for comparison with `python -m rlhf_jax.bench`.

  pip install torch==2.13.0   # not a dependency of the project; this script only
  python experiments/torch_reference_step.py [--steps=8] [--batch=8] [--seq=256]

The same architecture and sizes as `configs/pretrain.py:small` (RMSNorm, rotary, causal
attention through `scaled_dot_product_attention`, SwiGLU, untied output, vocab 1024), the
same AdamW and global-norm clipping, float32, all CPU threads. It times forward, backward
and the optimiser step on random tokens, measures a 2048^3 float32 matmul the same way the
JAX bench does, and prints a table then one JSON line with `tokens_per_s` and `mfu` (the
same FLOP count as `ModelConfig.flops_per_token`).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


class Block(torch.nn.Module):

  def __init__(self, d, h, f):
    super().__init__()
    self.h = h
    self.attn_norm, self.mlp_norm = torch.nn.RMSNorm(d, eps=1e-6), torch.nn.RMSNorm(d, eps=1e-6)
    self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
    self.out = torch.nn.Linear(d, d, bias=False)
    self.gate_up = torch.nn.Linear(d, 2 * f, bias=False)
    self.down = torch.nn.Linear(f, d, bias=False)

  def forward(self, x, sin, cos):
    b, t, d = x.shape
    q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.h, d // self.h).unbind(2)

    def rope(z):
      z1, z2 = z.chunk(2, dim=-1)
      return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], dim=-1)
    q, k, v = rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
    g, u = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
    return x + self.down(F.silu(g) * u)


class Model(torch.nn.Module):

  def __init__(self, vocab, d, layers, h, f):
    super().__init__()
    self.embed = torch.nn.Embedding(vocab, d)
    self.blocks = torch.nn.ModuleList(Block(d, h, f) for _ in range(layers))
    self.norm = torch.nn.RMSNorm(d, eps=1e-6)
    self.logits = torch.nn.Linear(d, vocab, bias=False)
    half = d // h // 2
    self.freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)

  def forward(self, tokens):
    t = tokens.shape[1]
    angle = torch.arange(t, dtype=torch.float32)[:, None] * self.freq
    sin, cos = angle.sin()[None, :, None], angle.cos()[None, :, None]
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, sin, cos)
    return self.logits(self.norm(x))


def best_matmul_flops(n=2048, reps=5):
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=256)
  args = parser.parse_args()
  vocab, d, layers, h, f = 1024, 512, 8, 8, 1536
  torch.manual_seed(0)
  model = Model(vocab, d, layers, h, f)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  tokens = torch.randint(3, vocab, (args.batch, args.seq + 1))

  def step():
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  step()
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  step_s = sorted(times)[len(times) // 2]
  peak = best_matmul_flops()
  matmul_params = layers * (4 * d * d + 3 * d * f) + vocab * d
  flops_per_token = 6.0 * matmul_params + 6 * layers * args.seq * d
  tokens_per_s = args.batch * args.seq / step_s
  figures = {'framework': f'torch {torch.__version__} eager', 'threads': torch.get_num_threads(),
             'batch_size': args.batch, 'seq_len': args.seq, 'step_s': round(step_s, 4),
             'tokens_per_s': round(tokens_per_s, 1),
             'matmul_peak_tflops_per_s': round(peak / 1e12, 4),
             'mfu': round(flops_per_token * tokens_per_s / peak, 4)}
  for key, value in figures.items():
    print(f'{key:<26}{value}')
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
