"""Data of the model-collapse loop: the real data (world samples or a text corpus's
documents), one document per row, and the training source that reads a generation's
mixture of real and synthetic row sets back.

A row is `[seq_len + 1]` int32 `BOS x1 ... EOS PAD ...` (truncated at the width, so a long
document may lack its EOS), the layout the world and the sampler produce and
`batch.from_rows` reads. Token ids PAD 0, BOS 1, EOS 2 are shared by the world and the
tokenizer.
"""
import dataclasses

import jax
import numpy as np

from rlhf_jax.data import array_store
from rlhf_jax.data.batch import LMBatch, from_rows
from rlhf_jax.errors import UserError
from rlhf_jax.world import language

PAD_ID, BOS_ID, EOS_ID = language.PAD_ID, language.BOS_ID, language.EOS_ID
# The stream of the run's seed that orders a corpus's training documents (`seeded_order`).
_SELECT_STREAM = 0xC013


@dataclasses.dataclass(frozen=True)
class RealData:
  """train:     [N, W] int32 real rows a generation may train on (the pool fresh real
                data is drawn from).
  heldout:      [H, W] int32 real rows every generation is measured on, never trained on.
  lang:         the true language (world data), or None (text).
  tokenizer:    the corpus's tokenizer (text), or None (world).
  selected_rows: how many leading rows of `train` are the real rows generation 0 (and
                accumulate's every generation) trains on; None: all of them.
  """
  train: np.ndarray
  heldout: np.ndarray
  lang: language.Language | None
  tokenizer: object | None
  selected_rows: int | None = None

  @property
  def selected(self) -> np.ndarray:
    """[selected_rows, W] the real rows trained on (the text tail is computed from them)."""
    return self.train if self.selected_rows is None else self.train[:self.selected_rows]

  @property
  def vocab_size(self) -> int:
    return self.lang.vocab_size if self.lang is not None else self.tokenizer.vocab_size


def document_rows(documents, *, width: int) -> np.ndarray:
  """[len(documents), width] int32: BOS, the document's ids, EOS, PAD...; truncated at width."""
  rows = np.full((len(documents), width), PAD_ID, np.int32)
  for i, ids in enumerate(documents):
    doc = [BOS_ID, *ids, EOS_ID][:width]
    rows[i, :len(doc)] = doc
  return rows


def world_real_data(lang: language.Language, *, world_seed: int, seed: int, train_rows: int,
                    heldout_rows: int, width: int) -> RealData:
  """Fresh true samples: the training pool from the run's seed, the held-out rows from the
  world's own seed (so every run on a world is measured on the same rows)."""
  draw = lambda key, n: np.asarray(language.sample(lang, key=key, batch_size=n, seq_len=width))
  train = draw(jax.random.fold_in(jax.random.key(seed), 0xC011), train_rows)
  heldout = draw(jax.random.fold_in(jax.random.key(world_seed), 0xC012), heldout_rows)
  return RealData(train=train, heldout=heldout, lang=lang, tokenizer=None)


def text_real_data(source, *, width: int, min_heldout: int) -> RealData:
  """The documents of a `CorpusSource` (its tokenizer, its train/held-out split), one per
  row; at least `min_heldout` held-out documents (a batch) are needed."""
  train = document_rows(source.train_ids, width=width)
  heldout = document_rows(source.eval_ids, width=width)
  if len(heldout) < min_heldout:
    raise UserError(f'the text corpus has {len(heldout)} held-out documents, fewer than one '
                    'batch; raise data.eval_fraction or use more text')
  return RealData(train=train, heldout=heldout, lang=None, tokenizer=source.tokenizer)


def seeded_order(num_rows: int, *, seed: int) -> np.ndarray:
  """[num_rows] a permutation that depends on `seed` only; its first n entries are a uniform
  random draw of n rows without replacement (a corpus's real rows, not its file prefix)."""
  return np.random.default_rng([seed % 2**64, _SELECT_STREAM]).permutation(num_rows)


@dataclasses.dataclass(frozen=True)
class Part:
  """The first `rows` rows of the row set in the array-store folder `path`."""
  path: str
  rows: int


def read_rows(parts) -> np.ndarray:
  arrays = [np.asarray(array_store.read(p.path, ['rows'])[0]['rows'][:p.rows]) for p in parts]
  return np.concatenate(arrays)


class RowSource:
  """Shuffled, resumable LM batches over a fixed set of rows (a generation's training set).

  Epoch e visits the rows in the order permutation(fold_in(seed, e)); the position is
  (epoch, index), saved in checkpoints. Eval batches are the held-out real rows.
  """

  def __init__(self, *, rows: np.ndarray, heldout: np.ndarray, lang, tokenizer,
               vocab_size: int, seed: int, batch_size: int):
    if len(rows) < batch_size:
      raise UserError(f'a generation has {len(rows)} training rows, fewer than '
                      f'train.batch_size={batch_size}; raise collapse.samples')
    self.rows, self.heldout = rows, heldout
    self.world, self.tokenizer, self.vocab_size = lang, tokenizer, vocab_size
    self.batch_size, self._seed = batch_size, seed
    self._epoch, self._index = 0, 0
    self._order = self._epoch_order(0)
    self.stats = {} if lang is None else {
        'entropy_rate': language.entropy_rate(lang),
        'expected_length': language.expected_length(lang)}

  def _epoch_order(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    return rng.permutation(len(self.rows))

  def next_batch(self) -> LMBatch:
    if self._index + self.batch_size > len(self.rows):
      self._epoch, self._index = self._epoch + 1, 0
      self._order = self._epoch_order(self._epoch)
    take = self._order[self._index:self._index + self.batch_size]
    self._index += self.batch_size
    return from_rows(self.rows[take], pad_id=PAD_ID)

  def get_state(self) -> dict:
    return {'epoch': self._epoch, 'index': self._index}

  def set_state(self, state: dict) -> None:
    self._epoch, self._index = int(state['epoch']), int(state['index'])
    self._order = self._epoch_order(self._epoch)

  def eval_batches(self, *, max_batches: int) -> list[LMBatch]:
    n = len(self.heldout) // self.batch_size  # whole batches: one compiled shape
    return [from_rows(self.heldout[i * self.batch_size:(i + 1) * self.batch_size],
                      pad_id=PAD_ID) for i in range(min(n, max_batches))]
