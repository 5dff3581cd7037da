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


@flax.struct.dataclass
class PairBatch:
  """Preference pairs for a reward-model or DPO step.

  prompts:        [B, P] int32 left-padded; prompt_lengths: [B] int32.
  chosen:         [B, R] int32 preferred response; rejected: [B, R] int32 the other.
  chosen_mask:    [B, R] float32, 1 on response tokens; rejected_mask: [B, R] float32.
  weight:         [B] float32, 1 on real pairs (0 pads a short final batch).
  ref_chosen:     [B] float32 sequence log-prob of chosen under the reference policy
                  (DPO; 0 for a reward model); ref_rejected: [B] float32.
  label:          [B] float32 P(chosen is preferred) by the labels' aggregate (the
                  reward model's soft Bradley-Terry target; DPO uses the orientation
                  only); None: 1, a hard label.
  kl_response:    [B, R] int32 (KTO only) the chosen response of the pair's mismatched
                  partner, scored after this pair's prompt; kl_mask: [B, R] float32;
                  ref_kl: [B] float32 its reference log-prob. None for other losses.
  """
  prompts: np.ndarray
  prompt_lengths: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray
  chosen_mask: np.ndarray
  rejected_mask: np.ndarray
  weight: np.ndarray
  ref_chosen: np.ndarray
  ref_rejected: np.ndarray
  label: np.ndarray = None
  kl_response: np.ndarray = None
  kl_mask: np.ndarray = None
  ref_kl: np.ndarray = None


def prompt_response_batch(prompts, prompt_lengths, responses, response_mask) -> LMBatch:
  """LMBatch of left-padded prompts [B, P] followed by responses [B, R], the loss on
  response tokens only (the layout of `sampling.sequence_layout`: segment 1 from each
  row's first real token, positions counting from it)."""
  prompts, responses = np.asarray(prompts), np.asarray(responses)
  p, r = prompts.shape[1], responses.shape[1]
  rows = np.concatenate([prompts, responses], axis=1).astype(np.int32)
  pad = p - np.asarray(prompt_lengths)[:, None]
  cols = np.arange(p + r)[None, :]
  segments = (cols >= pad).astype(np.int32)
  positions = np.maximum(cols - pad, 0).astype(np.int32)
  weights = np.zeros(rows.shape, np.float32)
  weights[:, p:] = response_mask  # target column t holds token t + 1 of the row
  return LMBatch(inputs=rows[:, :-1], targets=rows[:, 1:], weights=weights[:, 1:],
                 segment_ids=segments[:, :-1], positions=positions[:, :-1])


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
