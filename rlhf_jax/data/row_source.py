"""Batches of rows of a fixed table (demonstrations, preference pairs), in shuffled
epochs. Batch i is a fixed function of (seed, i), so the iterator's position is i alone:
saved in checkpoints, a resumed run sees the very same batches."""
from typing import Callable

import numpy as np

from rlhf_jax.errors import UserError


class RowSource:
  """`make_batch(rows [B] int, valid [B] bool)` builds a batch from table rows; `train`
  and `held_out` are the row numbers of each split (held_out None: the table has no
  held-out split)."""

  def __init__(self, *, train: np.ndarray, held_out: np.ndarray, batch_size: int, seed: int,
               make_batch: Callable, what: str):
    if len(train) == 0:
      raise UserError(f'{what}: no training rows')
    if held_out is not None and len(held_out) == 0:
      raise UserError(f'{what}: no held-out rows; raise the number of prompts or the '
                      'eval fraction')
    self.train = np.asarray(train)
    self.held_out = np.asarray([] if held_out is None else held_out, np.int64)
    self.batch_size, self.seed = batch_size, seed
    self.make_batch = make_batch
    self._index = 0

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self.seed, 0x5EED, epoch)).permutation(len(self.train))

  def rows_of_batch(self, index: int) -> np.ndarray:
    n = len(self.train)
    slots = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
    epochs = slots // n
    perms = {e: self._permutation(e) for e in np.unique(epochs)}
    return self.train[[perms[e][s % n] for e, s in zip(epochs, slots)]]

  def next_batch(self):
    rows = self.rows_of_batch(self._index)
    self._index += 1
    return self.make_batch(rows, np.ones(len(rows), bool))

  def get_state(self) -> dict:
    return {'index': self._index}

  def set_state(self, state: dict) -> None:
    self._index = int(state['index'])

  def eval_batches(self, *, max_batches: int | None = None) -> list:
    """The held-out rows in order, in batches of batch_size; the last one is padded
    with copies of a row marked not valid."""
    out = []
    for lo in range(0, len(self.held_out), self.batch_size):
      rows = self.held_out[lo:lo + self.batch_size]
      valid = np.ones(self.batch_size, bool)
      valid[len(rows):] = False
      rows = np.concatenate([rows, np.full(self.batch_size - len(rows), rows[0])])
      out.append(self.make_batch(rows, valid))
      if max_batches is not None and len(out) == max_batches:
        break
    return out


def split_by_prompt(prompt_ids: np.ndarray, *, eval_fraction: float, seed: int):
  """(train rows, held-out rows): a seeded eval_fraction of the prompts is held out with
  every row of theirs, so no held-out prompt is seen in training."""
  ids = np.unique(prompt_ids)
  rng = np.random.default_rng((seed, 0x5B17))
  held = rng.permutation(ids)[:max(1, int(round(eval_fraction * len(ids))))]
  is_held = np.isin(prompt_ids, held)
  return np.nonzero(~is_held)[0], np.nonzero(is_held)[0]
