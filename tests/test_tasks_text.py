"""The text tasks (rlhf_jax/tasks/text_tasks.py) against plain-Python references: the
answer rule on token-id lists, numbers compared as Decimals of the decoded text."""
import decimal
import functools
import json
import re

import jax
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import tasks
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

BOS, EOS = 1, 2
EXTRA_IDS = 8  # the model's vocabulary runs this far past the tokenizer's


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  rng = np.random.default_rng(0)
  lines = []
  for _ in range(300):
    a, b = (int(v) for v in rng.integers(0, 100, 2))
    lines.append(f'What is {a} + {b}? {a} + {b} = {a + b} #### {a + b}')
    lines.append(f'What is ({a} - {b}) * 3? {a} - {b} = {a - b}, {a - b} * 3 = '
                 f'{(a - b) * 3} #### {(a - b) * 3}')
  lines += ['The answer is 1,234.50 dollars, not -0.5 or 085.', 'Tom has 7 apples.']
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.model')
  return tokenizer_lib.train_or_load_tokenizer(texts=lines, model_path=path, vocab_size=320)


def task_config(**fields):
  block = config_lib.task_block()
  block.update(fields)
  return block


def make(tok, **fields):
  return tasks.make_task(task_config(**fields), vocab_size=tok.vocab_size + EXTRA_IDS,
                         tokenizer=tok)


def write_jsonl(path, records):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n'
                          for r in records))
  return str(path)


# -- plain-Python references ----------------------------------------------------------


def ref_answer(ids, mask, *, marker, width, text_vocab):
  """The stated answer's ids, or None: tasks/base.py's rule read on lists."""
  live = 0
  while live < len(ids) and mask[live] > 0:
    live += 1
  seq = [int(t) for t in ids[:live]]
  if EOS not in seq:
    return None
  body = seq[:seq.index(EOS)]
  starts = [j for j in range(len(body) - len(marker) + 1) if body[j:j + len(marker)] == marker]
  if not starts:
    return None
  answer = body[starts[-1] + len(marker):]
  if not 1 <= len(answer) <= width or any(not 3 < t < text_vocab for t in answer):
    return None
  return answer


_NUMBER = re.compile(r'[ \t\n\r]*(-?)([0-9]+(?:,[0-9]+)*)(?:\.([0-9]*))?[ \t\n\r]*')


def ref_number(text):
  m = _NUMBER.fullmatch(text)
  if not m:
    return None
  return decimal.Decimal(m.group(1) + m.group(2).replace(',', '') + '.' + (m.group(3) or '0'))


def ref_reward(tok, task, ids, mask, reference):
  stated = ref_answer(ids, mask, marker=list(task.marker_ids), width=task.answer_width,
                      text_vocab=tok.vocab_size)
  if stated is None:
    return 0.0
  if task.match == 'exact':
    if stated == reference:
      return 1.0
    right = sum(i < len(stated) and stated[i] == t for i, t in enumerate(reference))
    return task.partial_credit * right / len(reference)
  value = ref_number(tok.decode(stated))
  right = value is not None and value == ref_number(tok.decode(reference))
  return 1.0 if right else task.partial_credit if value is not None else 0.0


def rows(seqs, width):
  """Lists of ids -> (responses [B, width] PAD-filled, mask 1 on each list's ids)."""
  out = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros((len(seqs), width), np.float32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s[:width]
    mask[i, :min(len(s), width)] = 1.0
  return out, mask


@functools.lru_cache
def jitted(task):
  """(verify, extract) jitted once per task, as the stage runs them."""
  return jax.jit(task.verify), jax.jit(task.extract)


def check_against_reference(tok, task, responses, mask, reference):
  """verify and extract == the references, row by row. reference: the correct answer's
  ids, one list for all rows or one per row."""
  b = responses.shape[0]
  references = reference if isinstance(reference[0], list) else [reference] * b
  answers = np.zeros((b, task.answer_width), np.int32)
  for i, ids in enumerate(references):
    answers[i, :len(ids)] = ids
  lengths = np.array([len(ids) for ids in references], np.int32)
  verify, extract = jitted(task)
  got = np.asarray(verify(answers, lengths, responses, mask))
  stated, found = (np.asarray(x) for x in extract(responses, mask))
  for i in range(b):
    want = ref_answer(responses[i], mask[i], marker=list(task.marker_ids),
                      width=task.answer_width, text_vocab=tok.vocab_size)
    assert bool(found[i]) == (want is not None), i
    assert list(stated[i]) == (want or []) + [0] * (task.answer_width - len(want or [])), i
    assert abs(got[i] - ref_reward(tok, task, responses[i], mask[i], references[i])) < 1e-6, i
  return got


# -- arithmetic_text ------------------------------------------------------------------


def evaluate(text):
  """'What is (37 + 48) * 2?' -> its operands, operators and left-to-right value."""
  tokens = re.findall(r'\d+|[+\-*]', text.removeprefix('What is '))
  value = int(tokens[0])
  for op, x in zip(tokens[1::2], tokens[2::2]):
    value = {'+': value + int(x), '-': value - int(x), '*': value * int(x)}[op]
  return tokens[0::2], tokens[1::2], value


@pytest.mark.parametrize('fields', [dict(), dict(num_terms=3, ops='+-*', max_operand=20)])
def test_arithmetic_prompts_answers_and_solutions(tok, fields):
  task = make(tok, name='arithmetic_text', **fields)
  key = jax.random.key(3)
  batch = task.make_prompts(key=key, num=64)
  again = task.make_prompts(key=key, num=64)
  other = task.make_prompts(key=jax.random.key(4), num=64)
  for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(batch.prompts, other.prompts)
  n = 2 if not fields else 3
  response, mask = task.solutions(batch, key=key, response_len=task.response_len)
  for i in range(64):
    p, length = batch.prompts[i], batch.prompt_lengths[i]
    width = task.prompt_len
    assert p[width - length] == BOS and not p[:width - length].any()
    text = tok.decode(p)
    operands, ops, value = evaluate(text)
    expression = operands[0]
    for k, (op, x) in enumerate(zip(ops, operands[1:])):
      expression = f'{expression} {op} {x}'
      expression = f'({expression})' if k < n - 2 else expression
    assert text == f'What is {expression}?'
    # Encoding word by word gives the ids of the whole text.
    assert list(p[width - length + 1:]) == tok.encode(text)
    assert list(batch.answers[i, :batch.answer_lengths[i]]) == tok.encode(str(value))
    assert not batch.answers[i, batch.answer_lengths[i]:].any()
    steps, acc = [], int(operands[0])
    for op, x in zip(ops, operands[1:]):
      new = {'+': acc + int(x), '-': acc - int(x), '*': acc * int(x)}[op]
      steps.append(f'{acc} {op} {x} = {new}')
      acc = new
    eos = int(np.argmax(response[i] == EOS))
    assert mask[i].sum() == eos + 1 and not response[i, eos + 1:].any()
    assert tok.decode(response[i]) == f'{", ".join(steps)} #### {value}'
  np.testing.assert_array_equal(
      np.asarray(jitted(task)[0](batch.answers, batch.answer_lengths, response, mask)),
      np.ones(64))


def test_arithmetic_bounds_hold_at_the_extremes(tok):
  # The widest operands and results the ranges allow fit in P, A and response_len.
  task = make(tok, name='arithmetic_text', num_terms=3, ops='-*', min_operand=90,
              max_operand=99)
  batch = task.make_prompts(key=jax.random.key(0), num=200)
  response, mask = task.solutions(batch, key=None, response_len=task.response_len)
  assert batch.prompt_lengths.max() <= task.prompt_len
  assert batch.answer_lengths.max() <= task.answer_width
  assert mask.sum(axis=1).max() <= task.response_len
  # The widest answer (99 * 99) * 99 = 970299 has 6 characters: at most 7 tokens.
  assert task.answer_width == 7
  with pytest.raises(UserError, match='response_len=5'):
    task.solutions(batch, key=None, response_len=5)


def test_arithmetic_verifier_on_adversarial_answers(tok):
  task = make(tok, name='arithmetic_text')
  marker, enc = list(task.marker_ids), tok.encode
  right, r = enc('85'), task.response_len + 6
  cases = [
      enc('37 + 48 = 85') + marker + right + [EOS],                # correct, with the trace
      marker + right + [EOS],                                      # correct, no trace
      marker + enc('86') + [EOS],                                  # wrong
      enc('37 + 48 = 85') + right + [EOS],                         # no marker
      marker + right,                                              # cut off: no EOS
      marker + [EOS],                                              # nothing after the marker
      marker + right + enc('dollars') + [EOS],                     # extra tokens
      marker + enc('86') + marker + right + [EOS],                 # the last marker counts
      marker + right + marker + enc('86') + [EOS],
      marker + right + [EOS] + marker + enc('86') + [EOS],         # after EOS: not read
      marker + [BOS] + right + [EOS],                              # a special token
      marker + [tok.vocab_size + 1] + [EOS],                       # an id past the tokenizer
      marker + enc('8' * (task.answer_width + 1)) + [EOS],         # longer than A
      [5] * (r - len(marker) - len(right) - 1) + marker + right + [EOS],  # EOS in the last slot
      marker[:-1] + right + [EOS],                                 # half a marker
      marker + right + [EOS],                                      # (mask 0 at EOS, below)
  ]
  responses, mask = rows(cases, r)
  # A 0 in the mask ends the response there, even with EOS written after it.
  mask[-1, len(marker) + len(right)] = 0.0
  got = check_against_reference(tok, task, responses, mask, right)
  np.testing.assert_array_equal(got, [1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0])


def test_numeric_match_reads_values(tok, tmp_path):
  path = write_jsonl(tmp_path / 'p.jsonl', [{'prompt': 'Tom has 7 apples.', 'answer': '85'},
                                            {'prompt': 'x', 'answer': 1234}])
  task = make(tok, name='jsonl', path=path, match='numeric', partial_credit=0.25,
              answer_width=12)
  marker, enc = list(task.marker_ids), tok.encode
  texts = ['85', '85.0', '085', '0,085', '85.', '85.00', '-85', '85.5', '8 5', '+85', '.5',
           '85 dollars', '1e2', '86', '0085.000', '8,5', '85,', '-', '85-']
  cases = [marker + enc(t) + [EOS] for t in texts] + [marker + enc('85')]
  references = [enc('85')] * len(cases)
  for reference in ['1234', '0', '-0']:
    cases += [marker + enc(t) + [EOS] for t in ['1234', '1,234', '-0', '0']]
    references += [enc(reference)] * 4
  responses, mask = rows(cases, task.response_len + 12)
  got = check_against_reference(tok, task, responses, mask, references)
  # '8,5' is 85 by the grammar (',' between digits).
  assert [float(x) for x in got] == [1, 1, 1, 1, 1, 1, .25, .25, 0, 0, 0, 0, 0, .25, 1, 1,
                                     0, 0, 0, 0] + [1, 1, .25, .25] + [.25, .25, 1, 1] * 2


@pytest.mark.parametrize('match', ['exact', 'numeric'])
def test_verifier_on_random_responses(tok, tmp_path, match):
  path = write_jsonl(tmp_path / 'p.jsonl', [{'prompt': 'p', 'answer': '-12.50'}])
  task = make(tok, name='jsonl', path=path, match=match, partial_credit=0.5)
  rng = np.random.default_rng(1)
  junk = [[EOS], [BOS], [0], [tok.vocab_size + 2], list(task.marker_ids)] + [
      tok.encode(t) for t in ['0', '7', ' ', '.', ',', '-', 'a', '12']]
  answers = ['-12.50', '-12.5', '-012.500', '12.50', '-12', '-1 2.5', '-12.50a', '-13.50',
             '-1,2.5', '-12.05', '- 12.5']
  seqs = []
  for _ in range(300):
    parts = [junk[k] for k in rng.integers(0, len(junk), rng.integers(0, 3))]
    parts += [list(task.marker_ids)] * (rng.random() < .85)
    # Half the stated answers are the reference's spelling.
    text = answers[0] if rng.random() < .5 else answers[rng.integers(len(answers))]
    parts += [tok.encode(text) if rng.random() < .8 else junk[rng.integers(len(junk))]]
    parts += [[EOS]] * (rng.random() < .85)
    parts += [junk[k] for k in rng.integers(0, len(junk), rng.integers(0, 3))]
    seqs.append(sum(parts, []))
  responses, mask = rows(seqs, 24)
  # Some masks end early, so EOS or the marker can lie past the end.
  early = rng.random(300) < .2
  mask *= np.arange(24)[None, :] < np.where(early, rng.integers(1, 24, 300), 24)[:, None]
  got = check_against_reference(tok, task, responses, mask, tok.encode('-12.50'))
  # Every kind of outcome occurs.
  assert min(np.mean(got == 1), np.mean(got == 0), np.mean((got > 0) & (got < 1))) > 0.05


# -- jsonl ----------------------------------------------------------------------------


def test_jsonl_prompts_and_solutions(tok, tmp_path):
  records = [{'prompt': f'Tom has {i} apples and gets {i + 3}. How many?', 'answer': str(2 * i + 3)}
             for i in range(10)]
  path = write_jsonl(tmp_path / 'p.jsonl', records[:4] + [''] + records[4:])
  task = make(tok, name='jsonl', path=path, prompt_len=64)
  assert task.answer_width == max(len(tok.encode(r['answer'])) for r in records)
  batch = task.make_prompts(key=jax.random.key(5), num=6)
  again = task.make_prompts(key=jax.random.key(5), num=6)
  for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  texts = [tok.decode(p) for p in batch.prompts]
  assert len(set(texts)) == 6  # fewer asked than the file holds: no repeats
  by_prompt = {r['prompt']: r['answer'] for r in records}
  for i, text in enumerate(texts):
    width, length = 64, batch.prompt_lengths[i]
    assert batch.prompts[i, width - length] == BOS
    assert list(batch.prompts[i, width - length + 1:]) == tok.encode(text)
    assert list(batch.answers[i, :batch.answer_lengths[i]]) == tok.encode(by_prompt[text])
  response, mask = task.solutions(batch, key=None, response_len=task.response_len + 2)
  for i, text in enumerate(texts):
    assert tok.decode(response[i]) == f'#### {by_prompt[text]}'
    assert mask[i].sum() == len(task.marker_ids) + batch.answer_lengths[i] + 1
  np.testing.assert_array_equal(
      np.asarray(jitted(task)[0](batch.answers, batch.answer_lengths, response, mask)),
      np.ones(6))
  # More asked than the file holds: drawn with repeats, every record still a real one.
  many = task.make_prompts(key=jax.random.key(6), num=25)
  assert {tok.decode(p) for p in many.prompts} <= set(by_prompt)
  twin = make(tok, name='jsonl', path=path, prompt_len=64)
  assert twin == task and hash(twin) == hash(task)


@pytest.mark.parametrize('lines, fields, message', [
    (None, {}, 'no such file'),
    ([], {}, 'holds no records'),
    (['', '   '], {}, 'holds no records'),
    ([{'prompt': 'a', 'answer': '1'}, '{"prompt": "b", '], {}, r'line 2: not valid JSON'),
    (['[1, 2]'], {}, 'line 1: a record is a JSON object'),
    ([{'prompt': 'a'}], {}, 'line 1: the record has no "answer" field'),
    ([{'answer': '1'}], {}, 'line 1: the record has no "prompt" field'),
    ([{'prompt': 'a', 'answer': True}], {}, 'line 1: "answer" must be'),
    ([{'prompt': '', 'answer': '1'}], {}, 'line 1: "prompt" must be'),
    ([{'prompt': 'a', 'answer': '1'}, {'prompt': 'Tom has 7 apples. ' * 4, 'answer': '2'}],
     dict(prompt_len=12), r'line 2: the prompt is \d+ tokens with BOS, more than '
                          r'task.prompt_len=12'),
    ([{'prompt': 'a', 'answer': '1'}, {'prompt': 'b', 'answer': 'seven'}],
     dict(match='numeric'), "line 2: answer 'seven' is not a number"),
    ([{'prompt': 'a', 'answer': '12345'}], dict(answer_width=1), 'task.answer_width=1'),
])
def test_jsonl_bad_files(tok, tmp_path, lines, fields, message):
  path = tmp_path / 'bad.jsonl'
  if lines is not None:
    write_jsonl(path, lines)
  with pytest.raises(UserError, match=message) as e:
    make(tok, name='jsonl', path=str(path), **fields)
  assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_bad_text_configs(tok, tmp_path):
  for fields, message in [
      (dict(name='jsonl', path=''), 'task.path is empty'),
      (dict(name='arithmetic_text', match='fuzzy'), 'task.match'),
      (dict(name='arithmetic_text', ops='+/'), 'task.ops'),
      (dict(name='arithmetic_text', num_terms=1), 'task.num_terms'),
      (dict(name='arithmetic_text', min_operand=5, max_operand=4), 'task.max_operand'),
      (dict(name='arithmetic_text', marker=' ####'), 'task.marker')]:
    with pytest.raises(UserError, match=message):  # before any tokenizer is needed
      tasks.validate(task_config(**fields), world_vocab_size=64)
  with pytest.raises(UserError, match='needs a sentencepiece tokenizer'):
    tasks.make_task(task_config(name='arithmetic_text'), vocab_size=1024)
  with pytest.raises(UserError, match='more than the model vocab_size'):
    tasks.make_task(task_config(name='arithmetic_text'), vocab_size=100, tokenizer=tok)
