"""World tasks with verifiers against plain-Python references (lists and loops, no jnp)."""
import functools

import jax
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import sampling, tasks
from rlhf_jax.errors import UserError
from rlhf_jax.world.language import BOS_ID, EOS_ID, PAD_ID

V = 64
MARK, SEP, EOS = V - 1, V - 2, EOS_ID
NAMES = ('sum_mod', 'sort', 'lookup')


def task_config(name, **fields):
  block = config_lib.task_block()
  block.name = name
  block.update(fields)
  return block


@functools.lru_cache(maxsize=None)
def make(name, partial_credit=0.0, vocab_size=V):
  return tasks.make_task(task_config(name, partial_credit=partial_credit),
                         vocab_size=vocab_size)


def ref_extract(tokens, mask, *, width, vocab_size=V):
  """The final answer: what follows the last marker before the first EOS, inside the
  mask's leading run; 1..width value tokens, or nothing found."""
  seq = []
  for token, m in zip(tokens, mask):
    if m <= 0:
      break
    seq.append(int(token))
  if EOS_ID not in seq:
    return [], False
  seq = seq[:seq.index(EOS_ID)]
  if vocab_size - 1 not in seq:
    return [], False
  last = max(i for i, t in enumerate(seq) if t == vocab_size - 1)
  answer = seq[last + 1:]
  if not 1 <= len(answer) <= width or any(not 3 <= t < vocab_size - 2 for t in answer):
    return [], False
  return answer, True


def ref_verify(answer, tokens, mask, *, width, partial_credit=0.0):
  stated, found = ref_extract(tokens, mask, width=width)
  if not found:
    return 0.0
  if stated == answer:
    return 1.0
  right = sum(1 for i, t in enumerate(answer) if i < len(stated) and stated[i] == t)
  return partial_credit * right / len(answer)


def ref_answer(name, prompt):
  """The correct answer tokens from the prompt alone."""
  body = [int(t) for t in prompt if t != PAD_ID][1:]
  if name == 'sum_mod':
    return [3 + sum(t - 3 for t in body) % config_lib.task_block().modulus]
  if name == 'sort':
    return sorted(body)
  table = {body[i]: body[i + 1] for i in range(0, len(body) - 3, 2)}
  key, hops = body[-2], body[-1] - 3
  for _ in range(hops):
    key = table[key]
  return [key]


def ref_trace(name, prompt):
  """The solved trace's tokens before the marker."""
  body = [int(t) for t in prompt if t != PAD_ID][1:]
  if name == 'sum_mod':
    m, total, trace = config_lib.task_block().modulus, 0, []
    for t in body:
      total = (total + t - 3) % m
      trace.append(3 + total)
    return trace[:-1]
  if name == 'sort':
    return []
  table = {body[i]: body[i + 1] for i in range(0, len(body) - 3, 2)}
  key, trace = body[-2], []
  for _ in range(body[-1] - 3 - 1):
    key = table[key]
    trace.append(key)
  return trace


def fit(tokens, width, *, mask_len=None):
  """A row of `width` tokens, PAD-filled, its mask 1 on the first mask_len (default: up to
  and including the first EOS, or everything)."""
  row = (list(tokens) + [PAD_ID] * width)[:width]
  if mask_len is None:
    mask_len = row.index(EOS_ID) + 1 if EOS_ID in row else width
  return row, [1.0] * mask_len + [0.0] * (width - mask_len)


def adversarial(answer, *, width, other):
  """Named responses to a problem with answer `answer`, and the reward each must get
  (partial credit off). `other` is a wrong answer of the same length."""
  pre = [5, 9, 4]  # some trace
  cases = {
      'bare answer': (fit([MARK, *answer, EOS], width), 1.0),
      'trace then answer': (fit([*pre, MARK, *answer, EOS], width), 1.0),
      'wrong answer': (fit([MARK, *other, EOS], width), 0.0),
      'extra value token': (fit([MARK, *answer, 7, EOS], width), 0.0),
      'extra special token': (fit([MARK, *answer, SEP, EOS], width), 0.0),
      'BOS in the answer': (fit([MARK, *answer, BOS_ID, EOS], width), 0.0),
      'no marker': (fit([*pre, *answer, EOS], width), 0.0),
      'marker only': (fit([*pre, MARK, EOS], width), 0.0),
      'no EOS': (fit([MARK, *answer], width, mask_len=len(answer) + 1), 0.0),
      'marker last before the limit': (fit([5] * (width - 1) + [MARK], width), 0.0),
      'answer at the limit, no EOS': (fit([5] * (width - 1 - len(answer)) + [MARK, *answer],
                                          width), 0.0),
      'answer at the limit, EOS last': (fit([5] * (width - 2 - len(answer))
                                            + [MARK, *answer, EOS], width), 1.0),
      'wrong then right marker': (fit([MARK, *other, MARK, *answer, EOS], width), 1.0),
      'right then wrong marker': (fit([MARK, *answer, MARK, *other, EOS], width), 0.0),
      'PAD after EOS, mask on': (fit([MARK, *answer, EOS], width, mask_len=width), 1.0),
      'wrong answer after EOS': (fit([MARK, *answer, EOS, MARK, *other, EOS], width,
                                     mask_len=width), 1.0),
      'EOS outside the mask': (fit([MARK, *answer, EOS], width, mask_len=len(answer) + 1),
                               0.0),
  }
  # A hole in the mask ends the response there, whatever follows.
  row, mask = fit([MARK, *answer, EOS], width, mask_len=width)
  mask[1] = 0.0
  cases['hole in the mask'] = ((row, mask), 0.0)
  return cases


def random_responses(rng, *, num, width, answers):
  """Tokens that hit the parser's branches often: markers, EOS, values, specials, and
  answers copied in, with random mask lengths."""
  rows, masks = [], []
  pool = [MARK, EOS_ID, SEP, PAD_ID, BOS_ID, 3, 4, 5, V - 3]
  for i in range(num):
    row = []
    while len(row) < width:
      u = rng.random()
      if u < 0.15:
        row += [MARK, *answers[i], EOS]
      elif u < 0.3:
        row += [MARK, *answers[i]]
      elif u < 0.55:
        row.append(int(rng.choice(pool)))
      else:
        row.append(int(rng.integers(0, V)))
    row = row[:width]
    rows.append(row)
    # Mostly as the sampler masks (through the first EOS), else anywhere.
    sampler_like = EOS in row and rng.random() < 0.7
    ends = row.index(EOS) + 1 if sampler_like else rng.integers(0, width + 1)
    masks.append([1.0] * int(ends) + [0.0] * width)
  return np.array(rows, np.int32), np.array([m[:width] for m in masks], np.float32)


@pytest.mark.parametrize('name', NAMES)
def test_make_prompts_deterministic_and_answers_match_python(name):
  task = make(name)
  a = task.make_prompts(key=jax.random.key(7), num=64)
  b = task.make_prompts(key=jax.random.key(7), num=64)
  c = task.make_prompts(key=jax.random.key(8), num=64)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.prompts, c.prompts)
  lists = [[int(t) for t in row if t != PAD_ID] for row in a.prompts]
  tokens, lengths = sampling.left_pad(lists, length=task.prompt_len)
  np.testing.assert_array_equal(a.prompts, tokens)
  np.testing.assert_array_equal(a.prompt_lengths, lengths)
  assert a.prompts.dtype == np.int32 and a.answers.dtype == np.int32
  for i, row in enumerate(lists):
    assert row[0] == BOS_ID
    want = ref_answer(name, row)
    assert list(a.answers[i, :a.answer_lengths[i]]) == want
    assert all(t == PAD_ID for t in a.answers[i, a.answer_lengths[i]:])
    assert all(3 <= t <= SEP for t in row[1:])  # values, and lookup's separator


def test_lookup_table_is_one_cycle_over_distinct_keys():
  task = make('lookup')
  batch = task.make_prompts(key=jax.random.key(3), num=64)
  k = task.table_size
  hop_counts = set()
  for row in batch.prompts:
    body = [int(t) for t in row][1:]
    keys, targets = body[0:2 * k:2], body[1:2 * k:2]
    assert len(set(keys)) == k and sorted(keys) == sorted(targets)
    assert body[2 * k] == SEP and body[2 * k + 1] in keys
    table, key, steps = dict(zip(keys, targets)), keys[0], 0
    while True:
      key, steps = table[key], steps + 1
      if key == keys[0]:
        break
    assert steps == k
    hop_counts.add(body[-1] - 3)
  assert hop_counts == set(range(1, task.max_hops + 1))


@pytest.mark.parametrize('name', NAMES)
def test_solutions_are_right_traces_that_verify(name):
  task = make(name)
  batch = task.make_prompts(key=jax.random.key(11), num=128)
  width = task.response_len + 2
  response, mask = task.solutions(batch, key=jax.random.key(0), response_len=width)
  assert response.shape == (128, width)
  longest = 0
  for i in range(128):
    prompt = list(batch.prompts[i])
    want = ref_trace(name, prompt) + [MARK] + ref_answer(name, prompt) + [EOS_ID]
    longest = max(longest, len(want))
    assert list(response[i]) == want + [PAD_ID] * (width - len(want))
    assert list(mask[i]) == [1.0] * len(want) + [0.0] * (width - len(want))
  assert longest == task.response_len
  np.testing.assert_array_equal(
      jax.jit(task.verify)(batch.answers, batch.answer_lengths, response, mask),
      np.ones(128, np.float32))
  with pytest.raises(UserError, match='needs'):
    task.solutions(batch, key=jax.random.key(0), response_len=task.response_len - 1)


@pytest.mark.parametrize('name', NAMES)
def test_verify_and_extract_on_adversarial_cases(name):
  task = make(name)
  batch = task.make_prompts(key=jax.random.key(5), num=4)
  width = max(task.response_len + 3, 2 * task.answer_width + 4)  # room for two answers
  rows, masks, answers, expected, labels = [], [], [], [], []
  for i in range(4):
    answer = [int(t) for t in batch.answers[i, :batch.answer_lengths[i]]]
    other = [3 + (t - 3 + 1) % 10 for t in answer]
    for label, ((row, mask), reward) in adversarial(answer, width=width, other=other).items():
      rows.append(row)
      masks.append(mask)
      answers.append(i)
      expected.append(reward)
      labels.append(label)
  rows, masks = np.array(rows, np.int32), np.array(masks, np.float32)
  answers_arr, lengths = batch.answers[answers], batch.answer_lengths[answers]
  got = np.asarray(jax.jit(task.verify)(answers_arr, lengths, rows, masks))
  stated, found = map(np.asarray, jax.jit(task.extract)(rows, masks))
  for j, label in enumerate(labels):
    want = [int(t) for t in answers_arr[j, :lengths[j]]]
    assert got[j] == expected[j], label
    assert got[j] == ref_verify(want, rows[j], masks[j], width=task.answer_width), label
    ref_stated, ref_found = ref_extract(rows[j], masks[j], width=task.answer_width)
    assert bool(found[j]) == ref_found, label
    padded = ref_stated + [PAD_ID] * (task.answer_width - len(ref_stated))
    assert list(stated[j]) == padded, label


@pytest.mark.parametrize('name,partial_credit', [('sum_mod', 0.0), ('sort', 0.0),
                                                 ('sort', 0.5), ('lookup', 0.0)])
def test_verify_and_extract_on_random_responses(name, partial_credit):
  task = make(name, partial_credit)
  batch = task.make_prompts(key=jax.random.key(9), num=600)
  rng = np.random.default_rng(0)
  # Half the copied answers are right, half a neighbour problem's (mostly wrong).
  shown = [[int(t) for t in batch.answers[i if i % 2 else (i + 1) % 600,
                                          :batch.answer_lengths[i]]] for i in range(600)]
  width = task.response_len + 2
  rows, masks = random_responses(rng, num=600, width=width, answers=shown)
  got = np.asarray(jax.jit(task.verify)(batch.answers, batch.answer_lengths, rows, masks))
  stated, found = map(np.asarray, jax.jit(task.extract)(rows, masks))
  want = [ref_verify([int(t) for t in batch.answers[i, :batch.answer_lengths[i]]], rows[i],
                     masks[i], width=task.answer_width, partial_credit=partial_credit)
          for i in range(600)]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  for i in range(600):
    ref_stated, ref_found = ref_extract(rows[i], masks[i], width=task.answer_width)
    assert bool(found[i]) == ref_found
    assert list(stated[i]) == ref_stated + [PAD_ID] * (task.answer_width - len(ref_stated))
  # The mix reaches every branch: right, wrong-but-found, not found, and partial scores.
  assert (got == 1).sum() > 20 and (found & (got < 1)).sum() > 20 and (~found).sum() > 20
  if partial_credit:
    assert ((got > 0) & (got < 1)).sum() > 20


def test_sort_partial_credit_is_share_of_positions():
  task = make('sort', 0.5)
  batch = task.make_prompts(key=jax.random.key(2), num=1)
  answer = [int(t) for t in batch.answers[0]]
  n = len(answer)
  wrong_two = [SEP - 1 if i in (1, 4) else t for i, t in enumerate(answer)]  # 2 wrong
  cases = [([MARK, *wrong_two, EOS], 0.5 * (n - 2) / n),
           ([MARK, *answer[:-1], EOS], 0.5 * (n - 1) / n),   # one short: last position wrong
           ([MARK, *answer, 3, EOS], 0.0),                   # too long: no answer stated
           ([*wrong_two, EOS], 0.0)]                         # no marker
  rows = np.array([fit(c, n + 4)[0] for c, _ in cases], np.int32)
  masks = np.array([fit(c, n + 4)[1] for c, _ in cases], np.float32)
  got = jax.jit(task.verify)(np.repeat(batch.answers, 4, 0),
                             np.repeat(batch.answer_lengths, 4), rows, masks)
  np.testing.assert_allclose(got, [w for _, w in cases], rtol=1e-6)


def test_special_tokens_sit_at_the_top_of_any_vocabulary():
  task = make('lookup', vocab_size=1024)
  batch = task.make_prompts(key=jax.random.key(0), num=8)
  response, mask = task.solutions(batch, key=jax.random.key(0), response_len=8)
  assert (batch.prompts[:, 2 * task.table_size + 1] == 1022).all()
  assert all(1023 in list(r) for r in response)
  np.testing.assert_array_equal(
      jax.jit(task.verify)(batch.answers, batch.answer_lengths, response, mask), np.ones(8))


def validate_with(name, **fields):
  """The check a stage's resolve() runs once it has its init run's world."""
  tasks.validate(task_config(name, **fields), world_vocab_size=V)


@pytest.mark.parametrize('name,fields,message', [
    ('sum_mod_typo', {}, "task.name='sum_mod_typo' is not one of"),
    ('sum_mod', dict(modulus=V - 4), r'task.modulus=60 must be an integer in \[2, 59\]'),
    ('sum_mod', dict(num_operands=1), 'task.num_operands=1 must be an integer >= 2'),
    ('sum_mod', dict(partial_credit=0.5), 'answers with one token'),
    ('sort', dict(partial_credit=1.5), r'task.partial_credit=1.5 must be a number in \[0, 1\]'),
    ('sort', dict(num_values=0), 'task.num_values=0'),
    ('lookup', dict(table_size=9), r'task.table_size=9 must be an integer in \[2, 8\]'),
    ('lookup', dict(max_hops=59), r'task.max_hops=59 must be an integer in \[1, 58\]'),
    ('lookup', dict(num_symbols=V - 4), r'task.num_symbols=60 must be an integer in \[2, 59\]'),
])
def test_config_validation_names_the_field(name, fields, message):
  with pytest.raises(UserError, match=message):
    validate_with(name, **fields)


def test_config_validation_accepts_the_limits():
  validate_with('sum_mod', modulus=V - 5)
  validate_with('lookup', max_hops=V - 6, num_symbols=V - 5, table_size=V - 5)
  validate_with('sort', partial_credit=1.0, num_operands=2)
  assert set(NAMES) <= set(tasks.names())
  with pytest.raises(UserError, match="task.name='sorted' is not one of"):
    tasks.make_task(task_config('sorted'), vocab_size=V)
