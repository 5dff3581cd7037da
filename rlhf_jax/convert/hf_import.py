"""A local Hugging Face folder -> an ordinary run directory (`stage: 'import'`).

What is read: config.json (refused before any weight is read if its family or a field that
changes the math is not mapped, families.py), then the `*.safetensors` files, through
`model.safetensors.index.json` when the checkpoint is sharded. A pickled
`pytorch_model.bin` is never read: unpickling runs whatever code the file holds.

Tensors are read one at a time (safetensors maps the file; nothing else is in memory), cast
to `model.param_dtype`, and each is laid out directly into its sharding on the mesh, so
the host holds one tensor at most. Every tensor of the family must be present and of its
shape, and every tensor in the files must be used (or be a known buffer), so that nothing
is dropped unseen.

The run directory holds config.json (the model block, the `hf` block: family, source,
special ids) and checkpoint 0, whose state has no optimiser moments (runs.optimizer gives
an import run optax.identity), plus the tokenizer files in tokenizer/. Any stage names it
in init.run; its vocabulary is permuted so the specials sit at our ids
(data/hf_tokenizer.py).
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import config as config_lib
from rlhf_jax import sharding
from rlhf_jax.convert import families
from rlhf_jax.data import hf_tokenizer
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.state import TrainState, abstract_sharded

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def read_hf_config(folder: str) -> dict:
  if not os.path.isdir(folder):
    raise UserError(f'--from=hf {folder}: no such folder')
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{folder} has no config.json: not a Hugging Face checkpoint folder')
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e})') from None


def weight_files(folder: str) -> list[str]:
  """The safetensors files of the checkpoint, from its index when it is sharded."""
  index = os.path.join(folder, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f).get('weight_map', {}).values()))
    missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
    if missing:
      raise UserError(f'{index} names shards that are not in the folder: {", ".join(missing)}')
    return [os.path.join(folder, n) for n in files]
  files = sorted(n for n in os.listdir(folder) if n.endswith('.safetensors'))
  if files:
    return [os.path.join(folder, n) for n in files]
  pickled = [n for n in os.listdir(folder) if n.endswith(('.bin', '.pt', '.pth', '.ckpt'))]
  if pickled:
    raise UserError(f'{folder} holds only pickled weights ({", ".join(sorted(pickled))}); '
                    'unpickling runs arbitrary code, so only *.safetensors are read (convert '
                    'them with safetensors first)')
  raise UserError(f'{folder} holds no *.safetensors weights')


class _Tensors:
  """name -> a lazy reader of that tensor over all files (names without GPT-2's
  'transformer.' prefix)."""

  def __init__(self, files: list[str]):
    from safetensors import safe_open
    self._handles, self.where = [], {}
    for path in files:
      handle = safe_open(path, framework='flax')
      self._handles.append(handle)
      for name in handle.keys():
        self.where[name.removeprefix('transformer.')] = (handle, name)

  def shape(self, name: str) -> tuple:
    handle, key = self.where[name]
    return tuple(handle.get_slice(key).get_shape())

  def read(self, name: str) -> np.ndarray:
    handle, key = self.where[name]
    with jax.default_device(jax.devices('cpu')[0]):
      return np.asarray(handle.get_tensor(key).astype(jnp.float32))


def _model_block(hf: dict, *, param_dtype: str):
  block = config_lib.model_block()
  for key, value in families.model_fields(hf).items():
    block[key] = value
  block.param_dtype = param_dtype
  block.dtype = param_dtype
  return block


def run_config(hf: dict, *, folder: str, param_dtype: str, specials: dict):
  config = config_lib.load_named('pretrain', 'tiny')
  with config.unlocked():
    config.stage = 'import'
    config.model = _model_block(hf, param_dtype=param_dtype)
    config.data.source = f'hf:{os.path.abspath(folder)}'
    config.train.steps = 1
    if config.model.positions == 'learned':
      config.train.seq_len = min(config.train.seq_len, config.model.max_positions)
    config.hf = dict(family=families.family_of(hf), source=os.path.abspath(folder),
                     architectures=list(hf.get('architectures') or []),
                     torch_dtype=str(hf.get('torch_dtype', 'float32')),
                     specials={k: specials.get(k) for k in ('bos', 'eos', 'pad', 'unk')})
  config_lib.validate_model(config.model, seq_len=config.train.seq_len)
  return config


def import_folder(folder: str, workdir: str, *, param_dtype: str = 'float32',
                  mesh_config=None) -> dict:
  """Writes the run; returns {'tensors', 'params', 'family'}."""
  if jax.process_count() > 1:
    raise UserError('convert runs in one process: import on one host, then any stage loads '
                    'the run sharded on the pod')
  hf = read_hf_config(folder)
  family = families.family_of(hf)
  families.model_fields(hf)  # refuses an unmapped field before any weight is read
  _clear_interrupted(workdir)
  files = weight_files(folder)
  specials = hf_tokenizer.specials_of(folder, hf)
  if specials.get('eos') is None:
    raise UserError(f'{folder}: neither config.json nor the tokenizer names an EOS token; '
                    'every stage stops responses at one')
  config = run_config(hf, folder=folder, param_dtype=param_dtype, specials=specials)
  m = config.model
  perm = hf_tokenizer.permutation(m.vocab_size, specials)
  tensors = _Tensors(files)
  entries = families.entries(family, m, perm)
  wanted = {n for e in entries for n in e.names}
  missing = sorted(wanted - set(tensors.where))
  if missing:
    raise UserError(f'the checkpoint lacks {len(missing)} tensors its config needs, e.g. '
                    f'{", ".join(missing[:3])}')
  unused = sorted(n for n in tensors.where
                  if n not in wanted and not families.ignorable(n, family, m))
  if unused:
    raise UserError(f'the checkpoint holds {len(unused)} tensors this mapping does not use, '
                    f'e.g. {", ".join(unused[:3])}; its config and weights disagree')

  mesh_config = mesh_config or config.mesh
  mesh = sharding.make_mesh(mesh_config)
  model = Transformer(ModelConfig.from_config(m))
  dummy = np.ones((1, 8), np.int32)
  rng = jax.random.key_data(jax.random.key(0))
  abstract, shardings = abstract_sharded(
      init_params=lambda r: model.init(r, dummy, segment_ids=dummy, positions=dummy)['params'],
      tx=optax.identity(), rng=rng, mesh=mesh, mesh_config=mesh_config)
  flat_abstract = _flat(abstract.params)
  flat_shardings = _flat(shardings.params)
  params = {}
  for e in entries:
    arrays = e.to_ours([tensors.read(n) for n in e.names])
    for path, array in zip(e.ours, arrays):
      want = flat_abstract[path]
      if tuple(array.shape) != tuple(want.shape):
        raise UserError(f'tensor {e.names[0]} has shape {tensors.shape(e.names[0])}, which '
                        f'does not fit {"/".join(path)} of shape {want.shape} under config.json')
      host = np.ascontiguousarray(array).astype(want.dtype)
      params[path] = jax.make_array_from_callback(host.shape, flat_shardings[path],
                                                  lambda index, host=host: host[index])
  left = sorted('/'.join(p) for p in set(flat_abstract) - set(params))
  if left:
    raise UserError(f'no tensor of the checkpoint fills {", ".join(left[:3])}')
  state = TrainState(step=jnp.zeros((), jnp.int32), params=_unflat(params),
                     opt_state=optax.EmptyState(), rng=rng)
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1)
  try:
    ckpt.save(0, state=state, data_state={})
  finally:
    ckpt.close()
  if hf_tokenizer.has_tokenizer(folder):
    os.makedirs(os.path.join(workdir, hf_tokenizer.FOLDER), exist_ok=True)
    for name in hf_tokenizer.FILES:
      if os.path.isfile(os.path.join(folder, name)):
        shutil.copyfile(os.path.join(folder, name),
                        os.path.join(workdir, hf_tokenizer.FOLDER, name))
  config_lib.write_or_check(config, workdir)
  return {'family': family, 'tensors': len(tensors.where),
          'params': int(sum(np.prod(a.shape) for a in flat_abstract.values()))}


def _clear_interrupted(workdir: str) -> None:
  """An import writes config.json last: a folder holding only what an interrupted import
  writes (checkpoints/, tokenizer/) is its leftover and is cleared; anything else in it is
  the user's and is refused."""
  if not os.path.isdir(workdir):
    if os.path.exists(workdir):
      raise UserError(f'--workdir {workdir} is a file')
    return
  entries = set(os.listdir(workdir))
  if 'config.json' in entries:
    raise UserError(f'--workdir {workdir} already holds a run; the import writes a fresh one')
  if entries - {'checkpoints', hf_tokenizer.FOLDER}:
    raise UserError(f'--workdir {workdir} is not empty ({", ".join(sorted(entries)[:3])}); '
                    'the import writes a fresh run')
  for name in entries:
    shutil.rmtree(os.path.join(workdir, name))


def _flat(tree) -> dict:
  """{path tuple: leaf} of a nested dict of params."""
  out = {}

  def walk(node, prefix):
    if hasattr(node, 'items'):
      for k, v in node.items():
        walk(v, prefix + (k,))
    else:
      out[prefix] = node
  walk(tree, ())
  return out


def _unflat(flat: dict) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out
