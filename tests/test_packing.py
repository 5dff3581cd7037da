"""Packing documents into rows: checked token by token against plain Python."""
import numpy as np
import pytest

from rlhf_jax.data import batch as batch_lib
from rlhf_jax.data import packing

PAD, BOS, EOS = 0, 1, 2


def _pack(documents, seq_len):
  return packing.pack_documents(
      documents=documents, seq_len=seq_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)


def _all_rows(rows):
  return packing.batch_from_packed(rows=rows, indices=np.arange(rows.num_rows))


def test_hand_packed_example():
  # Widths 4, 7 (two chunks: 5 + 3 overlapping by one), 3 and 2, rows of 5.
  rows = _pack([[5, 6], [7, 8, 9, 10, 11], [12], []], seq_len=4)
  np.testing.assert_array_equal(rows.tokens, [
      [1, 5, 6, 2, 0],
      [1, 7, 8, 9, 10],
      [10, 11, 2, 1, 2],  # The empty document fills this row's last 2 slots.
      [1, 12, 2, 0, 0],
  ])
  np.testing.assert_array_equal(rows.segment_ids, [
      [1, 1, 1, 1, 0],
      [1, 1, 1, 1, 1],
      [1, 1, 1, 2, 2],
      [1, 1, 1, 0, 0],
  ])
  np.testing.assert_array_equal(rows.positions, [
      [0, 1, 2, 3, 0],
      [0, 1, 2, 3, 4],
      [0, 1, 2, 0, 1],
      [0, 1, 2, 0, 0],
  ])
  batch = _all_rows(rows)
  np.testing.assert_array_equal(batch.weights, [
      [1, 1, 1, 0],
      [1, 1, 1, 1],
      [1, 1, 0, 1],
      [1, 1, 0, 0],
  ])
  np.testing.assert_array_equal(batch.targets[2], [11, 2, 1, 2])
  np.testing.assert_array_equal(batch.segment_ids[2], [1, 1, 1, 2])
  np.testing.assert_array_equal(batch.positions[2], [0, 1, 2, 0])


def _unique_documents(lengths):
  """Documents whose ids never repeat, so every token names its document."""
  documents, next_id = [], 10
  for length in lengths:
    documents.append(list(range(next_id, next_id + length)))
    next_id += length
  return documents


@pytest.mark.parametrize('seq_len', [1, 7, 16])
def test_round_trip_recovers_every_document(seq_len):
  rng = np.random.default_rng(seq_len)
  lengths = list(rng.integers(0, 3 * seq_len + 5, size=60)) + [0, 0, seq_len - 1,
                                                                seq_len, seq_len + 1]
  documents = _unique_documents(lengths)
  owner = {t: d for d, doc in enumerate(documents) for t in doc}
  rows = _pack(documents, seq_len)
  batch = _all_rows(rows)
  assert rows.tokens.dtype == np.int32 and rows.tokens.shape[1] == seq_len + 1

  # Gather each segment's weighted (input, target) pairs with plain loops.
  pieces = {d: [] for d in range(len(documents))}
  empty_segments = 0
  for r in range(rows.num_rows):
    for s in sorted(set(rows.segment_ids[r]) - {0}):
      cols = [j for j in range(seq_len) if batch.segment_ids[r, j] == s
              and batch.weights[r, j] == 1]
      inputs = [int(batch.inputs[r, j]) for j in cols]
      targets = [int(batch.targets[r, j]) for j in cols]
      named = [t for t in inputs + targets if t not in (BOS, EOS)]
      if not named:
        assert (inputs, targets) == ([BOS], [EOS])
        empty_segments += 1
        continue
      doc = owner[named[0]]
      assert all(owner[t] == doc for t in named)  # One document per segment.
      pieces[doc].append((inputs[0] != BOS, inputs[0], targets))

  assert empty_segments == sum(1 for doc in documents if not doc)
  for d, doc in enumerate(documents):
    if not doc:
      continue
    # The chunk starting with BOS comes first, the rest by their first id.
    ordered = sorted(pieces[d])
    recovered = [t for _, _, targets in ordered for t in targets]
    assert recovered == doc + [EOS]


def test_no_target_crosses_a_segment_and_positions_restart():
  rng = np.random.default_rng(0)
  documents = [list(rng.integers(3, 50, size=n)) for n in rng.integers(0, 40, 80)]
  rows = _pack(documents, seq_len=12)
  batch = _all_rows(rows)
  for r in range(rows.num_rows):
    seg, pos = rows.segment_ids[r], rows.positions[r]
    for j in range(12):
      expected = float(seg[j] != 0 and seg[j] == seg[j + 1])
      assert batch.weights[r, j] == expected
    used = int(np.sum(seg != 0))
    # Segments are contiguous from the row start and numbered 1, 2, ...
    assert np.all(seg[:used] != 0) and np.all(seg[used:] == 0)
    assert np.all(rows.tokens[r, used:] == PAD)
    assert seg[0] == 1 and np.all(np.diff(seg[:used]) >= 0)
    assert np.all(np.diff(seg[:used]) <= 1)
    for j in range(used):
      starts = j == 0 or seg[j] != seg[j - 1]
      assert pos[j] == (0 if starts else pos[j - 1] + 1)
    assert np.all(pos[used:] == 0)


def test_best_fit_packs_tightly():
  rng = np.random.default_rng(1)
  documents = [list(rng.integers(3, 50, size=n)) for n in rng.integers(5, 30, 400)]
  rows = _pack(documents, seq_len=63)
  total = sum(len(doc) + 2 for doc in documents)
  lower_bound = -(-total // 64)
  assert rows.num_rows >= lower_bound
  assert np.sum(rows.segment_ids != 0) == total
  assert rows.num_rows <= 1.05 * lower_bound
  # Filling rows strictly in order wastes about half a document per row.
  in_order_rows, fill = 0, 64
  for doc in documents:
    if len(doc) + 2 > 64 - fill:
      in_order_rows, fill = in_order_rows + 1, 0
    fill += len(doc) + 2
  assert rows.num_rows < 0.9 * in_order_rows


def test_single_document_rows_match_from_rows():
  documents = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
  rows = _pack(documents, seq_len=8)
  assert rows.num_rows == 2  # 5 + 8 tokens cannot share a row of 9.
  packed = _all_rows(rows)
  plain = batch_lib.from_rows(rows.tokens, pad_id=PAD)
  for field in ('inputs', 'targets', 'weights', 'segment_ids'):
    np.testing.assert_array_equal(getattr(packed, field), getattr(plain, field))
  real = packed.segment_ids != 0
  np.testing.assert_array_equal(packed.positions[real], plain.positions[real])


def test_padding_rows_have_zero_weight():
  rows = _pack([[5, 6, 7]], seq_len=4)
  batch = packing.batch_from_packed(rows=rows, indices=[0, -1, -1])
  assert batch.inputs.shape == (3, 4)
  np.testing.assert_array_equal(batch.weights.sum(axis=1), [4, 0, 0])
  np.testing.assert_array_equal(batch.inputs[1:], PAD)
  np.testing.assert_array_equal(batch.segment_ids[1:], 0)
  assert batch.weights.dtype == np.float32 and batch.inputs.dtype == np.int32


def test_no_documents_gives_no_rows():
  rows = _pack([], seq_len=4)
  assert rows.num_rows == 0 and rows.tokens.shape == (0, 5)
  batch = packing.batch_from_packed(rows=rows, indices=[-1])
  assert batch.weights.sum() == 0
