"""Tasks written as text, in the token ids of the run's sentencepiece model
(rlhf_jax/data/tokenizer.py), for the GRPO stage and its warm start.

- arithmetic_text: generated problems 'What is 37 + 48?' (task.num_terms operands drawn
  from [task.min_operand, task.max_operand], operators from task.ops, evaluated left to
  right and bracketed so: 'What is (37 + 48) * 2?'). Solved trace: one worked step per
  operator, then the marker and the answer: '37 + 48 = 85, 85 * 2 = 170 #### 170'.
- jsonl: a local file (task.path) of {"prompt": str, "answer": str | int} records, one a
  line (a user's own GSM8K-style set). Prompt: BOS + the prompt's tokens, at most
  task.prompt_len in all. Solved trace: no reasoning, the marker and the reference answer.
  make_prompts samples records (without replacement while there are enough).

A response states its final answer as `... MARKER ANSWER EOS`, MARKER being the ids of
task.marker encoded on its own (GSM8K's '####' by default); base.py's rule reads it
(the last marker before EOS; no EOS, nothing or more than answer_width tokens after it,
or a special token there: no answer). A marker the model spells with other pieces is not
the marker: the warm start teaches the one spelling. task.match grades it:
- exact: the answer's ids equal the reference's (encode(answer)); partial credit
  (task.partial_credit) as base.grade gives it, for the share of positions right.
- numeric: the text the answer's ids spell is one number equal to the reference's:
  optional spaces, an optional '-', digits (',' allowed between digits), optionally '.'
  and digits, optional spaces. '85', '085', '85.', '85.00' and ' 0,085' are all 85; '-0' is
  0; '85 dollars', '8 5', '+85', '1e2' and '.5' are no numbers. Parsed jittably: each id's
  characters come from a [V, L] table built from the tokenizer's pieces at make_task,
  then a finite automaton; values compare digit by digit, exact at any length. Partial
  credit here rewards a well-formed wrong number (a format reward).

Arithmetic text is encoded a word (split on ' ') at a time and the ids concatenated.
Sentencepiece pieces never span a space, so these are the ids of the whole text; and a
word of c ASCII characters takes at most c + 1 pieces (its leading U+2581 and one piece
per character at worst, byte fallback included), which bounds P, A and response_len
before any problem is drawn.
"""
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.sampling import left_pad
from rlhf_jax.tasks import base
from rlhf_jax.world.language import BOS_ID, EOS_ID, PAD_ID

MATCHES = ('exact', 'numeric')
OPS = '+-*'
_UNK_ID = 3  # data/tokenizer.py's; no answer holds it
# With task.answer_width = 0 a numeric answer may take this many tokens more than the
# longest reference: room for a sign, leading zeros or a '.0' the reference lacks.
_NUMERIC_SLACK = 4
# Stands in for a whole multi-token marker in base.extract_after_marker; never an id.
_MARKER_STANDIN = -1

# Character classes of the number automaton. 0: no character (PAD, a piece's unused
# slots); digit d is 1 + d.
_NONE, _MINUS, _DOT, _COMMA, _SPACE, _OTHER = 0, 11, 12, 13, 14, 15
_NUM_CLASSES = 16
_START, _SIGN, _INT, _COMMA_SEEN, _POINT, _FRAC, _TRAIL, _BAD = range(8)
_ACCEPTING = (_INT, _POINT, _FRAC, _TRAIL)
_SPACES = ' \t\n\r\u2581'
_BYTE_PIECE = re.compile(r'<0x([0-9A-F]{2})>')


def _automaton() -> np.ndarray:
  """[state, class] -> next state of the grammar in the module docstring."""
  step = np.full((8, _NUM_CLASSES), _BAD, np.int32)
  step[:, _NONE] = np.arange(8)
  step[[_START, _SIGN, _INT, _COMMA_SEEN], 1:11] = _INT
  step[[_POINT, _FRAC], 1:11] = _FRAC
  step[_START, _MINUS] = _SIGN
  step[_INT, _DOT] = _POINT
  step[_INT, _COMMA] = _COMMA_SEEN
  step[_START, _SPACE] = _START
  step[[_INT, _POINT, _FRAC, _TRAIL], _SPACE] = _TRAIL
  return step


def _char_class(c: str) -> int:
  if '0' <= c <= '9':
    return 1 + ord(c) - ord('0')
  if c in _SPACES:
    return _SPACE
  return {'-': _MINUS, '.': _DOT, ',': _COMMA}.get(c, _OTHER)


def char_table(pieces: list[str]) -> np.ndarray:
  """[V + 1, L] int8: the character classes each id spells, _NONE-padded. PAD spells
  nothing; the other specials, bytes of non-ASCII characters and row V (any id of the
  model's vocabulary past the tokenizer's) spell one _OTHER."""
  spelled = []
  for i, piece in enumerate(pieces):
    byte = _BYTE_PIECE.fullmatch(piece)
    if i == PAD_ID:
      spelled.append([])
    elif i <= _UNK_ID:
      spelled.append([_OTHER])
    elif byte:
      value = int(byte.group(1), 16)
      spelled.append([_char_class(chr(value)) if value < 128 else _OTHER])
    else:
      spelled.append([_char_class(c) for c in piece])
  spelled.append([_OTHER])
  table = np.zeros((len(spelled), max(map(len, spelled))), np.int8)
  for i, classes in enumerate(spelled):
    table[i, :len(classes)] = classes
  return table


class Number(NamedTuple):
  """What parse_numbers reads from each row. W = A x L characters.

  ok:       [B] bool, the row spells exactly one number.
  negative: [B] bool, and it is below 0.
  integer:  [B, W] int32 its integer digits, right-aligned, zero-filled.
  fraction: [B, W] int32 its fraction digits, left-aligned, zero-filled.
  """
  ok: jax.Array
  negative: jax.Array
  integer: jax.Array
  fraction: jax.Array


def parse_numbers(ids: jax.Array, *, chars: np.ndarray) -> Number:
  """ids [B, A] int32 (PAD: no character) -> the number each row spells. Pure jnp."""
  ids = jnp.asarray(ids, jnp.int32)
  rows = ids.shape[0]
  classes = jnp.asarray(chars)[jnp.clip(ids, 0, chars.shape[0] - 1)]
  classes = classes.reshape(rows, -1).astype(jnp.int32)
  step = jnp.asarray(_automaton())

  def advance(state, c):
    state = step[state, c]
    return state, state

  final, states = jax.lax.scan(advance, jnp.full((rows,), _START, jnp.int32), classes.T)
  states = states.T
  digit = (classes >= 1) & (classes <= 10)
  in_int, in_frac = digit & (states == _INT), digit & (states == _FRAC)
  width = classes.shape[1]
  # Zero-filled from the point outwards, leading zeros of the integer part and trailing
  # zeros of the fraction vanish: '085', '85' and '85.0' give the same arrays.
  int_at = width - in_int.sum(axis=1, keepdims=True) + jnp.cumsum(in_int, axis=1) - 1
  int_at = jnp.where(in_int, int_at, width)
  frac_at = jnp.where(in_frac, jnp.cumsum(in_frac, axis=1) - 1, width)
  row_ids = jnp.arange(rows)[:, None]
  zeros = jnp.zeros((rows, width), jnp.int32)
  integer = zeros.at[row_ids, int_at].set(classes - 1, mode='drop')
  fraction = zeros.at[row_ids, frac_at].set(classes - 1, mode='drop')
  ok = jnp.asarray([s in _ACCEPTING for s in range(8)])[final]
  nonzero = (integer != 0).any(axis=1) | (fraction != 0).any(axis=1)
  negative = (classes == _MINUS).any(axis=1) & nonzero
  return Number(ok=ok, negative=negative, integer=integer, fraction=fraction)


# One compiled program for the whole check (op by op, the scan alone takes seconds).
_numbers_ok = jax.jit(lambda ids, chars: parse_numbers(ids, chars=chars).ok)


def same_number(x: Number, y: Number) -> jax.Array:
  """[B] bool: both rows are numbers, and equal."""
  return (x.ok & y.ok & (x.negative == y.negative) & jnp.all(x.integer == y.integer, axis=1)
          & jnp.all(x.fraction == y.fraction, axis=1))


@dataclasses.dataclass(frozen=True)
class TextTask(base.Task):
  """What the text tasks share: the marker, the answer rule and the two checkers.

  marker_ids:     the ids of task.marker encoded on its own.
  match:          'exact' | 'numeric' (module docstring).
  partial_credit: reward for a wrong stated answer, as the match gives it (0: off).
  text_vocab:     the tokenizer's pieces; ids from there up to the model's vocab_size
                  spell no text, so no answer holds them.
  digest:         a hash of the tokenizer's pieces (and of a JSONL task's records): it
                  stands in for the fields below in equality and hashing.
  tokenizer:      the Tokenizer (for solutions).
  chars:          char_table of the tokenizer's pieces.
  """
  marker_ids: tuple[int, ...]
  match: str
  partial_credit: float
  text_vocab: int
  digest: str
  tokenizer: Any = dataclasses.field(compare=False, repr=False)
  chars: np.ndarray = dataclasses.field(compare=False, repr=False)

  def _is_text(self, tokens):
    return (tokens > _UNK_ID) & (tokens < self.text_vocab)

  def extract(self, responses, mask):
    responses = jnp.asarray(responses, jnp.int32)
    width = len(self.marker_ids)
    # Where the marker's ids end, its last token stands in for base.py's one-token marker;
    # the answer lies after the last such end, so it never holds a stand-in.
    ends = jnp.ones(responses.shape, bool)
    for i, token in enumerate(self.marker_ids):
      back = width - 1 - i
      earlier = jnp.pad(responses, ((0, 0), (back, 0)), constant_values=PAD_ID)
      ends &= earlier[:, :responses.shape[1]] == token
    return base.extract_after_marker(
        jnp.where(ends, _MARKER_STANDIN, responses), mask, marker_id=_MARKER_STANDIN,
        answer_width=self.answer_width, is_answer_token=self._is_text)

  def verify(self, answers, answer_lengths, responses, mask):
    stated, found = self.extract(responses, mask)
    if self.match == 'exact':
      return base.grade(stated, found, answers, answer_lengths,
                        partial_credit=self.partial_credit)
    answers = jnp.asarray(answers, jnp.int32)
    inside = jnp.arange(answers.shape[1])[None, :] < jnp.asarray(answer_lengths)[:, None]
    # One parse of both halves: a single scan to compile and run.
    both = parse_numbers(jnp.concatenate([stated, jnp.where(inside, answers, PAD_ID)]),
                         chars=self.chars)
    got, reference = (jax.tree.map(lambda x, h=h: jnp.split(x, 2)[h], both) for h in (0, 1))
    right = found & same_number(got, reference)
    number = found & got.ok
    return jnp.where(right, 1.0,
                     jnp.where(number, self.partial_credit, 0.0)).astype(jnp.float32)

  def _solved(self, traces: list[list[int]], answers: np.ndarray, answer_lengths: np.ndarray,
              response_len: int) -> tuple[np.ndarray, np.ndarray]:
    """trace ids + marker + reference answer + EOS, PAD after; mask 1 up to EOS."""
    if response_len < self.response_len:
      raise UserError(f'task {self.name}: a solved trace needs up to {self.response_len} '
                      f'tokens, more than response_len={response_len}')
    response = np.full((len(traces), response_len), PAD_ID, np.int32)
    mask = np.zeros((len(traces), response_len), np.float32)
    for row, trace in enumerate(traces):
      ids = (list(trace) + list(self.marker_ids) +
             list(answers[row, :answer_lengths[row]]) + [EOS_ID])
      response[row, :len(ids)] = ids
      mask[row, :len(ids)] = 1.0
    return response, mask


def _answer_rows(answers: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((len(answers), width), PAD_ID, np.int32)
  for row, ids in enumerate(answers):
    out[row, :len(ids)] = ids
  return out, np.array([len(a) for a in answers], np.int32)


def _digest(tokenizer, *arrays) -> str:
  h = hashlib.sha256('\0'.join(tokenizer.pieces()).encode())
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# -- config checks --------------------------------------------------------------------


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _int_field(task_config, field: str, lo: int, why: str) -> int:
  value = task_config[field]
  if not _is_int(value) or value < lo:
    raise UserError(f'task.{field}={value!r} must be an integer >= {lo} for task '
                    f'{task_config.name!r}: {why}')
  return int(value)


def check_config(task_config) -> None:
  """The text tasks' checks that need no tokenizer (config.validate runs them)."""
  name = task_config.name
  if task_config.match not in MATCHES:
    raise UserError(f'task.match={task_config.match!r} is not one of {MATCHES}')
  marker = task_config.marker
  if not isinstance(marker, str) or not marker.strip() or marker != marker.strip():
    raise UserError(f'task.marker={marker!r} must be a non-empty string without spaces at '
                    'either end')
  credit = task_config.partial_credit
  if (not isinstance(credit, (int, float, np.integer, np.floating))
      or isinstance(credit, bool) or not 0 <= credit <= 1):
    raise UserError(f'task.partial_credit={credit!r} must be a number in [0, 1] (0: off)')
  _int_field(task_config, 'answer_width', 0, '0 sizes it from the answers')
  if name == 'arithmetic_text':
    _int_field(task_config, 'num_terms', 2, 'a problem has at least one operator')
    low = _int_field(task_config, 'min_operand', 0, 'operands are written without a sign')
    _int_field(task_config, 'max_operand', low, 'the range must not be empty')
    ops = task_config.ops
    if (not isinstance(ops, str) or not ops or set(ops) - set(OPS)
        or len(set(ops)) != len(ops)):
      raise UserError(f'task.ops={ops!r} must be distinct characters out of {OPS!r}')
  elif name == 'jsonl':
    _int_field(task_config, 'prompt_len', 2, 'a prompt is BOS and at least one token')
    path = task_config.path
    if not path:
      raise UserError("task.path is empty: task 'jsonl' reads its problems from a local "
                      'JSONL file of {"prompt", "answer"} records')
    if not os.path.isfile(path):
      raise UserError(f'task.path={path!r}: no such file')


def _check_tokenizer(task_config, *, vocab_size: int, tokenizer):
  if tokenizer is None:
    raise UserError(f'task {task_config.name!r} is text and needs a sentencepiece '
                    'tokenizer, and none was given: start from a run on data.source='
                    'text:PATH (it keeps tokenizer.model in its workdir)')
  if tokenizer.vocab_size > vocab_size:
    raise UserError(f'task {task_config.name!r}: the tokenizer has {tokenizer.vocab_size} '
                    f'pieces, more than the model vocab_size={vocab_size}')
  return tokenizer


def _answer_width(task_config, *, longest: int, where: str) -> int:
  """task.answer_width, or from the longest reference answer (of `where`) when it is 0."""
  asked = int(task_config.answer_width)
  if not asked:
    return longest + (_NUMERIC_SLACK if task_config.match == 'numeric' else 0)
  if asked < longest:
    raise UserError(f'task.answer_width={asked} is smaller than the answer of {where}: '
                    f'{longest} tokens')
  return asked


def _shared_fields(task_config, tokenizer) -> dict:
  return dict(marker_ids=tuple(tokenizer.encode(task_config.marker)),
              match=task_config.match, partial_credit=float(task_config.partial_credit),
              text_vocab=tokenizer.vocab_size, tokenizer=tokenizer,
              chars=char_table(tokenizer.pieces()))


# -- arithmetic_text ------------------------------------------------------------------


def _apply(acc: int, op: str, x: int) -> int:
  return acc + x if op == '+' else acc - x if op == '-' else acc * x


def _expression_words(operands: list[int], ops: list[str]) -> list[str]:
  """'(37 + 48) * 2?' as words: each step bracketed before the next applies."""
  n = len(operands)
  words = ['(' * (n - 2) + str(operands[0])]
  for i, (op, x) in enumerate(zip(ops, operands[1:]), start=1):
    words += [op, str(x) + (')' if i < n - 1 else '?')]
  return words


def _prompt_words(operands, ops) -> list[str]:
  return ['What', 'is'] + _expression_words(operands, ops)


def _trace_words(operands, ops) -> tuple[list[str], int]:
  """'37 + 48 = 85, 85 * 2 = 170' as words, and the answer."""
  acc, words = operands[0], []
  for i, (op, x) in enumerate(zip(ops, operands[1:])):
    new = _apply(acc, op, x)
    words += [str(acc), op, str(x), '=', str(new) + (',' if i < len(ops) - 1 else '')]
    acc = new
  return words, acc


def _encode_words(tokenizer, texts: list[list[str]]) -> list[list[int]]:
  ids = tokenizer.encode_batch([w for words in texts for w in words])
  out, at = [], 0
  for words in texts:
    out.append([t for word in ids[at:at + len(words)] for t in word])
    at += len(words)
  return out


def _value_ranges(num_terms: int, low: int, high: int, ops: str) -> list[tuple[int, int]]:
  """[(lo, hi)] bounding the running value after 0, 1, .. operators, over every problem."""
  ranges = [(low, high)]
  for _ in range(num_terms - 1):
    a, b = ranges[-1]
    ends = []
    for op in ops:
      ends += ([a + low, b + high] if op == '+' else [a - high, b - low] if op == '-'
               else [a * low, a * high, b * low, b * high])
    ranges.append((min(ends), max(ends)))
  return ranges


def _chars(value_range: tuple[int, int]) -> int:
  """The most characters a value in the range is written with."""
  return max(len(str(v)) for v in value_range)


@dataclasses.dataclass(frozen=True)
class ArithmeticText(TextTask):
  num_terms: int
  min_operand: int
  max_operand: int
  ops: str

  @classmethod
  def from_config(cls, task_config, *, vocab_size: int, tokenizer=None):
    check_config(task_config)
    tokenizer = _check_tokenizer(task_config, vocab_size=vocab_size, tokenizer=tokenizer)
    n, ops = int(task_config.num_terms), task_config.ops
    low, high = int(task_config.min_operand), int(task_config.max_operand)
    exact = lambda word: len(tokenizer.encode(word))
    # A word of c characters holding a number: at most c + 1 tokens (module docstring).
    op_len = max(exact(op) for op in ops)
    operand = len(str(high))
    brackets = [n - 2] + [1] * (n - 2) + [1]  # '((' on the first; ')' or '?' after the rest
    prompt_len = (1 + exact('What') + exact('is') + (n - 1) * op_len +
                  sum(operand + extra + 1 for extra in brackets))
    ranges = _value_ranges(n, low, high, ops)
    trace = sum(_chars(ranges[i - 1]) + 1 + op_len + operand + 1 + exact('=') +
                _chars(ranges[i]) + (i < n - 1) + 1 for i in range(1, n))
    longest = _chars(ranges[-1]) + 1
    shared = _shared_fields(task_config, tokenizer)
    return cls(name='arithmetic_text',
               answer_width=_answer_width(task_config, longest=longest,
                                          where="task 'arithmetic_text' at its widest"),
               prompt_len=prompt_len,
               response_len=trace + len(shared['marker_ids']) + longest + 1,
               digest=_digest(tokenizer), num_terms=n, min_operand=low, max_operand=high,
               ops=ops, **shared)

  def make_prompts(self, *, key, num):
    rng = base.numpy_rng(key, salt=self.name)
    operands = rng.integers(self.min_operand, self.max_operand + 1, (num, self.num_terms))
    ops = np.asarray(list(self.ops))[rng.integers(0, len(self.ops), (num, self.num_terms - 1))]
    problems = [([int(x) for x in xs], [str(o) for o in os_]) for xs, os_ in zip(operands, ops)]
    prompts = _encode_words(self.tokenizer, [_prompt_words(*p) for p in problems])
    answers = self.tokenizer.encode_batch([str(_trace_words(*p)[1]) for p in problems])
    tokens, lengths = left_pad([[BOS_ID] + p for p in prompts], length=self.prompt_len)
    answer_ids, answer_lengths = _answer_rows(answers, self.answer_width)
    return base.TaskBatch(prompts=tokens, prompt_lengths=lengths, answers=answer_ids,
                          answer_lengths=answer_lengths)

  def solutions(self, batch, *, key, response_len):
    del key  # one worked trace per problem
    problems = [self._read_prompt(row) for row in np.asarray(batch.prompts)]
    traces = _encode_words(self.tokenizer, [_trace_words(*p)[0] for p in problems])
    return self._solved(traces, np.asarray(batch.answers), np.asarray(batch.answer_lengths),
                        response_len)

  def _read_prompt(self, row: np.ndarray) -> tuple[list[int], list[str]]:
    """A prompt make_prompts wrote -> (operands, operators)."""
    words = self.tokenizer.decode(row).split(' ')
    operands = [int(w.strip('()?')) for w in words[2::2]]
    ops = words[3::2]
    if (len(operands) != self.num_terms or set(ops) - set(self.ops)
        or _prompt_words(operands, ops) != words):
      raise ValueError(f'not an {self.name} prompt: {" ".join(words)!r}')
    return operands, ops


# -- jsonl ----------------------------------------------------------------------------


class _Record(NamedTuple):
  line: int
  prompt: str
  answer: str


def _read_records(path: str) -> list[_Record]:
  """The file's records, with the line each is on; UserError for anything malformed."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().split('\n')
  except UnicodeDecodeError as e:
    raise UserError(f'task file {path}: not UTF-8 text ({e.reason} at byte {e.start})'
                    ) from None
  except OSError as e:
    raise UserError(f'cannot read task file {path}: {e.strerror}') from None
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f'task file {path} line {number}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{where}: not valid JSON ({e.msg})') from None
    if not isinstance(record, dict):
      raise UserError(f'{where}: a record is a JSON object with "prompt" and "answer", '
                      f'not {type(record).__name__}')
    for field in ('prompt', 'answer'):
      if field not in record:
        raise UserError(f'{where}: the record has no "{field}" field')
    prompt, answer = record['prompt'], record['answer']
    if not isinstance(prompt, str) or not prompt.strip():
      raise UserError(f'{where}: "prompt" must be a non-empty string, not {prompt!r}')
    if _is_int(answer):
      answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
      raise UserError(f'{where}: "answer" must be a non-empty string or an integer, not '
                      f'{answer!r}')
    records.append(_Record(line=number, prompt=prompt, answer=answer.strip()))
  if not records:
    raise UserError(f'task file {path} holds no records')
  return records


@dataclasses.dataclass(frozen=True)
class JsonlText(TextTask):
  """records: every record of task.path as one TaskBatch, in file order."""
  path: str
  records: base.TaskBatch = dataclasses.field(compare=False, repr=False)

  @classmethod
  def from_config(cls, task_config, *, vocab_size: int, tokenizer=None):
    check_config(task_config)
    tokenizer = _check_tokenizer(task_config, vocab_size=vocab_size, tokenizer=tokenizer)
    path, width = task_config.path, int(task_config.prompt_len)
    records = _read_records(path)
    prompts = [[BOS_ID] + p for p in tokenizer.encode_batch([r.prompt for r in records])]
    answers = tokenizer.encode_batch([r.answer for r in records])
    for record, prompt in zip(records, prompts):
      if len(prompt) > width:
        raise UserError(f'task file {path} line {record.line}: the prompt is {len(prompt)} '
                        f'tokens with BOS, more than task.prompt_len={width}')
    widest = int(np.argmax([len(a) for a in answers]))
    longest = len(answers[widest])
    answer_width = _answer_width(task_config, longest=longest,
                                 where=f'task file {path} line {records[widest].line}')
    tokens, lengths = left_pad(prompts, length=width)
    answer_ids, answer_lengths = _answer_rows(answers, answer_width)
    shared = _shared_fields(task_config, tokenizer)
    if task_config.match == 'numeric':
      ok = np.asarray(_numbers_ok(answer_ids, shared['chars']))
      if not ok.all():
        bad = records[int(np.argmin(ok))]
        raise UserError(f'task file {path} line {bad.line}: answer {bad.answer!r} is not a '
                        'number, as task.match=numeric needs')
    batch = base.TaskBatch(prompts=tokens, prompt_lengths=lengths, answers=answer_ids,
                           answer_lengths=answer_lengths)
    return cls(name='jsonl', answer_width=answer_width, prompt_len=width,
               response_len=len(shared['marker_ids']) + longest + 1,
               digest=_digest(tokenizer, tokens, answer_ids), path=path, records=batch,
               **shared)

  def make_prompts(self, *, key, num):
    total = self.records.prompts.shape[0]
    rows = base.numpy_rng(key, salt=self.name).choice(total, size=num, replace=num > total)
    return jax.tree.map(lambda x: np.asarray(x)[rows], self.records)

  def solutions(self, batch, *, key, response_len):
    del key  # the reference answer, no trace
    return self._solved([[] for _ in range(batch.prompts.shape[0])],
                        np.asarray(batch.answers), np.asarray(batch.answer_lengths),
                        response_len)


# name -> build(task_config, *, vocab_size, tokenizer) -> Task (tasks/__init__.py).
BUILDERS = {
    'arithmetic_text': ArithmeticText.from_config,
    'jsonl': JsonlText.from_config,
}
