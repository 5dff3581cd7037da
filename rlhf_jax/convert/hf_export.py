"""A run directory -> a Hugging Face folder that `transformers` loads.

The run is any language-model run (an import, or a pretraining, SFT, DPO or PPO run, the
policy of the last): `runs.load` restores its newest checkpoint (or `step`). The family is
the one it was imported as; a run of our own exports as Llama when its model is Llama's
math (families.export_family). The vocabulary permutation of the import is undone and its
tokenizer files copied back; a run on our own sentencepiece tokenizer gets that file as
tokenizer.model. A run on the world has no tokenizer: only weights and config are written.

A LoRA run (docs/lora.md) exports only with `merge`: its base (the run its init.run names)
with the adapters merged in, W + (alpha / r) A B, as runs.load rebuilds it; we write no
PEFT adapter folders, so without `merge` it is refused rather than exported as its base.

Weights go to model.safetensors, or to shards of at most `max_shard_bytes` with
model.safetensors.index.json, in the run's parameter dtype. The folder must not exist yet
or be empty: nothing of the user's is overwritten.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import sharding
from rlhf_jax.convert import families
from rlhf_jax.data import corpus, hf_tokenizer
from rlhf_jax.errors import UserError
from rlhf_jax.models import lora
from rlhf_jax.train import runs

OUR_SPECIALS = {'pad': 0, 'bos': 1, 'eos': 2, 'unk': 3}


def _flat(tree, prefix=()) -> dict:
  if hasattr(tree, 'items'):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, prefix + (k,)))
    return out
  return {prefix: tree}


def export_run(workdir: str, folder: str, *, step: int = -1,
               max_shard_bytes: int = 5 << 30, merge: bool = False) -> dict:
  if jax.process_count() > 1:
    raise UserError('--to=hf runs in one process: it gathers every weight onto one host '
                    'and writes the safetensors files from there; run the export on one '
                    'host without --coordinator/--num_processes (any host that sees the '
                    'run directory)')
  if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
    raise UserError(f'--to=hf {folder} exists and is not an empty folder; export writes a '
                    'fresh one')
  config = runs.read_config(os.path.abspath(workdir), role='--workdir')
  if 'model' not in config:
    raise UserError(f'--workdir {workdir} is a {config.get("stage")!r} run, which has no '
                    'language model')
  if config.get('stage') == 'reward_model':
    raise UserError('--workdir names a reward_model run: a reward model is not a causal LM '
                    'that a Hugging Face *ForCausalLM loads')
  if lora.enabled(config) and not merge:
    raise UserError(f'--workdir {workdir} is a LoRA run (rank {config.lora.rank} adapters on '
                    f'{config.lora.targets}); pass --merge to export its base with the '
                    'adapters merged in (no PEFT adapter folder is written)')
  if merge and not lora.enabled(config):
    raise UserError(f'--merge: --workdir {workdir} is not a LoRA run (lora.rank is 0), so '
                    'there are no adapters to merge; drop --merge')
  m = config_lib.model_block()
  for key, value in config.model.items():
    m[key] = value
  found = hf_tokenizer.origin(os.path.abspath(workdir))
  if found is not None:
    origin_run, origin_config = found
    family, specials = origin_config['hf']['family'], origin_config['hf']['specials']
    torch_dtype = origin_config['hf'].get('torch_dtype', 'float32')
  else:
    origin_run, family, specials = None, families.export_family(m), OUR_SPECIALS
    torch_dtype = m.param_dtype
  hf = families.hf_config(family, m, torch_dtype=m.param_dtype,
                          specials={k: v for k, v in specials.items() if v is not None})
  families.check_expressible(family, m, hf)
  mesh_config = config_lib.mesh_block()
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:1])
  loaded = runs.load(workdir, mesh=mesh, mesh_config=mesh_config, step=step,
                     role='--workdir')
  params = {k: np.asarray(v) for k, v in _flat(loaded.params).items()}
  if 'type_embed' in {p[0] for p in params}:
    raise UserError('--workdir holds a model with a token-type embedding (a reward model '
                    'body), which no causal LM family has')
  perm = hf_tokenizer.permutation(m.vocab_size, specials)
  tensors = {}
  for e in families.entries(family, m, perm):
    for name, array in zip(e.names, e.to_hf([params[p] for p in e.ours])):
      tensors[name] = np.ascontiguousarray(array)
  if family == 'gpt2':
    tensors = {f'transformer.{k}': v for k, v in tensors.items()}
  os.makedirs(folder, exist_ok=True)
  dtype = jnp.bfloat16 if m.param_dtype == 'bfloat16' else jnp.float32
  files = _write_shards(tensors, folder, dtype=dtype, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  _copy_tokenizer(origin_run, workdir, folder)
  return {'family': family, 'tensors': len(tensors), 'files': files, 'step': loaded.step,
          'source_dtype': torch_dtype}


def _write_shards(tensors: dict, folder: str, *, dtype, max_shard_bytes: int) -> int:
  from safetensors.flax import save_file
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].size * jnp.dtype(dtype).itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += nbytes
  shards.append(current)
  cpu = jax.devices('cpu')[0]
  if len(shards) == 1:
    names = ['model.safetensors']
  else:
    names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    with jax.default_device(cpu):
      arrays = {k: jnp.asarray(v, dtype) for k, v in shard.items()}
    save_file(arrays, os.path.join(folder, name), metadata={'format': 'pt'})
    weight_map.update({k: name for k in shard})
    total += sum(a.size * a.dtype.itemsize for a in arrays.values())
  if len(shards) > 1:
    with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': int(total)}, 'weight_map': weight_map}, f, indent=2)
  return len(shards)


def _copy_tokenizer(origin_run, workdir: str, folder: str) -> None:
  if origin_run is not None:
    source = os.path.join(origin_run, hf_tokenizer.FOLDER)
    if os.path.isdir(source):
      for name in os.listdir(source):
        shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    return
  here = os.path.abspath(workdir)
  for _ in range(32):  # our own sentencepiece model, kept by the text pretraining run
    path = os.path.join(here, corpus.TOKENIZER_FILE)
    if os.path.isfile(path):
      shutil.copyfile(path, os.path.join(folder, 'tokenizer.model'))
      with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump({'tokenizer_class': 'LlamaTokenizer', 'bos_token': '<s>',
                   'eos_token': '</s>', 'pad_token': '<pad>', 'unk_token': '<unk>',
                   'add_bos_token': False}, f, indent=2)
      return
    config = runs.read_config(here)
    here = (config.get('init') or {}).get('run')
    if not here:
      return
