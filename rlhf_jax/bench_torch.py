"""The same train step in PyTorch eager, for `python -m rlhf_jax.bench` to time beside ours.

PyTorch is never a dependency: `available()` says whether it can be imported, and the bench
skips this comparison without it (`pip install torch==2.13.0` on this project's CPU
machines). The torch model is built from our ModelConfig and loads our initial parameters,
so both frameworks train the same model from the same weights: RMSNorm, rotary on the two
halves of each head, causal `scaled_dot_product_attention` (PyTorch's fused attention),
SwiGLU, untied output, written as a PyTorch user would (one [3D, D] QKV Linear, one [2F, D]
gate-up Linear), with AdamW and global-norm clipping of the run's optim block. Configs
outside that family are refused by `unsupported()`, never timed as a different model.
"""
import importlib.util
import time

import numpy as np


def available() -> bool:
  return importlib.util.find_spec('torch') is not None


def unsupported(cfg) -> str:
  """Why the torch mirror cannot express ModelConfig `cfg` ('' when it can)."""
  want = dict(mlp='swiglu', norm='rms', norm_offset=0.0, post_norms=False, positions='rope',
              rope_scaling='none', qkv_bias=False, attn_out_bias=False, mlp_bias=False,
              qk_norm=False, attn_softcap=0.0, logit_softcap=0.0, embed_scale=False,
              tie_embeddings=False, lora_rank=0, dtype='float32', param_dtype='float32')
  differ = [f'{k}={getattr(cfg, k)!r}' for k, v in want.items() if getattr(cfg, k) != v]
  if cfg.kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
    differ.append('grouped-query attention or a head_dim other than d_model / n_heads')
  return ', '.join(differ)


def _modules():
  """The torch model classes (defined here so that importing this file needs no torch)."""
  import torch
  import torch.nn.functional as F

  class Block(torch.nn.Module):

    def __init__(self, cfg):
      super().__init__()
      d, f = cfg.d_model, cfg.d_ff
      self.heads = cfg.n_heads
      self.attn_norm = torch.nn.RMSNorm(d, eps=cfg.norm_eps)
      self.mlp_norm = torch.nn.RMSNorm(d, eps=cfg.norm_eps)
      self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
      self.out = torch.nn.Linear(d, d, bias=False)
      self.gate_up = torch.nn.Linear(d, 2 * f, bias=False)
      self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x, sin, cos):
      b, t, d = x.shape
      q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, -1).unbind(2)

      def rope(z):
        z1, z2 = z.chunk(2, dim=-1)
        return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], dim=-1)
      q, k, v = rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2)
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
      g, u = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
      return x + self.down(F.silu(g) * u)

  class Model(torch.nn.Module):

    def __init__(self, cfg):
      super().__init__()
      self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)
      self.blocks = torch.nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
      self.norm = torch.nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
      self.logits = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
      half = cfg.head_dim // 2
      self.freq = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)

    def forward(self, tokens):
      angle = torch.arange(tokens.shape[1], dtype=torch.float32)[:, None] * self.freq
      sin, cos = angle.sin()[None, :, None], angle.cos()[None, :, None]
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x, sin, cos)
      return self.logits(self.norm(x))

  return Model


def build(cfg, params):
  """The torch model of ModelConfig `cfg` holding our parameter tree `params` (numpy)."""
  import torch
  model = _modules()(cfg)
  d = cfg.d_model
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy
  with torch.no_grad():
    model.embed.weight.copy_(t(params['embed']['embedding']))
    model.norm.weight.copy_(t(params['final_norm']['scale']))
    model.logits.weight.copy_(t(params['logits']['kernel']).T)
    for i, block in enumerate(model.blocks):
      p = params[f'layer_{i}']
      attn = p['attn']
      block.attn_norm.weight.copy_(t(p['attn_norm']['scale']))
      block.mlp_norm.weight.copy_(t(p['mlp_norm']['scale']))
      qkv = [np.asarray(attn[name]).reshape(d, -1).T for name in ('query', 'key', 'value')]
      block.qkv.weight.copy_(t(np.concatenate(qkv, axis=0)))
      block.out.weight.copy_(t(np.asarray(attn['out']).reshape(-1, d).T))
      block.gate_up.weight.copy_(t(np.asarray(p['mlp']['gate_up']).reshape(d, -1).T))
      block.down.weight.copy_(t(p['mlp']['down']).T)
  return model


def _matmul_peak(n: int, reps: int = 5) -> float:
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def train_step(cfg, params, tokens: np.ndarray, optim):
  """A PyTorch eager train step (forward, cross-entropy on next tokens, backward,
  global-norm clipping, AdamW of the `optim` block) of the mirror of `cfg` holding
  `params`, on tokens [B, T+1]: a callable returning the loss."""
  import torch
  import torch.nn.functional as F
  model = build(cfg, params)
  opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                          eps=optim.eps, weight_decay=optim.weight_decay)
  tokens = torch.from_numpy(np.asarray(tokens, np.int64))

  def step() -> float:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if optim.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
    opt.step()
    return float(loss)
  return step


def describe(matmul_n: int = 2048) -> dict:
  """torch's version, threads, and the FLOP/s of an n x n float32 matmul in it."""
  import torch
  return {'torch': f'{torch.__version__} eager', 'torch_threads': torch.get_num_threads(),
          'torch_matmul_peak': _matmul_peak(matmul_n)}
