"""The real-text data source (`text:PATH`, `tfds:NAME`) the training loop reads.

Documents are split once into training and held-out sets, tokenized, and packed
into rows of `seq_len + 1` tokens. Training batches walk an endless stream made
of one seeded permutation of the training rows per epoch; the permutation of
epoch e depends only on (seed, e), so the position `(epoch, index)` is the
whole state a checkpoint needs to resume the exact same batches.
"""
from collections.abc import Mapping, Sequence
import os
from typing import Any

import numpy as np

from rlhf_jax import distributed
from rlhf_jax.data import packing
from rlhf_jax.data import text_files
from rlhf_jax.data.batch import LMBatch
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.data.tokenizer import train_or_load_tokenizer
from rlhf_jax.errors import UserError

TOKENIZER_FILE = 'tokenizer.model'
# Enough text for sentencepiece to find good pieces while keeping training to
# seconds; more text barely changes a vocabulary of a few thousand pieces.
TOKENIZER_TRAIN_CHARS = 4_000_000

# Distinct streams of randomness drawn from the one config seed.
_EVAL_SPLIT_STREAM = 0
_EPOCH_STREAM = 1


def split_train_eval(
    *, num_documents: int, eval_fraction: float, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Indices of training and held-out documents, each sorted, by seed.

  At least one document is held out and at least one is kept for training.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise UserError(f'eval_fraction must be in [0, 1), got {eval_fraction}')
  if num_documents < 2:
    raise UserError(
        f'need at least 2 documents to hold one out for evaluation, got '
        f'{num_documents}')
  num_eval = min(max(1, round(eval_fraction * num_documents)),
                 num_documents - 1)
  rng = np.random.default_rng([seed % 2**64, _EVAL_SPLIT_STREAM])
  order = rng.permutation(num_documents)
  return np.sort(order[num_eval:]), np.sort(order[:num_eval])


class CorpusSource:
  """Packed, shuffled, resumable LM batches from a list of documents.

  Attributes:
    tokenizer:  the `Tokenizer` the documents were encoded with.
    vocab_size: the tokenizer's actual number of pieces.
    world:      always None; only the synthetic-world source has one.
    train_ids, eval_ids: the tokenized documents (lists of ids, no BOS/EOS) of each
                split, for loops that need whole documents (the collapse loop).
    stats:      counts: documents, train_documents, eval_documents,
                train_tokens, eval_tokens (tokenizer ids, without BOS/EOS),
                train_rows, eval_rows, invalid_bytes_replaced, skipped_files.
  """

  def __init__(
      self,
      *,
      documents: Sequence[str],
      tokenizer: Tokenizer,
      seq_len: int,
      batch_size: int,
      seed: int,
      eval_fraction: float,
      eval_documents: Sequence[str] | None = None,
      read_stats: Mapping[str, int] | None = None,
  ):
    """Tokenizes and packs everything up front.

    Args:
      documents: all documents; a held-out share is split off by `seed`
        unless `eval_documents` is given, in which case all are for training.
      tokenizer: encodes the documents; its PAD/BOS/EOS ids are used.
      seq_len: T, the length of a model input.
      batch_size: rows per training batch.
      seed: decides the held-out split and every epoch's order.
      eval_fraction: share of `documents` held out (at least one document).
      eval_documents: explicit held-out documents, e.g. a TFDS eval split.
      read_stats: counts from reading the documents (invalid_bytes_replaced,
        skipped_files), copied into `stats`.
    """
    if seq_len < 1 or batch_size < 1:
      raise UserError(
          f'seq_len and batch_size must be positive, got {seq_len} and '
          f'{batch_size}')
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size
    self.world = None
    self._batch_size = batch_size
    self._seed = seed

    if eval_documents is None:
      train_idx, eval_idx = split_train_eval(
          num_documents=len(documents), eval_fraction=eval_fraction, seed=seed)
      train_docs = [documents[i] for i in train_idx]
      eval_docs = [documents[i] for i in eval_idx]
    else:
      train_docs, eval_docs = list(documents), list(eval_documents)
      if not train_docs or not eval_docs:
        raise UserError(
            f'need training and eval documents, got {len(train_docs)} and '
            f'{len(eval_docs)}')

    train_ids = tokenizer.encode_batch(train_docs)
    eval_ids = tokenizer.encode_batch(eval_docs)
    self.train_ids, self.eval_ids = train_ids, eval_ids
    pack_kwargs = dict(seq_len=seq_len, bos_id=tokenizer.bos_id,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    self._train_rows = packing.pack_documents(documents=train_ids, **pack_kwargs)
    self._eval_rows = packing.pack_documents(documents=eval_ids, **pack_kwargs)
    num_rows = self._train_rows.num_rows
    if num_rows < batch_size:
      raise UserError(
          f'the training text packs into {num_rows} rows of {seq_len + 1} '
          f'tokens, fewer than batch_size={batch_size}; use more text, a '
          'smaller batch or a shorter seq_len')

    read_stats = dict(read_stats or {})
    self.stats = {
        'documents': len(train_docs) + len(eval_docs),
        'train_documents': len(train_docs),
        'eval_documents': len(eval_docs),
        'train_tokens': sum(map(len, train_ids)),
        'eval_tokens': sum(map(len, eval_ids)),
        'train_rows': num_rows,
        'eval_rows': self._eval_rows.num_rows,
        'invalid_bytes_replaced': int(read_stats.pop('invalid_bytes_replaced', 0)),
        'skipped_files': int(read_stats.pop('skipped_files', 0)),
        **read_stats,
    }
    self._epoch = 0
    self._index = 0
    self._order = self._epoch_order(0)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed % 2**64, _EPOCH_STREAM, epoch])
    return rng.permutation(self._train_rows.num_rows)

  def next_batch(self) -> LMBatch:
    """The next `batch_size` rows of the stream; a batch may span two epochs."""
    picked = []
    needed = self._batch_size
    while needed:
      take = self._order[self._index:self._index + needed]
      picked.append(take)
      needed -= len(take)
      self._index += len(take)
      if self._index == len(self._order):
        self._epoch += 1
        self._index = 0
        self._order = self._epoch_order(self._epoch)
    return packing.batch_from_packed(
        rows=self._train_rows, indices=np.concatenate(picked))

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position in the stream; see `set_state`."""
    return {
        'epoch': self._epoch,
        'index': self._index,
        # Guards against resuming on data that packs differently.
        'train_rows': self._train_rows.num_rows,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues with the batches that followed when `state` was taken."""
    try:
      epoch, index = int(state['epoch']), int(state['index'])
      train_rows = int(state.get('train_rows', self._train_rows.num_rows))
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(f'bad data-source state in checkpoint: {state!r}') from e
    if train_rows != self._train_rows.num_rows:
      raise UserError(
          f'the checkpoint was written with {train_rows} training rows, but '
          f'the data now gives {self._train_rows.num_rows}; the data, '
          'tokenizer or seq_len changed since')
    if epoch < 0 or not 0 <= index < self._train_rows.num_rows:
      raise UserError(f'bad data-source state in checkpoint: {state!r}')
    self._epoch, self._index = epoch, index
    self._order = self._epoch_order(epoch)

  def eval_batches(self, *, max_batches: int) -> list[LMBatch]:
    """Held-out rows in a fixed order; the last batch is padded with zero weight."""
    num_rows = min(self._eval_rows.num_rows, max_batches * self._batch_size)
    batches = []
    for start in range(0, num_rows, self._batch_size):
      indices = np.arange(start, start + self._batch_size)
      indices[indices >= num_rows] = -1
      batches.append(
          packing.batch_from_packed(rows=self._eval_rows, indices=indices))
    return batches


def _read_documents(
    *, source: str, split: str, tfds_data_dir: str | None, text_key: str,
) -> tuple[Sequence[str], dict[str, int]]:
  kind, _, target = source.partition(':')
  if kind == 'text':
    found = text_files.read_text_documents(path=target)
    return found.documents, {
        'invalid_bytes_replaced': found.invalid_bytes_replaced,
        'skipped_files': len(found.skipped_files),
    }
  # Imported here: tensorflow_datasets takes 0.4 s to import, which every run of a stage
  # paid, a tfds: source or not.
  from rlhf_jax.data import tfds_source
  texts = tfds_source.load_tfds_texts(
      name=target, split=split, data_dir=tfds_data_dir, text_key=text_key)
  # Read once here, so the invalid-byte count covers every document once.
  documents = list(texts)
  return documents, {'invalid_bytes_replaced': texts.invalid_bytes_replaced,
                     'skipped_files': 0}


def read_report(*, source: str, stats: Mapping[str, int]) -> str:
  """The one line a run prints when it has read its text (`documents`, both splits;
  `invalid_bytes_replaced`; `skipped_files`), so damaged input is visible before training."""
  return (f'data: {stats["documents"]} documents from {source} '
          f'({stats["invalid_bytes_replaced"]} invalid UTF-8 bytes replaced, '
          f'{stats["skipped_files"]} files skipped)')


def _capped(texts: Sequence[str], max_chars: int) -> list[str]:
  out, total = [], 0
  for text in texts:
    if total >= max_chars:
      break
    out.append(text[:max_chars - total])
    total += len(out[-1])
  return out


def make_corpus_source(
    *,
    source: str,
    workdir: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    vocab_size: int,
    eval_fraction: float,
    tfds_split: str,
    tfds_eval_split: str | None,
    tfds_data_dir: str | None,
    text_key: str,
) -> CorpusSource:
  """Builds the source for `text:PATH` or `tfds:NAME`.

  The tokenizer is trained on (the first `TOKENIZER_TRAIN_CHARS` characters
  of) the training documents only and saved in `workdir`; when it is already
  there it is reused, so a resumed run tokenizes identically. With `tfds:` and
  a non-empty `tfds_eval_split`, that split is the held-out set and
  `eval_fraction` is not used. Process 0 prints `read_report`'s line.
  """
  kind = source.partition(':')[0]
  if kind not in ('text', 'tfds') or ':' not in source:
    raise UserError(
        f'unknown data source {source!r}; expected text:PATH or tfds:NAME')
  documents, read_stats = _read_documents(
      source=source, split=tfds_split, tfds_data_dir=tfds_data_dir,
      text_key=text_key)
  eval_documents = None
  if kind == 'tfds' and tfds_eval_split:
    eval_documents, eval_stats = _read_documents(
        source=source, split=tfds_eval_split, tfds_data_dir=tfds_data_dir,
        text_key=text_key)
    read_stats['invalid_bytes_replaced'] += eval_stats['invalid_bytes_replaced']
    train_documents = documents
  else:
    train_idx, _ = split_train_eval(
        num_documents=len(documents), eval_fraction=eval_fraction, seed=seed)
    train_documents = [documents[i] for i in train_idx]
  if distributed.is_primary():
    # Before the tokenizer trains: the first thing the run says is what it read.
    print(read_report(source=source, stats={
        'documents': len(documents) + len(eval_documents or ()), **read_stats}), flush=True)

  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create workdir {workdir}: {e.strerror}') from e
  tokenizer = train_or_load_tokenizer(
      texts=_capped(train_documents, TOKENIZER_TRAIN_CHARS),
      model_path=os.path.join(workdir, TOKENIZER_FILE),
      vocab_size=vocab_size,
  )
  return CorpusSource(
      documents=documents,
      tokenizer=tokenizer,
      seq_len=seq_len,
      batch_size=batch_size,
      seed=seed,
      eval_fraction=eval_fraction,
      eval_documents=eval_documents,
      read_stats=read_stats,
  )
