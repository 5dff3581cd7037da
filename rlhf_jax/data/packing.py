"""Packs tokenized documents into fixed-length rows for next-token training.

Each document becomes `BOS ids EOS`. A document longer than a row of `T+1`
tokens is cut into chunks of `T+1` that overlap by one token, so that across
its chunks every token after BOS is predicted exactly once; each chunk is its
own segment with positions from 0 (a model never sees positions beyond `T`).

Segments are placed best-fit, in document order: each goes into the open row
with the least free space that still holds it whole, or opens a new row. Rows
are shuffled at training time, so placement order costs nothing, and best-fit
keeps padding to a few percent where filling rows strictly in order wastes
about half a document per row.

Training pairs never cross a segment: the target at step j counts only if the
tokens at j and j+1 belong to the same segment.
"""
import bisect
from collections.abc import Iterable, Sequence
import dataclasses

import numpy as np

from rlhf_jax.data.batch import LMBatch


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """Packed rows; every array `[N, T+1]` int32.

  tokens:      token ids, `pad_id` after the last segment of a row.
  segment_ids: 1, 2, ... per segment inside the row; 0 on padding.
  positions:   position of the token inside its segment; 0 on padding.
  pad_id:      the id used for padding.
  """
  tokens: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  pad_id: int

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]


def _segments(ids: Sequence[int], *, seq_len: int, bos_id: int, eos_id: int):
  """Yields the chunks of one document, each at most `seq_len + 1` long."""
  tokens = np.concatenate([[bos_id], np.asarray(ids, np.int64), [eos_id]])
  # Chunk k starts where chunk k-1's last target was, hence stride `seq_len`.
  for start in range(0, max(len(tokens) - 1, 1), seq_len):
    yield tokens[start:start + seq_len + 1]


def pack_documents(
    *,
    documents: Iterable[Sequence[int]],
    seq_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
) -> PackedRows:
  """Packs `documents` (token ids without BOS/EOS) into rows of `seq_len + 1`."""
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  width = seq_len + 1
  tokens, segment_ids, positions = [], [], []
  num_segments = []
  # (free slots, row) of rows that can still take a segment, kept sorted so a
  # bisection finds the best fit; the smallest segment has 2 tokens.
  open_rows = []
  for ids in documents:
    for chunk in _segments(ids, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id):
      size = len(chunk)
      slot = bisect.bisect_left(open_rows, (size, -1))
      if slot < len(open_rows):
        free, row = open_rows.pop(slot)
      else:
        free, row = width, len(tokens)
        tokens.append(np.full(width, pad_id, np.int32))
        segment_ids.append(np.zeros(width, np.int32))
        positions.append(np.zeros(width, np.int32))
        num_segments.append(0)
      start = width - free
      num_segments[row] += 1
      tokens[row][start:start + size] = chunk
      segment_ids[row][start:start + size] = num_segments[row]
      positions[row][start:start + size] = np.arange(size)
      if free - size >= 2:
        bisect.insort(open_rows, (free - size, row))
  if not tokens:
    empty = np.zeros((0, width), np.int32)
    return PackedRows(tokens=empty, segment_ids=empty, positions=empty,
                      pad_id=pad_id)
  return PackedRows(
      tokens=np.stack(tokens),
      segment_ids=np.stack(segment_ids),
      positions=np.stack(positions),
      pad_id=pad_id,
  )


def batch_from_packed(*, rows: PackedRows, indices: Sequence[int]) -> LMBatch:
  """The `LMBatch` of the rows at `indices`; index -1 gives an all-padding row.

  Padding rows carry zero weight, so they can fill a short final batch without
  changing a weighted mean.
  """
  indices = np.asarray(indices, np.int64)
  is_pad = indices < 0
  safe = np.where(is_pad, 0, indices)
  if rows.num_rows:
    tokens = rows.tokens[safe]
    segment_ids = rows.segment_ids[safe]
    positions = rows.positions[safe]
  else:  # Only padding can be asked of an empty set of rows.
    shape = (len(indices), rows.tokens.shape[1])
    tokens, segment_ids, positions = (np.zeros(shape, np.int32),) * 3
  tokens = np.where(is_pad[:, None], rows.pad_id, tokens).astype(np.int32)
  segment_ids = np.where(is_pad[:, None], 0, segment_ids).astype(np.int32)
  positions = np.where(is_pad[:, None], 0, positions).astype(np.int32)

  in_segment = segment_ids[:, :-1]
  same_segment = (in_segment == segment_ids[:, 1:]) & (in_segment != 0)
  return LMBatch(
      inputs=tokens[:, :-1],
      targets=tokens[:, 1:],
      weights=same_segment.astype(np.float32),
      segment_ids=in_segment,
      positions=positions[:, :-1],
  )
