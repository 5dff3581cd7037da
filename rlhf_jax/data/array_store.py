"""A folder of named arrays with a lineage record: one `.npy` file per array (read back
memory-mapped, so any row is a random access) and `lineage.json`. The folder is written
under a temporary name and renamed, so a killed writer never leaves a partial one."""
import json
import os
import shutil

import numpy as np

from rlhf_jax import distributed
from rlhf_jax.errors import UserError


def write(path: str, arrays: dict, *, lineage: dict) -> str:
  tmp = path + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that was killed
  os.makedirs(tmp)
  for name, value in arrays.items():
    np.save(os.path.join(tmp, f'{name}.npy'), np.asarray(value))
  with open(os.path.join(tmp, 'lineage.json'), 'w') as f:
    json.dump(lineage, f, indent=2, sort_keys=True)
  os.rename(tmp, path)
  return path


def read(path: str, names) -> tuple[dict, dict]:
  """(arrays by name, lineage); an unreadable or incomplete folder is a UserError."""
  try:
    with open(os.path.join(path, 'lineage.json')) as f:
      lineage = json.load(f)
    arrays = {n: np.load(os.path.join(path, f'{n}.npy'), mmap_mode='r') for n in names}
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e})') from None
  return arrays, lineage


def read_or_make(path: str, names, make) -> tuple[dict, dict]:
  """The folder at `path` if a finished one is there, else `make() -> (arrays, lineage)`
  written there first: a stage that is resumed reads what its first attempt made.

  In a multi-process run every process calls this alike (distributed.make_once)."""
  def make_and_write():
    arrays, lineage = make()
    if distributed.is_primary():
      os.makedirs(os.path.dirname(path), exist_ok=True)
      write(path, arrays, lineage=lineage)
  distributed.make_once(path, exists=os.path.isdir(path), make=make_and_write)
  return read(path, names)
