"""Multi-controller runs: JAX's own `jax.distributed` (one process per host, GSPMD arrays
spanning all of them), and putting host batches onto a mesh whose devices belong to
several processes.

How a run becomes multi-process (rlhf_jax/main.py flags, with environment fallbacks):
  --distributed=auto           jax.distributed.initialize() with no arguments: JAX reads the
                               cluster from the environment (TPU VM pods, SLURM, ...)
  --coordinator=HOST:PORT --num_processes=N --process_id=I
                               explicit (local tests, launch/local.sh, launch/slurm_gpu.sh);
                               RLHF_JAX_COORDINATOR, RLHF_JAX_NUM_PROCESSES, RLHF_JAX_PROCESS_ID
Neither: a single process (nothing to initialise). On CPU, cross-process collectives go
through gloo (JAX's default CPU collectives).

Every process runs the same program on the same config. The data sources produce the same
global batch in every process (it is a function of the seed and the step); each process
fills only its own devices' shards of it, and `put_global` assembles the global array from
those. Outputs the host reads back (the sampler's tokens, evaluation sums) go through
`to_host`, which gathers the rows other processes hold, so every process sees the same whole
array. Process 0 alone writes metrics,
config.json, progress and the data a stage makes for itself (`array_store.read_or_make`:
the others wait at a `barrier`, then read it); orbax checkpoints are written and restored
by all processes.
"""
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from rlhf_jax.errors import UserError

ENV = {'coordinator': 'RLHF_JAX_COORDINATOR', 'num_processes': 'RLHF_JAX_NUM_PROCESSES',
       'process_id': 'RLHF_JAX_PROCESS_ID'}


def initialize(*, mode: str = '', coordinator: str = '', num_processes: int = 0,
               process_id: int = -1, environ=os.environ) -> None:
  """Starts jax.distributed if the flags or the environment ask for several processes;
  must run before anything touches a JAX device."""
  if mode not in ('', 'auto'):
    raise UserError(f"--distributed={mode!r} is not '' or 'auto'")
  if mode == 'auto':
    jax.distributed.initialize()
    return
  coordinator = coordinator or environ.get(ENV['coordinator'], '')
  try:
    num_processes = num_processes or int(environ.get(ENV['num_processes'], '0') or 0)
    if process_id < 0:
      process_id = int(environ.get(ENV['process_id'], '-1') or -1)
  except ValueError as e:
    raise UserError(f'bad {ENV["num_processes"]} or {ENV["process_id"]} ({e})') from None
  if num_processes <= 1 and not coordinator:
    return
  if not coordinator or num_processes < 1 or not 0 <= process_id < num_processes:
    raise UserError(
        f'a multi-process run needs --coordinator=HOST:PORT, --num_processes=N >= 1 and '
        f'--process_id in [0, N); got coordinator={coordinator!r}, '
        f'num_processes={num_processes}, process_id={process_id}')
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (nothing to wait for in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'rlhf_jax: {name}')


def make_once(path: str, *, exists: bool, make) -> None:
  """Data a run makes for itself at `path`, once: `exists` is what this process saw before
  the first barrier (so no process decides after another has written), `make()` runs in
  every process when it was not there (it may compute on the global mesh) and writes only
  from process 0 (`is_primary`), and nobody goes on before that write is done."""
  barrier(f'looked for {path}')
  if not exists:
    make()
  barrier(f'made {path}')


def to_host(tree):
  """A pytree of jax Arrays -> host numpy arrays, each whole in every process: an array
  whose rows span several processes is gathered from all of them (a collective: every
  process must call this alike); others are read from this process's devices."""
  if jax.process_count() == 1:
    return jax.device_get(tree)

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def put_global(tree, sharding):
  """A pytree of host values, the same in every process (batches [B, ...], params, the
  world's tables) -> global jax Arrays under `sharding` (one Sharding for every leaf, or a
  matching pytree), each process filling only its own devices' shards from its copy. A leaf
  that is a global jax Array already is resharded only if its sharding differs."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x, s):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x if x.sharding == s else jax.device_put(x, s)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: put(x, sharding), tree)
  return jax.tree.map(put, tree, sharding)
