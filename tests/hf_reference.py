"""Independent float64 NumPy forwards of the Hugging Face families, read from tensors by
their Hugging Face names and config.json fields, written from the families' published
definitions (not from our model): the reference the converter tests compare logits with.
Also tiny random checkpoints in Hugging Face's layout."""
import json
import math
import os

import numpy as np

FAMILY_CONFIGS = {
    'gpt2': dict(model_type='gpt2', architectures=['GPT2LMHeadModel'], vocab_size=40,
                 n_embd=16, n_layer=2, n_head=4, n_positions=16, n_inner=None,
                 layer_norm_epsilon=1e-5, activation_function='gelu_new',
                 bos_token_id=39, eos_token_id=39),
    'llama': dict(model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=40,
                  hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=24, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, hidden_act='silu',
                  rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                'high_freq_factor': 4.0,
                                'original_max_position_embeddings': 64},
                  bos_token_id=5, eos_token_id=7),
    'qwen2': dict(model_type='qwen2', architectures=['Qwen2ForCausalLM'], vocab_size=40,
                  hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=24, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True, hidden_act='silu',
                  bos_token_id=None, eos_token_id=9, pad_token_id=11),
    'qwen3': dict(model_type='qwen3', architectures=['Qwen3ForCausalLM'], vocab_size=40,
                  hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, intermediate_size=24, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, hidden_act='silu',
                  attention_bias=False, eos_token_id=3),
    'gemma': dict(model_type='gemma', architectures=['GemmaForCausalLM'], vocab_size=40,
                  hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, intermediate_size=24, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_activation='gelu_pytorch_tanh',
                  pad_token_id=0, eos_token_id=1, bos_token_id=2),
}


def tensor_shapes(hf: dict) -> dict:
  """name -> shape of every tensor the family's checkpoint holds."""
  if hf['model_type'] == 'gpt2':
    d, f, v = hf['n_embd'], hf['n_inner'] or 4 * hf['n_embd'], hf['vocab_size']
    out = {'wte.weight': (v, d), 'wpe.weight': (hf['n_positions'], d),
           'ln_f.weight': (d,), 'ln_f.bias': (d,)}
    for i in range(hf['n_layer']):
      p = f'h.{i}.'
      out.update({p + 'ln_1.weight': (d,), p + 'ln_1.bias': (d,), p + 'ln_2.weight': (d,),
                  p + 'ln_2.bias': (d,), p + 'attn.c_attn.weight': (d, 3 * d),
                  p + 'attn.c_attn.bias': (3 * d,), p + 'attn.c_proj.weight': (d, d),
                  p + 'attn.c_proj.bias': (d,), p + 'mlp.c_fc.weight': (d, f),
                  p + 'mlp.c_fc.bias': (f,), p + 'mlp.c_proj.weight': (f, d),
                  p + 'mlp.c_proj.bias': (d,)})
    return out
  d, f, v = hf['hidden_size'], hf['intermediate_size'], hf['vocab_size']
  h, kv = hf['num_attention_heads'], hf['num_key_value_heads']
  hd = hf.get('head_dim') or d // h
  bias = hf['model_type'] == 'qwen2'
  out = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,)}
  if not hf.get('tie_word_embeddings', hf['model_type'] == 'gemma'):
    out['lm_head.weight'] = (v, d)
  for i in range(hf['num_hidden_layers']):
    p = f'model.layers.{i}.'
    out.update({p + 'self_attn.q_proj.weight': (h * hd, d),
                p + 'self_attn.k_proj.weight': (kv * hd, d),
                p + 'self_attn.v_proj.weight': (kv * hd, d),
                p + 'self_attn.o_proj.weight': (d, h * hd),
                p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
                p + 'mlp.down_proj.weight': (d, f), p + 'input_layernorm.weight': (d,),
                p + 'post_attention_layernorm.weight': (d,)})
    if bias:
      out.update({p + 'self_attn.q_proj.bias': (h * hd,), p + 'self_attn.k_proj.bias': (kv * hd,),
                  p + 'self_attn.v_proj.bias': (kv * hd,)})
    if hf['model_type'] == 'qwen3':
      out.update({p + 'self_attn.q_norm.weight': (hd,), p + 'self_attn.k_norm.weight': (hd,)})
  return out


def random_tensors(hf: dict, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in tensor_shapes(hf).items():
    x = rng.normal(scale=0.3, size=shape)
    if ('norm' in name or 'ln_' in name) and name.endswith('weight'):
      x = (0.0 if hf['model_type'] == 'gemma' else 1.0) + 0.2 * rng.normal(size=shape)
    out[name] = x.astype(np.float32)
  return out


def write_checkpoint(folder: str, hf: dict, tensors: dict, *, shards: int = 1) -> None:
  """config.json, the tensors in `shards` safetensors files (with the index when > 1), and
  a word-level tokenizer.json over the vocabulary."""
  from safetensors.numpy import save_file
  import tokenizers
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(hf, f)
  names = sorted(tensors)
  if shards == 1:
    save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
  else:
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names, dtype=object), shards)):
      file = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
      save_file({n: tensors[n] for n in part}, os.path.join(folder, file),
                metadata={'format': 'pt'})
      weight_map.update({n: file for n in part})
    with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  vocab = {f'w{i}': i for i in range(hf['vocab_size'])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='w0'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(folder, 'tokenizer.json'))


def _rms(x, w, eps, offset=0.0):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + w)


def _layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _inv_freq(hf, hd):
  inv = 1.0 / hf.get('rope_theta', 10000.0) ** (np.arange(0, hd, 2) / hd)
  s = hf.get('rope_scaling')
  if not s:
    return inv
  old, lo, hi, factor = (s['original_max_position_embeddings'], s['low_freq_factor'],
                         s['high_freq_factor'], s['factor'])
  out = []
  for freq in inv:
    wavelen = 2 * math.pi / freq
    if wavelen < old / hi:
      out.append(freq)
    elif wavelen > old / lo:
      out.append(freq / factor)
    else:
      smooth = (old / wavelen - lo) / (hi - lo)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def _rotate(x, pos, inv):
  """Hugging Face's rotate_half form: x * cos + rotate_half(x) * sin over [..., T, hd]."""
  ang = pos[:, None] * inv[None, :]
  cos = np.cos(np.concatenate([ang, ang], -1))
  sin = np.sin(np.concatenate([ang, ang], -1))
  half = x.shape[-1] // 2
  rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos + rotated * sin


def _attention(q, k, v, cap=None):
  """q [B, H, T, hd], k, v [B, K, T, hd] (repeated to H), causal."""
  rep = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
  s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
  if cap:
    s = cap * np.tanh(s / cap)
  t = q.shape[2]
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p @ v


def forward(hf: dict, tensors: dict, ids: np.ndarray) -> np.ndarray:
  """Logits [B, T, V] float64 of token ids [B, T] (the checkpoint's ids)."""
  W = {k: v.astype(np.float64) for k, v in tensors.items()}
  b, t = ids.shape
  pos = np.arange(t, dtype=np.float64)
  heads_of = lambda x, n: x.reshape(b, t, n, -1).transpose(0, 2, 1, 3)
  merge = lambda x: x.transpose(0, 2, 1, 3).reshape(b, t, -1)
  if hf['model_type'] == 'gpt2':
    eps, h = hf['layer_norm_epsilon'], hf['n_head']
    x = W['wte.weight'][ids] + W['wpe.weight'][np.arange(t)]
    for i in range(hf['n_layer']):
      p = f'h.{i}.'
      y = _layer_norm(x, W[p + 'ln_1.weight'], W[p + 'ln_1.bias'], eps)
      q, k, v = np.split(y @ W[p + 'attn.c_attn.weight'] + W[p + 'attn.c_attn.bias'], 3, -1)
      a = merge(_attention(heads_of(q, h), heads_of(k, h), heads_of(v, h)))
      x = x + a @ W[p + 'attn.c_proj.weight'] + W[p + 'attn.c_proj.bias']
      y = _layer_norm(x, W[p + 'ln_2.weight'], W[p + 'ln_2.bias'], eps)
      y = _gelu_tanh(y @ W[p + 'mlp.c_fc.weight'] + W[p + 'mlp.c_fc.bias'])
      x = x + y @ W[p + 'mlp.c_proj.weight'] + W[p + 'mlp.c_proj.bias']
    x = _layer_norm(x, W['ln_f.weight'], W['ln_f.bias'], eps)
    return x @ W['wte.weight'].T
  kind = hf['model_type']
  gemma = kind == 'gemma'
  d, h, kv = hf['hidden_size'], hf['num_attention_heads'], hf['num_key_value_heads']
  hd = hf.get('head_dim') or d // h
  eps, off = hf['rms_norm_eps'], (1.0 if gemma else 0.0)
  inv = _inv_freq(hf, hd)
  x = W['model.embed_tokens.weight'][ids]
  if gemma:
    x = x * math.sqrt(d)
  for i in range(hf['num_hidden_layers']):
    p = f'model.layers.{i}.self_attn.'
    y = _rms(x, W[f'model.layers.{i}.input_layernorm.weight'], eps, off)
    proj = lambda n: y @ W[p + f'{n}_proj.weight'].T + W.get(p + f'{n}_proj.bias', 0.0)
    q, k, v = heads_of(proj('q'), h), heads_of(proj('k'), kv), heads_of(proj('v'), kv)
    if kind == 'qwen3':
      q, k = _rms(q, W[p + 'q_norm.weight'], eps), _rms(k, W[p + 'k_norm.weight'], eps)
    q, k = _rotate(q, pos, inv), _rotate(k, pos, inv)
    a = merge(_attention(q, k, v, hf.get('attn_logit_softcapping')))
    x = x + a @ W[p + 'o_proj.weight'].T
    m = f'model.layers.{i}.mlp.'
    y = _rms(x, W[f'model.layers.{i}.post_attention_layernorm.weight'], eps, off)
    act = _gelu_tanh if gemma else (lambda z: z / (1 + np.exp(-z)))
    y = act(y @ W[m + 'gate_proj.weight'].T) * (y @ W[m + 'up_proj.weight'].T)
    x = x + y @ W[m + 'down_proj.weight'].T
  x = _rms(x, W['model.norm.weight'], eps, off)
  logits = x @ W.get('lm_head.weight', W['model.embed_tokens.weight']).T
  cap = hf.get('final_logit_softcapping')
  return cap * np.tanh(logits / cap) if cap else logits
