"""The batch that crosses from the data layer into a language-model train step."""
import flax.struct
import numpy as np


@flax.struct.dataclass
class LMBatch:
  """Next-token-prediction batch; every field is `[B, T]`.

  inputs:      int32 token ids fed to the model.
  targets:     int32 ids to predict at each position (inputs shifted left by one).
  weights:     float32, 1.0 where the target counts in the loss, 0.0 on padding.
  segment_ids: int32 document index inside a packed row, 1, 2, ...; 0 marks padding.
               Attention never crosses a segment boundary.
  positions:   int32 position of each token inside its own document (for RoPE).
  """
  inputs: np.ndarray
  targets: np.ndarray
  weights: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray


def from_rows(rows: np.ndarray, *, pad_id: int) -> LMBatch:
  """One document per row, `rows` `[B, T+1]` int, padded with `pad_id` after its end."""
  rows = np.asarray(rows)
  inputs, targets = rows[:, :-1], rows[:, 1:]
  valid = (inputs != pad_id)
  seq_len = inputs.shape[1]
  return LMBatch(
      inputs=inputs.astype(np.int32),
      targets=targets.astype(np.int32),
      weights=(targets != pad_id).astype(np.float32),
      segment_ids=valid.astype(np.int32),
      positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), inputs.shape).copy(),
  )
