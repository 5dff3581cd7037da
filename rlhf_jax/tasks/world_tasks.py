"""Tasks over the world's token ids, where a short reasoning trace helps.

Token layout for vocabulary size V (world.vocab_size; tiny V = 64): PAD=0, BOS=1, EOS=2
as in the true language; a value v is the content token 3 + v, so values run over
[0, V - 5]; the top two ids are the task's own: V-1 the answer marker, V-2 the
separator (lookup's query). The true language may emit V-1 and V-2 as ordinary tokens;
only a task's prompts and responses give them this meaning.

- sum_mod: prompt `BOS x_1 .. x_n` (x_i in [0, m)); answer (x_1 + .. + x_n) mod m.
  Solved trace: the running sums s_1 .. s_{n-1} (mod m), MARKER, s_n, EOS. Each step is
  the previous token plus the operand a fixed distance back, the same pattern throughout.
- sort: prompt `BOS x_1 .. x_n` (x_i in [0, num_values), repeats allowed); answer the n
  values in ascending order (A = n). No trace: MARKER, the sorted values, EOS. With
  task.partial_credit = c > 0, a wrong stated answer scores c x the share of positions
  right.
- lookup: prompt `BOS k_1 f(k_1) .. k_K f(k_K) SEP start h`: K distinct keys drawn from
  [0, num_symbols), f one random cycle through them (so every hop lands on a listed key
  and h < K hops never come back), pairs in random order, h in [1, max_hops] written as
  the value token 3 + h. Answer f^h(start). Solved trace: f(start) .. f^{h-1}(start),
  MARKER, f^h(start), EOS.

The verifier grades the final answer only (rlhf_jax/tasks/base.py gives the parsing
rule), so a response that skips the trace and states the right answer also scores 1.
"""
import dataclasses

import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.tasks import base
from rlhf_jax.world.language import BOS_ID, EOS_ID, PAD_ID

_FIRST_VALUE = 3
# Ids the tasks take from the top of the vocabulary, counted from V.
_MARKER_FROM_TOP, _SEP_FROM_TOP = 1, 2


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_int(task_config, field: str, lo: int, hi: int | None, why: str) -> int:
  value = task_config[field]
  if not _is_int(value) or value < lo or (hi is not None and value > hi):
    bounds = f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'
    raise UserError(f'task.{field}={value!r} must be an integer {bounds} for task '
                    f'{task_config.name!r}: {why}')
  return int(value)


def _max_values(vocab_size: int) -> int:
  """How many values fit between the three special tokens and the task's two."""
  return vocab_size - _FIRST_VALUE - 2


@dataclasses.dataclass(frozen=True)
class WorldTask(base.Task):
  """What the world tasks share: the token layout, parsing and grading.

  vocab_size:     V; the marker is V-1 and the separator V-2.
  partial_credit: reward for a wrong multi-token answer, times its share of positions
                  right (0: off).
  """
  vocab_size: int
  partial_credit: float

  @property
  def marker_id(self) -> int:
    return self.vocab_size - _MARKER_FROM_TOP

  @property
  def sep_id(self) -> int:
    return self.vocab_size - _SEP_FROM_TOP

  def _is_value(self, tokens):
    return (tokens >= _FIRST_VALUE) & (tokens < self.sep_id)

  def extract(self, responses, mask):
    return base.extract_after_marker(responses, mask, marker_id=self.marker_id,
                                     answer_width=self.answer_width,
                                     is_answer_token=self._is_value)

  def verify(self, answers, answer_lengths, responses, mask):
    predicted, found = self.extract(responses, mask)
    return base.grade(predicted, found, answers, answer_lengths,
                      partial_credit=self.partial_credit)

  def make_prompts(self, *, key, num):
    prompts, answers = self._draw(base.numpy_rng(key, salt=self.name), num)
    return base.TaskBatch(
        prompts=prompts.astype(np.int32),
        prompt_lengths=np.full((num,), self.prompt_len, np.int32),
        answers=answers.astype(np.int32),
        answer_lengths=np.full((num,), self.answer_width, np.int32))

  def solutions(self, batch, *, key, response_len):
    del key  # each of these problems has one solved trace
    if response_len < self.response_len:
      raise UserError(f'task {self.name}: a solved trace needs {self.response_len} tokens, '
                      f'more than response_len={response_len}')
    # Prompts are right-aligned, so the problem is in the last prompt_len columns.
    solved = self._solve(np.asarray(batch.prompts)[:, -self.prompt_len:])
    response = np.full((solved.shape[0], response_len), PAD_ID, np.int32)
    response[:, :solved.shape[1]] = solved
    mask = np.cumsum(response == EOS_ID, axis=1) - (response == EOS_ID) == 0
    return response, mask.astype(np.float32)

  def _draw(self, rng: np.random.Generator, num: int):
    """-> (prompts [num, P], answers [num, A]) as token ids."""
    raise NotImplementedError

  def _solve(self, prompts: np.ndarray) -> np.ndarray:
    """prompts [N, P] -> solved traces [N, <= response_len], PAD after EOS."""
    raise NotImplementedError

  @staticmethod
  def _check_partial_credit(task_config, answer_width: int) -> float:
    credit = task_config.partial_credit
    if (not isinstance(credit, (int, float, np.integer, np.floating))
        or isinstance(credit, bool) or not 0 <= credit <= 1):
      raise UserError(f'task.partial_credit={credit!r} must be a number in [0, 1] (0: off)')
    if credit and answer_width == 1:
      raise UserError(f'task.partial_credit={credit} grades the share of answer positions '
                      f'right, but task {task_config.name!r} answers with one token; '
                      'set it to 0 (or use a multi-token task such as sort)')
    return float(credit)


def _values(x: np.ndarray) -> np.ndarray:
  return x + _FIRST_VALUE


def _with_bos(body: np.ndarray) -> np.ndarray:
  return np.concatenate([np.full((body.shape[0], 1), BOS_ID, body.dtype), body], axis=1)


def _column(num: int, token: int) -> np.ndarray:
  return np.full((num, 1), token, np.int64)


@dataclasses.dataclass(frozen=True)
class SumMod(WorldTask):
  num_operands: int
  modulus: int

  @classmethod
  def from_config(cls, task_config, *, vocab_size: int, tokenizer=None):
    del tokenizer  # world tokens
    n = _check_int(task_config, 'num_operands', 2, None, 'a sum needs two operands')
    m = _check_int(task_config, 'modulus', 2, _max_values(vocab_size),
                   f'its values are tokens 3..{vocab_size - 3} of vocab_size {vocab_size}')
    return cls(name='sum_mod', answer_width=1, prompt_len=n + 1, response_len=n + 2,
               vocab_size=vocab_size,
               partial_credit=cls._check_partial_credit(task_config, 1),
               num_operands=n, modulus=m)

  def _draw(self, rng, num):
    x = rng.integers(0, self.modulus, (num, self.num_operands))
    return _with_bos(_values(x)), _values(x.sum(axis=1, keepdims=True) % self.modulus)

  def _solve(self, prompts):
    sums = np.cumsum(prompts[:, 1:] - _FIRST_VALUE, axis=1) % self.modulus
    num = prompts.shape[0]
    return np.concatenate([_values(sums[:, :-1]), _column(num, self.marker_id),
                           _values(sums[:, -1:]), _column(num, EOS_ID)], axis=1)


@dataclasses.dataclass(frozen=True)
class Sort(WorldTask):
  num_operands: int
  num_values: int

  @classmethod
  def from_config(cls, task_config, *, vocab_size: int, tokenizer=None):
    del tokenizer  # world tokens
    n = _check_int(task_config, 'num_operands', 2, None, 'sorting needs two operands')
    values = _check_int(task_config, 'num_values', 2, _max_values(vocab_size),
                        f'its values are tokens 3..{vocab_size - 3} of vocab_size '
                        f'{vocab_size}')
    return cls(name='sort', answer_width=n, prompt_len=n + 1, response_len=n + 2,
               vocab_size=vocab_size,
               partial_credit=cls._check_partial_credit(task_config, n),
               num_operands=n, num_values=values)

  def _draw(self, rng, num):
    x = rng.integers(0, self.num_values, (num, self.num_operands))
    return _with_bos(_values(x)), _values(np.sort(x, axis=1))

  def _solve(self, prompts):
    num = prompts.shape[0]
    return np.concatenate([_column(num, self.marker_id), np.sort(prompts[:, 1:], axis=1),
                           _column(num, EOS_ID)], axis=1)


@dataclasses.dataclass(frozen=True)
class Lookup(WorldTask):
  table_size: int
  num_symbols: int
  max_hops: int

  @classmethod
  def from_config(cls, task_config, *, vocab_size: int, tokenizer=None):
    del tokenizer  # world tokens
    limit = _max_values(vocab_size)
    symbols = _check_int(task_config, 'num_symbols', 2, limit,
                         f'keys are tokens 3..{vocab_size - 3} of vocab_size {vocab_size}')
    k = _check_int(task_config, 'table_size', 2, symbols,
                   f'the table lists distinct keys out of task.num_symbols={symbols}')
    # The hop count is written as a value token too.
    hops = _check_int(task_config, 'max_hops', 1, limit - 1,
                      f'the hop count is a token 3 + h of vocab_size {vocab_size}')
    return cls(name='lookup', answer_width=1, prompt_len=2 * k + 4, response_len=hops + 2,
               vocab_size=vocab_size,
               partial_credit=cls._check_partial_credit(task_config, 1),
               table_size=k, num_symbols=symbols, max_hops=hops)

  def _draw(self, rng, num):
    k, rows = self.table_size, np.arange(num)[:, None]
    # cycle[:, i] -> cycle[:, i + 1 mod K] is f; listed in the random order `order`.
    cycle = np.argsort(rng.random((num, self.num_symbols)), axis=1)[:, :k]
    order = np.argsort(rng.random((num, k)), axis=1)
    start = rng.integers(0, k, (num, 1))
    hops = rng.integers(1, self.max_hops + 1, (num, 1))
    pairs = np.stack([cycle[rows, order], cycle[rows, (order + 1) % k]], axis=2)
    prompts = np.concatenate([
        _values(pairs.reshape(num, 2 * k)), _column(num, self.sep_id),
        _values(cycle[rows, start]), _values(hops)], axis=1)
    return _with_bos(prompts), _values(cycle[rows, (start + hops) % k])

  def _solve(self, prompts):
    num, k = prompts.shape[0], self.table_size
    keys, targets = prompts[:, 1:2 * k + 1:2], prompts[:, 2:2 * k + 2:2]
    rows = np.arange(num)
    hops = prompts[:, -1] - _FIRST_VALUE
    current, chain = prompts[:, -2], []
    for _ in range(self.max_hops):
      current = targets[rows, np.argmax(keys == current[:, None], axis=1)]
      chain.append(current)
    chain = np.stack(chain, axis=1)
    out = np.full((num, self.max_hops + 2), PAD_ID, np.int64)
    for j in range(self.max_hops - 1):
      out[:, j] = np.where(j < hops - 1, chain[:, j], PAD_ID)
    out[rows, hops - 1] = self.marker_id
    out[rows, hops] = chain[rows, hops - 1]
    out[rows, hops + 1] = EOS_ID
    return out


# name -> build(task_config, *, vocab_size, tokenizer) -> Task (tasks/__init__.py).
BUILDERS = {
    'sum_mod': SumMod.from_config,
    'sort': Sort.from_config,
    'lookup': Lookup.from_config,
}
