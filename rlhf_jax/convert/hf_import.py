"""A local Hugging Face folder -> an ordinary run directory (`stage: 'import'`).

What is read: config.json (refused before any weight is read if its family or a field that
changes the math is not mapped, families.py), then the `*.safetensors` files, through
`model.safetensors.index.json` when the checkpoint is sharded. A pickled
`pytorch_model.bin` is never read: unpickling runs whatever code the file holds.

Each parameter is built shard by shard (jax.make_array_from_callback) on the mesh
(`--mesh.*`; by default every `embed` axis over all devices): the callback runs only for
this process's devices and reads only that shard's block of the HF tensor from the mapped
file (convert/layout.py: transposes, head splits and the vocabulary permutation are applied
to the block), cast to `model.param_dtype`. So the host holds one block at a time, and on
several processes (one per host, rlhf_jax/distributed.py) each reads only its devices'
share; what each read is recorded in import.json. All processes write the orbax checkpoint
together; process 0 alone the other files. Every tensor of the family must be present and of its
shape, and every tensor in the files must be used (or be a known buffer), so that nothing
is dropped unseen.

The run directory holds config.json (the model block, the `hf` block: family, source,
special ids), import.json (bytes in the files, bytes each process read, the largest block
each held at once) and checkpoint 0, whose state has no optimiser moments (runs.optimizer gives
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

from jax.experimental import multihost_utils

from rlhf_jax import config as config_lib
from rlhf_jax import distributed
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


_ITEMSIZE = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1,
             'U8': 1, 'BOOL': 1}


class _Tensors:
  """name -> a lazy reader of that tensor over all files (names without GPT-2's
  'transformer.' prefix). `block(name)[slices]` reads only that block from the mapped file;
  `bytes_read` counts what this process read (in the file's dtype), `largest_read` the
  largest block of one parameter shard it read (_build)."""

  def __init__(self, files: list[str]):
    from safetensors import safe_open
    self._handles, self.where = [], {}
    for path in files:
      handle = safe_open(path, framework='flax')
      self._handles.append(handle)
      for name in handle.keys():
        self.where[name.removeprefix('transformer.')] = (handle, name)
    self.bytes_read = self.largest_read = 0
    # Slices come back as jax arrays (safetensors' numpy framework has no bfloat16): made
    # on this process's own CPU device, never on another process's.
    self._cpu = jax.local_devices(backend='cpu')[0]

  def shape(self, name: str) -> tuple:
    handle, key = self.where[name]
    return tuple(handle.get_slice(key).get_shape())

  def nbytes(self, name: str) -> int:
    handle, key = self.where[name]
    view = handle.get_slice(key)
    return int(np.prod(view.get_shape())) * _ITEMSIZE.get(view.get_dtype(), 4)

  def block(self, name: str):
    tensors = self

    class Block:
      def __getitem__(self, index):
        handle, key = tensors.where[name]
        view = handle.get_slice(key)
        with jax.default_device(tensors._cpu):
          part = view[index]
          n = int(np.prod(part.shape)) * _ITEMSIZE.get(view.get_dtype(), 4)
          out = np.asarray(part.astype(jnp.float32))
        tensors.bytes_read += n
        return out
    return Block()


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


def import_mesh_block():
  """The import's default mesh: every parameter's `embed` axis over all devices (fsdp), so
  that each process reads only its devices' share of every tensor that has one."""
  block = config_lib.mesh_block()
  block.update(data=1, fsdp=-1, tensor=1)
  return block


def import_folder(folder: str, workdir: str, *, param_dtype: str = 'float32',
                  mesh_config=None) -> dict:
  """Writes the run; returns {'tensors', 'params', 'family', 'bytes_in_files', 'bytes_read',
  'largest_read'} (the last two: by process). Every process of a multi-process run calls
  it alike: each reads only the blocks of the tensors its own devices hold."""
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
  mesh_config = mesh_config or import_mesh_block()
  with config.unlocked():
    config.mesh = mesh_config
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

  mesh = sharding.make_mesh(mesh_config)
  model = Transformer(ModelConfig.from_config(m))
  dummy = np.ones((1, 8), np.int32)
  rng = jax.random.key_data(jax.random.key(0))
  abstract, shardings = abstract_sharded(
      init_params=lambda r: model.init(r, dummy, segment_ids=dummy, positions=dummy)['params'],
      tx=optax.identity(), rng=rng, mesh=mesh, mesh_config=mesh_config)
  flat_abstract = _flat(abstract.params)
  flat_shardings = _flat(shardings.params)
  _check_shapes(entries, tensors, flat_abstract)
  _check_divisible(flat_abstract, flat_shardings, mesh)
  params = {}
  for e in entries:
    blocks = [tensors.block(n) for n in e.names]
    for path, layout in zip(e.ours, e.layouts):
      params[path] = _build(layout, blocks, flat_abstract[path], flat_shardings[path],
                            tensors=tensors)
  left = sorted('/'.join(p) for p in set(flat_abstract) - set(params))
  if left:
    raise UserError(f'no tensor of the checkpoint fills {", ".join(left[:3])}')
  replicated = sharding.replicated(mesh)
  state = TrainState(step=distributed.put_global(np.zeros((), np.int32), replicated),
                     params=_unflat(params), opt_state=optax.EmptyState(),
                     rng=distributed.put_global(np.asarray(rng), replicated))
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1)
  try:
    ckpt.save(0, state=state, data_state={})  # every process writes its own shards
  finally:
    ckpt.close()
  read = np.asarray(multihost_utils.process_allgather(
      np.asarray([tensors.bytes_read, tensors.largest_read], np.int64))).reshape(-1, 2)
  figures = {'processes': jax.process_count(), 'devices': jax.device_count(),
             'mesh': dict(zip(sharding.AXES, (int(n) for n in mesh.devices.shape))),
             'bytes_in_files': int(sum(tensors.nbytes(n) for n in wanted)),
             'bytes_read': [int(b) for b in read[:, 0]],
             'largest_read': [int(b) for b in read[:, 1]]}
  if distributed.is_primary():
    if hf_tokenizer.has_tokenizer(folder):
      os.makedirs(os.path.join(workdir, hf_tokenizer.FOLDER), exist_ok=True)
      for name in hf_tokenizer.FILES:
        if os.path.isfile(os.path.join(folder, name)):
          shutil.copyfile(os.path.join(folder, name),
                          os.path.join(workdir, hf_tokenizer.FOLDER, name))
    with open(os.path.join(workdir, FIGURES), 'w') as f:
      json.dump(figures, f, indent=2)
  config_lib.write_or_check(config, workdir)  # written last, by process 0
  distributed.barrier('import written')
  return dict(figures, family=family, tensors=len(tensors.where),
              params=int(sum(np.prod(a.shape) for a in flat_abstract.values())))


# What each process read, beside config.json (an import's own record, not a config field).
FIGURES = 'import.json'


def _check_shapes(entries, tensors, flat_abstract) -> None:
  """Refuses, before any weight is read, a tensor whose shape is not the one its place in
  our tree needs."""
  for e in entries:
    for path, layout in zip(e.ours, e.layouts):
      want = tuple(flat_abstract[path].shape)
      for name in e.names:
        if layout.sources(want) != len(e.names) or tensors.shape(name) != layout.theirs(want):
          raise UserError(f'tensor {name} has shape {tensors.shape(name)}, which does not '
                          f'fit {"/".join(path)} of shape {want} under config.json')


def _check_divisible(flat_abstract, flat_shardings, mesh) -> None:
  """Refuses, before any weight is read, a mesh that cuts a parameter into unequal shards."""
  for path, want in flat_abstract.items():
    try:
      flat_shardings[path].shard_shape(want.shape)
    except ValueError:
      sizes = dict(zip(sharding.AXES, (int(n) for n in mesh.devices.shape)))
      raise UserError(f'the mesh {sizes} does not divide {"/".join(path)} of shape '
                      f'{tuple(want.shape)} ({flat_shardings[path].spec}) into equal shards; '
                      'choose --mesh.fsdp / --mesh.tensor that divide it') from None


def _build(layout, blocks, want, sharding, *, tensors):
  """One parameter, laid out on the mesh block by block: the callback runs for this
  process's devices only, and reads each distinct block once."""
  done = {}

  def block(index):
    key = tuple((s.start, s.stop) for s in index)
    if key not in done:
      before = tensors.bytes_read
      array = layout.read(blocks, index, want.shape)
      tensors.largest_read = max(tensors.largest_read, tensors.bytes_read - before)
      done[key] = np.ascontiguousarray(array).astype(want.dtype)
    return done[key]
  return jax.make_array_from_callback(want.shape, sharding, block)


def _clear_interrupted(workdir: str) -> None:
  """An import writes config.json last: a folder holding only what an interrupted import
  writes (checkpoints/, tokenizer/, import.json) is its leftover and is cleared; anything
  else in it is the user's and is refused. Every process checks, process 0 clears."""
  leftover = {'checkpoints', hf_tokenizer.FOLDER, FIGURES}
  if not os.path.isdir(workdir):
    if os.path.exists(workdir):
      raise UserError(f'--workdir {workdir} is a file')
    entries = set()
  else:
    entries = set(os.listdir(workdir))
  if 'config.json' in entries:
    raise UserError(f'--workdir {workdir} already holds a run; the import writes a fresh one')
  if entries - leftover:
    raise UserError(f'--workdir {workdir} is not empty ({", ".join(sorted(entries)[:3])}); '
                    'the import writes a fresh run')
  distributed.barrier(f'looked into {workdir}')  # nobody looks after process 0 clears
  if distributed.is_primary():
    for name in entries:
      path = os.path.join(workdir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  distributed.barrier(f'cleared {workdir}')


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
