"""Hugging Face checkpoint families: their config.json <-> our model block, and their tensor
names and layouts <-> our parameter tree.

A family is read only when every field that changes its math is one we map; anything
else (another activation, a rope scaling we do not implement, sliding-window layers) is
refused before a weight is read, naming the field. Torch Linear weights are [out, in];
ours are [in, ...] with the heads split out, so each entry says how to move between them.
GPT-2 stores Conv1D weights as [in, out] and fuses q, k and v into one tensor.
"""
import dataclasses
from typing import Callable

import numpy as np

from rlhf_jax.convert.layout import Layout
from rlhf_jax.errors import UserError

LLAMA_LIKE = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma')
FAMILIES = ('gpt2', *LLAMA_LIKE)
ARCHITECTURES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM',
                 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                 'qwen3': 'Qwen3ForCausalLM', 'gemma': 'GemmaForCausalLM'}
_TANH_GELU = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


def family_of(hf: dict) -> str:
  kind = hf.get('model_type')
  if kind not in FAMILIES:
    names = hf.get('architectures') or [kind]
    raise UserError(f'config.json names architecture {", ".join(map(str, names))} '
                    f'(model_type {kind!r}), which we do not map; mapped: {", ".join(FAMILIES)}')
  return kind


def _need(hf: dict, name: str):
  if name not in hf:
    raise UserError(f'config.json has no {name!r}, which its model_type {hf["model_type"]!r} '
                    'needs')
  return hf[name]


def _refuse(field: str, value, why: str):
  raise UserError(f'config.json {field}={value!r}: {why}; not imported')


def model_fields(hf: dict) -> dict:
  """Our model-block fields for the checkpoint described by config.json `hf`."""
  family = family_of(hf)
  if family == 'gpt2':
    return _gpt2_fields(hf)
  d, heads = _need(hf, 'hidden_size'), _need(hf, 'num_attention_heads')
  act = hf.get('hidden_activation') or hf.get('hidden_act', 'silu')
  if family == 'gemma':
    act = hf.get('hidden_activation') or 'gelu_pytorch_tanh'  # what transformers runs
    if act not in _TANH_GELU:
      _refuse('hidden_activation', act, 'Gemma is mapped with the tanh GELU only')
  elif act != 'silu':
    _refuse('hidden_act', act, 'this family is mapped with SwiGLU (silu) only')
  window = hf.get('sliding_window')
  if (family == 'mistral' and window and window < hf.get('max_position_embeddings', 0)) or (
      hf.get('use_sliding_window')):
    _refuse('sliding_window', window, 'sliding-window attention is not implemented')
  fields = dict(
      vocab_size=_need(hf, 'vocab_size'), d_model=d, n_layers=_need(hf, 'num_hidden_layers'),
      n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads,
      d_ff=_need(hf, 'intermediate_size'), head_dim=hf.get('head_dim') or d // heads,
      rope_theta=float(hf.get('rope_theta', 10000.0)),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', family == 'gemma')),
      tied_scale=False, mlp='geglu' if family == 'gemma' else 'swiglu')
  bias = bool(hf.get('attention_bias', False))
  fields.update(qkv_bias=bias or family == 'qwen2', attn_out_bias=bias,
                mlp_bias=bool(hf.get('mlp_bias', False)), qk_norm=family == 'qwen3')
  if family == 'gemma':
    # Gemma (1) has no soft-capping; transformers ignores the fields if a config has them.
    fields.update(norm_offset=1.0, embed_scale=True, tie_embeddings=True)
  fields.update(_rope_scaling(hf.get('rope_scaling')))
  return fields


def _rope_scaling(scaling) -> dict:
  if not scaling:
    return {}
  kind = scaling.get('rope_type', scaling.get('type'))
  if kind == 'linear':
    return dict(rope_scaling='linear', rope_factor=float(scaling['factor']))
  if kind == 'llama3':
    return dict(rope_scaling='llama3', rope_factor=float(scaling['factor']),
                rope_low_freq_factor=float(scaling['low_freq_factor']),
                rope_high_freq_factor=float(scaling['high_freq_factor']),
                rope_original_max_positions=int(scaling['original_max_position_embeddings']))
  if kind == 'default':
    return {}
  _refuse('rope_scaling', scaling, "only 'linear' and 'llama3' scaling are implemented")


def _gpt2_fields(hf: dict) -> dict:
  act = hf.get('activation_function', 'gelu_new')
  if act not in _TANH_GELU:
    _refuse('activation_function', act, 'GPT-2 is mapped with the tanh GELU only')
  if not hf.get('scale_attn_weights', True) or hf.get('scale_attn_by_inverse_layer_idx'):
    _refuse('scale_attn_weights', hf.get('scale_attn_weights'),
            'only 1/sqrt(head_dim) attention scaling is implemented')
  d = _need(hf, 'n_embd')
  return dict(vocab_size=_need(hf, 'vocab_size'), d_model=d, n_layers=_need(hf, 'n_layer'),
              n_heads=_need(hf, 'n_head'), d_ff=hf.get('n_inner') or 4 * d, mlp='gelu',
              norm='layer', norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
              positions='learned', max_positions=_need(hf, 'n_positions'),
              qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
              tied_scale=False)


def hf_config(family: str, m, *, torch_dtype: str, specials: dict) -> dict:
  """config.json for our model block `m` (a ConfigDict) written as `family`."""
  ids = {f'{k}_token_id': v for k, v in specials.items() if k in ('bos', 'eos', 'pad')}
  common = dict(architectures=[ARCHITECTURES[family]], model_type=family,
                vocab_size=m.vocab_size, torch_dtype=torch_dtype, **ids)
  if family == 'gpt2':
    return dict(common, n_embd=m.d_model, n_layer=m.n_layers, n_head=m.n_heads,
                n_inner=m.d_ff, n_positions=m.max_positions, n_ctx=m.max_positions,
                layer_norm_epsilon=m.norm_eps, activation_function='gelu_new',
                tie_word_embeddings=True)
  out = dict(common, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
             num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads or m.n_heads,
             intermediate_size=m.d_ff, head_dim=m.head_dim or m.d_model // m.n_heads,
             rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
             tie_word_embeddings=bool(m.tie_embeddings), max_position_embeddings=8192)
  if family == 'gemma':
    out.update(hidden_activation='gelu_pytorch_tanh', hidden_act='gelu_pytorch_tanh')
  else:
    out.update(hidden_act='silu')
  if family in ('llama', 'qwen3'):
    out.update(attention_bias=bool(m.qkv_bias), mlp_bias=bool(m.mlp_bias))
  if m.rope_scaling == 'linear':
    out['rope_scaling'] = {'rope_type': 'linear', 'factor': m.rope_factor}
  elif m.rope_scaling == 'llama3':
    out['rope_scaling'] = {'rope_type': 'llama3', 'factor': m.rope_factor,
                           'low_freq_factor': m.rope_low_freq_factor,
                           'high_freq_factor': m.rope_high_freq_factor,
                           'original_max_position_embeddings': m.rope_original_max_positions}
  return out


# Model-block fields that do not change the math (or are checked elsewhere).
_NOT_MATH = ('dtype', 'param_dtype', 'attention', 'attention_block', 'remat', 'lora')


def check_expressible(family: str, m, hf: dict) -> None:
  """Refuses an export whose config.json would not describe model block `m`: reading it
  back must give every field that changes the math (a feature the family lacks, such as
  soft-capping on Gemma 1, would otherwise be dropped unseen)."""
  from rlhf_jax import config as config_lib
  defaults = config_lib.model_block()
  back = dict(defaults.to_dict(), **model_fields(hf))
  norm = lambda k, v: (v or (m.d_model // m.n_heads)) if k == 'head_dim' else (
      (v or m.n_heads) if k == 'n_kv_heads' else v)
  differ = [k for k in defaults if k not in _NOT_MATH and k in m
            and norm(k, back.get(k)) != norm(k, m[k])]
  if not m.tie_embeddings:  # the scale of tied logits means nothing untied
    differ = [k for k in differ if k != 'tied_scale']
  if family == 'gpt2':  # GPT-2 has no rotary positions: theta and scaling are unused
    differ = [k for k in differ if not k.startswith('rope')]
  if differ:
    raise UserError(f'the run\'s model differs from what a {family} config.json can say, at '
                    f'model.{", model.".join(differ[:4])}; it cannot be exported as {family}')


def export_family(m) -> str:
  """The family a model block written by us (not imported) exports as, or a UserError:
  our default model (RMSNorm, rotary, SwiGLU, no biases, untied) is exactly Llama's math."""
  plain = (m.norm == 'rms' and m.positions == 'rope' and m.mlp == 'swiglu'
           and not (m.qkv_bias or m.attn_out_bias or m.mlp_bias or m.qk_norm or m.post_norms
                    or m.embed_scale or m.attn_softcap or m.logit_softcap or m.norm_offset)
           and not (m.tie_embeddings and m.tied_scale))
  if not plain:
    raise UserError('this run\'s model matches no Hugging Face family we write (Llama needs '
                    'RMSNorm, rotary positions, SwiGLU, no biases and unscaled tied logits)')
  return 'llama'


@dataclasses.dataclass(frozen=True)
class Entry:
  """Our params at `ours` (paths) <-> the HF tensors `names`: `layouts[i]` says where ours[i]
  sits in them (layout.py, read block by block on import); to_hf maps the list of our
  arrays to the list of theirs (export)."""
  ours: tuple
  names: tuple
  layouts: tuple
  to_hf: Callable


_SAME = Layout()
_T = Layout(order=(1, 0), groups=(1, 1))  # torch Linear [out, in] <-> ours [in, out]


def _linear():
  """torch Linear [out, in] <-> ours [in, heads, head_dim] (`out` split in two)."""
  return ((Layout(order=(1, 0), groups=(2, 1)),),
          lambda w: [w[0].reshape(w[0].shape[0], -1).T])


def _out_linear():
  """o_proj [D, H*hd] <-> ours [H, hd, D]."""
  return ((Layout(order=(1, 0), groups=(1, 2)),),
          lambda w: [w[0].reshape(-1, w[0].shape[-1]).T])


def _same(split: bool = False):
  """Ours is theirs, or theirs 1-D split into [heads, head_dim] (`split`)."""
  return ((Layout(order=(0,), groups=(2,)) if split else _SAME,),
          lambda w: [w[0].reshape(-1) if split else w[0]])


def entries(family: str, m, perm: np.ndarray) -> list[Entry]:
  """Every tensor of `family` for model block `m`. perm[i]: the HF id of our token i (the
  vocabulary is permuted so the specials sit at our ids 0-3, hf_tokenizer.py)."""
  inverse = np.argsort(perm)
  rows = ((Layout(perm=perm),), lambda w: [w[0][inverse]])
  e = lambda ours, names, fns: Entry(tuple(ours), tuple(names), *fns)
  h, kv = m.n_heads, m.n_kv_heads or m.n_heads
  out = []
  if family == 'gpt2':
    d = m.d_model
    out += [e([('embed', 'embedding')], ['wte.weight'], rows),
            e([('pos_embed', 'embedding')], ['wpe.weight'], _same())]
    for i in range(m.n_layers):
      p, L = f'h.{i}.', f'layer_{i}'
      for ours, theirs in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
        out += [e([(L, ours, 'scale')], [p + theirs + '.weight'], _same()),
                e([(L, ours, 'bias')], [p + theirs + '.bias'], _same())]
      qkv = [(L, 'attn', n) for n in ('query', 'key', 'value')]
      out += [e(qkv, [p + 'attn.c_attn.weight'],  # [D, 3D]: q, k, v side by side
                (tuple(Layout(order=(0, 1), groups=(1, 2), part=(1, k, 3)) for k in range(3)),
                 lambda w: [np.concatenate([x.reshape(d, -1) for x in w], axis=1)])),
              e([(L, 'attn', n + '_bias') for n in ('query', 'key', 'value')],
                [p + 'attn.c_attn.bias'],
                (tuple(Layout(order=(0,), groups=(2,), part=(0, k, 3)) for k in range(3)),
                 lambda w: [np.concatenate([x.reshape(-1) for x in w])])),
              e([(L, 'attn', 'out')], [p + 'attn.c_proj.weight'],
                ((Layout(order=(0, 1), groups=(2, 1)),),
                 lambda w: [w[0].reshape(h * w[0].shape[1], d)])),
              e([(L, 'attn', 'out_bias')], [p + 'attn.c_proj.bias'], _same()),
              e([(L, 'mlp', 'up')], [p + 'mlp.c_fc.weight'], _same()),
              e([(L, 'mlp', 'up_bias')], [p + 'mlp.c_fc.bias'], _same()),
              e([(L, 'mlp', 'down')], [p + 'mlp.c_proj.weight'], _same()),
              e([(L, 'mlp', 'down_bias')], [p + 'mlp.c_proj.bias'], _same())]
    out += [e([('final_norm', 'scale')], ['ln_f.weight'], _same()),
            e([('final_norm', 'bias')], ['ln_f.bias'], _same())]
    return out
  out.append(e([('embed', 'embedding')], ['model.embed_tokens.weight'], rows))
  for i in range(m.n_layers):
    p, L = f'model.layers.{i}.', f'layer_{i}'
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      out.append(e([(L, 'attn', ours)], [p + f'self_attn.{theirs}.weight'], _linear()))
      if m.qkv_bias:
        out.append(e([(L, 'attn', ours + '_bias')], [p + f'self_attn.{theirs}.bias'],
                     _same(split=True)))
    out.append(e([(L, 'attn', 'out')], [p + 'self_attn.o_proj.weight'], _out_linear()))
    if m.attn_out_bias:
      out.append(e([(L, 'attn', 'out_bias')], [p + 'self_attn.o_proj.bias'], _same()))
    if m.qk_norm:
      out += [e([(L, 'attn', 'query_norm', 'scale')], [p + 'self_attn.q_norm.weight'], _same()),
              e([(L, 'attn', 'key_norm', 'scale')], [p + 'self_attn.k_norm.weight'], _same())]
    out += [e([(L, 'mlp', 'gate_up')], [p + 'mlp.gate_proj.weight', p + 'mlp.up_proj.weight'],
              ((dataclasses.replace(_T, stack=1),),  # ours [D, 2, F]
               lambda w: [w[0][:, 0].T, w[0][:, 1].T])),
            e([(L, 'mlp', 'down')], [p + 'mlp.down_proj.weight'], ((_T,), lambda w: [w[0].T])),
            e([(L, 'attn_norm', 'scale')], [p + 'input_layernorm.weight'], _same()),
            e([(L, 'mlp_norm', 'scale')], [p + 'post_attention_layernorm.weight'], _same())]
    if m.mlp_bias:
      out += [e([(L, 'mlp', 'gate_up_bias')], [p + 'mlp.gate_proj.bias', p + 'mlp.up_proj.bias'],
                ((Layout(stack=0),), lambda w: [w[0][0], w[0][1]])),
              e([(L, 'mlp', 'down_bias')], [p + 'mlp.down_proj.bias'], _same())]
  out.append(e([('final_norm', 'scale')], ['model.norm.weight'], _same()))
  if not m.tie_embeddings:
    out.append(e([('logits', 'kernel')], ['lm_head.weight'],
                 ((Layout(order=(1, 0), groups=(1, 1), perm=perm),),
                  lambda w: [w[0].T[inverse]])))
  return out


# Tensors a checkpoint may hold that carry no weights: GPT-2's causal-mask buffers, and
# a tied model's copy of the embedding as its head.
def ignorable(name: str, family: str, m) -> bool:
  if family == 'gpt2':
    return name.endswith(('.attn.bias', '.attn.masked_bias')) or name == 'lm_head.weight'
  return name == 'lm_head.weight' and m.tie_embeddings or name.endswith('rotary_emb.inv_freq')
