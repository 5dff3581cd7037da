"""The device mesh from `config.mesh`, and shardings from logical axis names."""
import contextlib
import math

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import UserError

AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves the one allowed -1 and checks the product against the device count."""
  sizes = [int(mesh_config[a]) for a in AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise UserError('at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1')
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f'mesh sizes must be positive or -1, got {dict(zip(AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UserError(f'mesh {dict(zip(AXES, sizes))} does not divide the {num_devices} '
                      'available devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(f'mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but '
                    f'{num_devices} are available')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices).reshape(shape)  # CPU and odd topologies
  return Mesh(grid, AXES)


def rules(mesh_config) -> tuple:
  return tuple((name, tuple(axis) if isinstance(axis, list) else axis)
               for name, axis in mesh_config.rules)


def logical_shardings(logical_specs, mesh: Mesh, mesh_config):
  """Logical PartitionSpecs (a pytree) -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(mesh_config))


def batch_sharding(mesh: Mesh, mesh_config) -> NamedSharding:
  """Sharding of `[B, T]` batch arrays: B over whatever `batch` maps to."""
  spec = nn.logical_to_mesh_axes(('batch', 'length'), rules(mesh_config))
  return NamedSharding(mesh, spec)


def batch_tree_sharding(mesh: Mesh, mesh_config, batch):
  """Shardings for a pytree of batch arrays ([B], [B, T], ...): rows over the batch axes,
  the rest replicated."""
  axis = batch_sharding(mesh, mesh_config).spec[0]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, PartitionSpec(axis, *([None] * (x.ndim - 1)))), batch)


def data_parallel_size(mesh: Mesh, mesh_config) -> int:
  spec = nn.logical_to_mesh_axes(('batch',), rules(mesh_config))[0]
  axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
  return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, mesh_config):
  """The mesh and logical-axis rules in force while steps are traced and run; without
  them the model's activation constraints are no-ops."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules(mesh_config)):
    yield
