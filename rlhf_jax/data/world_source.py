"""Training data drawn from the ground-truth world's true language.

Batch i is sampled with key fold_in(data_key, i), so the iterator's whole position is the
index i: it is saved in checkpoints and a resumed run sees the very same batches.
"""
import functools

import jax
import numpy as np

from rlhf_jax.data.batch import LMBatch, from_rows
from rlhf_jax.world import language


class WorldSource:

  def __init__(self, *, world, seed: int, batch_size: int, seq_len: int):
    self.world = language.from_block(world)
    self.vocab_size = world.vocab_size
    self.tokenizer = None
    self.batch_size, self.seq_len = batch_size, seq_len
    root = jax.random.key(seed)
    self._train_key = jax.random.fold_in(root, 0x7121)
    # The eval stream depends on the world only, so every run on a world is scored on
    # the same fresh sequences, none of which any run trains on.
    self._eval_key = jax.random.fold_in(jax.random.key(world.seed), 0xE7A1)
    self._index = 0
    self.stats = {'entropy_rate': language.entropy_rate(self.world),
                  'expected_length': language.expected_length(self.world)}

  @functools.partial(jax.jit, static_argnums=(0,))
  def _sample(self, key):
    return language.sample(self.world, key=key, batch_size=self.batch_size,
                           seq_len=self.seq_len + 1)

  def _batch(self, key) -> LMBatch:
    return from_rows(np.asarray(self._sample(key)), pad_id=language.PAD_ID)

  def next_batch(self) -> LMBatch:
    batch = self._batch(jax.random.fold_in(self._train_key, self._index))
    self._index += 1
    return batch

  def get_state(self) -> dict:
    return {'index': self._index}

  def set_state(self, state: dict) -> None:
    self._index = int(state['index'])

  def eval_batches(self, *, max_batches: int) -> list[LMBatch]:
    return [self._batch(jax.random.fold_in(self._eval_key, i)) for i in range(max_batches)]
