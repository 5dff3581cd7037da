"""What every task with a verifier shares: the batch it hands out, the Task interface, and
the answer parsing and grading that tasks with one answer-marker token reuse.

A response states its final answer as `... MARKER a_1 .. a_k EOS`: the tokens after the
*last* marker before the first EOS, 1 <= k <= answer_width of them, all answer tokens
(the task says which). Anything else states no answer (`found` False) and scores 0:
- no marker, or nothing between the last marker and EOS;
- no EOS inside the mask: the response was cut off at the length limit, so what it would
  have said is unknown (this includes a marker as the last token, and a complete-looking
  answer in the last slots without EOS);
- more than answer_width tokens, or a non-answer token (a special token), after the
  marker: the answer is not followed by EOS, so extra tokens make it wrong;
- tokens after the first EOS (PAD, or anything a caller left there) and tokens where the
  mask is 0 are never read.
The last marker counts, as graders of \\boxed{} answers take the last box: a trace may
write the marker again (say, to restate or correct itself) and only its final answer
is graded.
"""
import dataclasses
import zlib

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.world.language import EOS_ID, PAD_ID


@flax.struct.dataclass
class TaskBatch:
  """Problems with known answers, host numpy.

  prompts:        [N, P] int32 left-padded (BOS first), as rlhf_jax.sampling.left_pad lays
                  them out.
  prompt_lengths: [N] int32 real tokens per prompt, BOS included.
  answers:        [N, A] int32 the correct answer's tokens, PAD-filled after answer_lengths.
  answer_lengths: [N] int32.
  """
  prompts: np.ndarray
  prompt_lengths: np.ndarray
  answers: np.ndarray
  answer_lengths: np.ndarray


@dataclasses.dataclass(frozen=True)
class Task:
  """A generator of problems and their verifier. Frozen and hashable, so its methods can be
  closed over by a jitted step.

  name:         the registry name (task.name in the config).
  answer_width: A, the most tokens an answer has.
  prompt_len:   P, the width of the prompts make_prompts returns.
  response_len: the fewest new tokens every full solved trace fits in (EOS included).
  """
  name: str
  answer_width: int
  prompt_len: int
  response_len: int

  def make_prompts(self, *, key: jax.Array, num: int) -> TaskBatch:
    """`num` problems, a deterministic function of `key`."""
    raise NotImplementedError

  def extract(self, responses: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """responses [B, R] int32, mask [B, R] float32 -> (answer [B, A] int32 PAD-filled,
    found [B] bool): the final answer each response states. Pure jnp, jittable."""
    raise NotImplementedError

  def verify(self, answers: jax.Array, answer_lengths: jax.Array, responses: jax.Array,
             mask: jax.Array) -> jax.Array:
    """[B] float32: 1.0 where the stated final answer is the correct one, else 0.0 (or the
    task's partial credit). Reads the final answer only. Pure jnp, jittable."""
    raise NotImplementedError

  def solutions(self, batch: TaskBatch, *, key: jax.Array,
                response_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Correct solved traces (trace, marker, answer, EOS, then PAD) for `batch`:
    (response [N, response_len] int32, mask [N, response_len] float32, 1 up to EOS)."""
    raise NotImplementedError


def numpy_rng(key: jax.Array, *, salt: str) -> np.random.Generator:
  """A host generator seeded by all of the key's bits and `salt` (the task's name, so two
  tasks given one key draw independent problems): problems are drawn in NumPy, no device
  round trip per row, still a function of the key alone."""
  bits = np.asarray(jax.random.key_data(key)).ravel().tolist()
  return np.random.default_rng(bits + [zlib.crc32(salt.encode())])


def extract_after_marker(responses: jax.Array, mask: jax.Array, *, marker_id: int,
                         answer_width: int,
                         is_answer_token) -> tuple[jax.Array, jax.Array]:
  """The module docstring's rule. is_answer_token: int32 array -> bool array.

  Returns (answer [B, A] int32, PAD-filled and all PAD where not found; found [B] bool).
  """
  responses = jnp.asarray(responses, jnp.int32)
  width = responses.shape[1]
  cols = jnp.arange(width)[None, :]
  # Only the mask's leading run counts: a token after a 0 was never emitted.
  live = jnp.cumprod(jnp.asarray(mask) > 0, axis=1).astype(bool)
  is_eos = live & (responses == EOS_ID)
  has_eos = is_eos.any(axis=1)
  eos_pos = jnp.where(has_eos, jnp.argmax(is_eos, axis=1), width)
  is_marker = live & (cols < eos_pos[:, None]) & (responses == marker_id)
  has_marker = is_marker.any(axis=1)
  start = jnp.max(jnp.where(is_marker, cols, -1), axis=1) + 1
  count = eos_pos - start
  in_answer = (cols >= start[:, None]) & (cols < eos_pos[:, None])
  well_formed = jnp.all(~in_answer | is_answer_token(responses), axis=1)
  found = has_eos & has_marker & (count >= 1) & (count <= answer_width) & well_formed
  slots = jnp.arange(answer_width)[None, :]
  picked = jnp.take_along_axis(responses, jnp.clip(start[:, None] + slots, 0, width - 1),
                               axis=1)
  answer = jnp.where(found[:, None] & (slots < count[:, None]), picked, PAD_ID)
  return answer.astype(jnp.int32), found


def grade(predicted: jax.Array, found: jax.Array, answers: jax.Array,
          answer_lengths: jax.Array, *, partial_credit: float) -> jax.Array:
  """[B] float32: 1 for an exact answer (same tokens, same length); else, when
  partial_credit > 0 and an answer was found, partial_credit x the share of the correct
  answer's positions it has right; else 0."""
  answers = jnp.asarray(answers, jnp.int32)
  same = predicted == answers
  # Both sides are PAD-filled, so equal rows also have equal lengths.
  exact = found & jnp.all(same, axis=1)
  reward = exact.astype(jnp.float32)
  if partial_credit:
    lengths = jnp.asarray(answer_lengths, jnp.int32)
    inside = jnp.arange(answers.shape[1])[None, :] < lengths[:, None]
    share = (same & inside).sum(axis=1) / jnp.maximum(lengths, 1)
    reward = jnp.where(exact, 1.0, jnp.where(found, partial_credit * share, 0.0))
  return reward.astype(jnp.float32)
