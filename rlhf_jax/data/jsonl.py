"""A user's own local JSONL datasets for the text path, read, checked row by row, and
tokenized with the run's sentencepiece tokenizer into the arrays the stages train on.

One JSON object a line; blank lines are skipped (they hold no row); fields other than
those below are ignored (a real set carries ids and sources). Three kinds:

  sft      {"prompt": str, "completion": str}, or {"messages": [{"role", "content"}, ...]}
           with roles system | user | assistant and at least one assistant turn.
  prefs    {"prompt": str, "chosen": str, "rejected": str}: the reward model and DPO.
  prompts  {"prompt": str}: rollouts for PPO / GRPO.

Tokens. A prompt is BOS and the prompt's tokens; a completion (or chosen, rejected) is its
tokens and EOS, all of them in the loss. `messages` are rendered by the default template
(TEMPLATE below), plain-text role markers, since our sentencepiece tokenizers bring no chat
template of their own:

  <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}</s><|user|>\n...

where </s> is the EOS id, not text. Each marker and each message's text is tokenized on
its own, so a turn's first and last token never straddle a marker. The prompt is BOS and
everything up to and including the first `<|assistant|>\n`; the response is the rest. The
loss mask is 1 on every assistant turn's tokens and its EOS, 0 on markers and on the other
roles' turns (a later user turn stays in the response as context, outside the loss).

A Hugging Face tokenizer with a chat template (HFTokenizer.chat_template) renders
`messages` by that template instead (data/chat_template.py, as transformers'
apply_chat_template): the prompt is the rendering up to the first assistant turn with the
generation prompt, tokenized, with BOS put first unless the template printed it; the
response is the rest, each piece tokenized on its own, the loss on each assistant turn's
content and the template's end-of-turn text after it, no EOS id added (the template's
end-of-turn is what the model learns to stop with). {"prompt", "completion"} rows are
tokenized as above, without the template.

Widths. The prompt (BOS included) must fit in `prompt_len` tokens and the response (EOS
included) in `response_len`; the arrays are as wide as the widest row kept.

Errors. Every row is checked before any is used, and every bad row is collected: a file
with bad rows is refused as a whole (rlhf_jax.errors.UserError) with the count and the
first few, each as `line N: what is wrong` (invalid JSON, not an object, a missing field,
a wrong type, an empty completion / chosen / rejected / assistant turn, chosen equal to
rejected, a bad role, no assistant turn, too long after tokenization). Nothing is dropped
silently: only `overlong='drop'` leaves rows out, the too-long ones, and their number and
first lines go into the report the stage records in its lineage.
"""
import dataclasses
import hashlib
import json
import os

import numpy as np

from rlhf_jax.data import chat_template
from rlhf_jax.errors import UserError

KINDS = ('sft', 'prefs', 'prompts')
ROLES = ('system', 'user', 'assistant')
OVERLONG = ('error', 'drop')
SHOWN = 3  # bad rows an error message spells out
# The fields of a row that are responses (tokens + EOS, in the loss), and what a too-long
# one is called in its error.
RESPONSE_FIELDS = {'sft': ('completion',), 'prefs': ('chosen', 'rejected'), 'prompts': ()}
LABELS = {'sft': ('the response',), 'prefs': ("'chosen'", "'rejected'"), 'prompts': ()}


def header(role: str) -> str:
  """The default template's marker that opens a `role` turn."""
  return f'<|{role}|>\n'


def parse_spec(spec: str, *, field: str):
  """The absolute path of `field`'s 'jsonl:PATH', or None for '' (no JSONL source)."""
  if not spec:
    return None
  kind, _, path = spec.partition(':')
  if kind != 'jsonl' or not path:
    raise UserError(f"{field}={spec!r} is not '' or 'jsonl:PATH'")
  return os.path.abspath(path)


@dataclasses.dataclass(frozen=True)
class Record:
  """One row: its 1-based line in the file and its checked fields."""
  line: int
  fields: dict


class _Problems:
  """The bad rows of one file, reported together."""

  def __init__(self, path: str):
    self.path, self.found = path, []

  def add(self, line: int, what: str) -> None:
    self.found.append((line, what))

  def raise_if_any(self, total: int) -> None:
    if not self.found:
      return
    if len(self.found) == 1:
      line, what = self.found[0]
      raise UserError(f'{self.path} line {line}: {what}')
    first = '; '.join(f'line {l}: {w}' for l, w in self.found[:SHOWN])
    raise UserError(f'{self.path}: {len(self.found)} bad rows (of {total}); first: {first}')


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _kind_of_json(value) -> str:
  return {dict: 'an object', list: 'an array', str: 'a string', bool: 'a boolean',
          type(None): 'null', int: 'a number', float: 'a number'}.get(type(value), 'a value')


def _string(row: dict, name: str, *, nonempty: bool):
  """The error for field `name` of `row`, or None."""
  if name not in row:
    return f'missing field {name!r}'
  if not isinstance(row[name], str):
    return f'field {name!r} is {_kind_of_json(row[name])}, not a string'
  if nonempty and not row[name].strip():
    return f'field {name!r} is empty'
  return None


def _check_messages(messages):
  if not isinstance(messages, list):
    return f"field 'messages' is {_kind_of_json(messages)}, not an array"
  if not messages:
    return "field 'messages' is empty"
  for i, m in enumerate(messages, start=1):
    if not isinstance(m, dict):
      return f'message {i} is {_kind_of_json(m)}, not an object'
    for name in ('role', 'content'):
      problem = _string(m, name, nonempty=False)
      if problem:
        return f'message {i}: {problem}'
    if m['role'] not in ROLES:
      return f'message {i}: role {m["role"]!r} is not one of {", ".join(ROLES)}'
    if m['role'] == 'assistant' and not m['content'].strip():
      return f'message {i} (assistant) is empty'
  if not any(m['role'] == 'assistant' for m in messages):
    return 'the messages have no assistant turn'
  return None


def _check_row(row: dict, kind: str):
  """The error of one parsed row of `kind`, or None."""
  if kind == 'sft':
    if 'messages' in row:
      if 'prompt' in row or 'completion' in row:
        return "both 'messages' and 'prompt'/'completion': give one or the other"
      return _check_messages(row['messages'])
    if 'prompt' not in row and 'completion' not in row:
      return "missing fields: an SFT row has 'prompt' and 'completion', or 'messages'"
    return (_string(row, 'prompt', nonempty=False) or
            _string(row, 'completion', nonempty=True))
  if kind == 'prefs':
    problem = (_string(row, 'prompt', nonempty=False) or
               _string(row, 'chosen', nonempty=True) or
               _string(row, 'rejected', nonempty=True))
    if problem is None and row['chosen'] == row['rejected']:
      problem = "'chosen' equals 'rejected': the pair prefers nothing"
    return problem
  return _string(row, 'prompt', nonempty=True)


def read(path: str, *, kind: str) -> list[Record]:
  """The file's rows of `kind`, each checked; UserError naming every bad row's line."""
  if kind not in KINDS:
    raise ValueError(f'kind {kind!r} is not one of {KINDS}')
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().split('\n')
  except FileNotFoundError:
    raise UserError(f'{path}: no such file') from None
  except UnicodeDecodeError as e:
    raise UserError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start})') from None
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror or e}') from None
  problems, records = _Problems(path), []
  for number, text in enumerate(lines, start=1):
    if not text.strip():
      continue
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      problems.add(number, f'invalid JSON ({e.msg} at column {e.colno})')
      continue
    if not isinstance(row, dict):
      problems.add(number, f'{_kind_of_json(row)}, not a JSON object')
      continue
    problem = _check_row(row, kind)
    if problem:
      problems.add(number, problem)
    else:
      records.append(Record(line=number, fields=row))
  problems.raise_if_any(len(records) + len(problems.found))
  if not records:
    raise UserError(f'{path} holds no rows')
  return records


class _Encoder:
  """tokenizer.encode of many texts in one call, each distinct text once."""

  def __init__(self, tokenizer, texts):
    unique = sorted(set(texts))
    self.ids = dict(zip(unique, tokenizer.encode_batch(unique))) if unique else {}

  def __call__(self, text: str) -> list[int]:
    return self.ids[text]


def render(messages, encode, *, bos_id: int, eos_id: int):
  """(prompt ids, response ids, response mask) of a conversation by the default template."""
  first = next(i for i, m in enumerate(messages) if m['role'] == 'assistant')
  prompt = [bos_id]
  for m in messages[:first]:
    prompt += encode(header(m['role'])) + encode(m['content'] + '\n')
  prompt += encode(header('assistant'))
  response, mask = [], []
  for i, m in enumerate(messages[first:]):
    if i > 0:
      marker = encode(header(m['role']))
      response += marker
      mask += [0] * len(marker)
    if m['role'] == 'assistant':
      ids = encode(m['content']) + [eos_id]
      response += ids
      mask += [1] * len(ids)
    else:
      ids = encode(m['content'] + '\n')
      response += ids
      mask += [0] * len(ids)
  return prompt, response, mask


def _texts(record: Record, split=None):
  """Every text `_tokenize` will encode for this row (split: its chat_template.Split)."""
  f = record.fields
  if split is not None:
    return [split.prompt] + [text for text, _ in split.pieces]
  if 'messages' in f:
    out = [header(r) for r in ROLES]
    for m in f['messages']:
      out.append(m['content'] if m['role'] == 'assistant' else m['content'] + '\n')
    return out
  return [f[k] for k in ('prompt', 'completion', 'chosen', 'rejected') if k in f]


def _tokenize(record: Record, kind: str, encode, *, bos_id: int, eos_id: int, split=None):
  """(prompt ids, [(response ids, mask), ...]) of one row: one response for sft, chosen
  and rejected for prefs, none for prompts. split: the row's chat_template.Split."""
  f = record.fields
  if split is not None:
    prompt = encode(split.prompt)
    if not prompt or prompt[0] != bos_id:  # a template may print BOS itself
      prompt = [bos_id] + prompt
    response, mask = [], []
    for text, in_loss in split.pieces:
      ids = encode(text)
      response += ids
      mask += [int(in_loss)] * len(ids)
    return prompt, [(response, mask)]
  if 'messages' in f:
    prompt, response, mask = render(f['messages'], encode, bos_id=bos_id, eos_id=eos_id)
    return prompt, [(response, mask)]
  prompt = [bos_id] + encode(f['prompt'])
  responses = []
  for name in RESPONSE_FIELDS[kind]:
    ids = encode(f[name]) + [eos_id]
    responses.append((ids, [1] * len(ids)))
  return prompt, responses


def _left_pad(rows, width: int) -> np.ndarray:
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if r:
      out[i, width - len(r):] = r
  return out


def _right_pad(rows, width: int, dtype) -> np.ndarray:
  out = np.zeros((len(rows), width), dtype)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def tokenize(path: str, *, kind: str, tokenizer, prompt_len: int, response_len: int,
             overlong: str = 'error', limit_fields=('prompt_len', 'max_new_tokens')):
  """(arrays, report) of the checked rows of `path`, tokenized by `tokenizer`.

  arrays: prompts [N, P] int32 left-padded, BOS first; prompt_lengths [N] int32;
  prompt_id [N] int32 (rows with the same prompt tokens share it: held-out splits are by
  prompt); and for sft response [N, R] int32 (PAD after it) and mask [N, R] float32; for
  prefs chosen, rejected [N, R] int32 and chosen_mask, rejected_mask [N, R] float32.
  report: the file, its sha256, the rows read, kept and dropped (with the first dropped
  lines), the SFT rows of each format. limit_fields: the config fields that set
  prompt_len and response_len, which a too-long row's error names."""
  if overlong not in OVERLONG:
    raise UserError(f'overlong={overlong!r} is not one of {OVERLONG}')
  records = read(path, kind=kind)
  template = chat_template.of_tokenizer(tokenizer) if kind == 'sft' else None
  splits = {}
  for r in records:
    if template is not None and 'messages' in r.fields:
      try:
        splits[r.line] = template.split(r.fields['messages'])
      except UserError as e:
        raise UserError(f'{path} line {r.line}: {e}') from None
  encode = _Encoder(tokenizer, [t for r in records for t in _texts(r, splits.get(r.line))])
  problems, dropped, kept = _Problems(path), [], []
  for record in records:
    prompt, responses = _tokenize(record, kind, encode, bos_id=tokenizer.bos_id,
                                  eos_id=tokenizer.eos_id, split=splits.get(record.line))
    what = None
    if len(prompt) > prompt_len:
      what = (f'the prompt is {len(prompt)} tokens (BOS included), over '
              f'{limit_fields[0]}={prompt_len}')
    else:
      for label, (ids, _) in zip(LABELS[kind], responses):
        if len(ids) > response_len:
          what = (f'{label} is {len(ids)} tokens (EOS included), over '
                  f'{limit_fields[1]}={response_len}')
          break
    if what is None:
      kept.append((record, prompt, responses))
    elif overlong == 'drop':
      dropped.append(record.line)
    else:
      problems.add(record.line, what)
  problems.raise_if_any(len(records))
  if not kept:
    raise UserError(f'{path}: all {len(records)} rows are too long and were dropped '
                    f'(overlong=drop); raise {limit_fields[0]} / {limit_fields[1]}')
  prompts = [p for _, p, _ in kept]
  ids = {}
  prompt_id = np.asarray([ids.setdefault(tuple(p), len(ids)) for p in prompts], np.int32)
  width = max(len(p) for p in prompts)
  arrays = dict(prompts=_left_pad(prompts, width),
                prompt_lengths=np.asarray([len(p) for p in prompts], np.int32),
                prompt_id=prompt_id)
  names = {'sft': ('response',), 'prefs': ('chosen', 'rejected'), 'prompts': ()}[kind]
  if names:
    r = max(len(ids_) for _, _, rs in kept for ids_, _ in rs)
    for j, name in enumerate(names):
      arrays[name] = _right_pad([rs[j][0] for _, _, rs in kept], r, np.int32)
      mask_name = 'mask' if kind == 'sft' else f'{name}_mask'
      arrays[mask_name] = _right_pad([rs[j][1] for _, _, rs in kept], r, np.float32)
  report = {'path': path, 'sha256': sha256(path), 'kind': kind, 'rows': len(records),
            'kept': len(kept), 'dropped_overlong': len(dropped),
            'dropped_lines': dropped[:20], 'prompts': len(ids),
            'prompt_len': prompt_len, 'response_len': response_len}
  if kind == 'sft':
    report['messages_rows'] = sum('messages' in r.fields for r, _, _ in kept)
    report['template'] = 'plain role markers (rlhf_jax/data/jsonl.py)'
    if template is not None:
      report['template'] = "the tokenizer's chat_template (data/chat_template.py)"
      report['template_sha256'] = template.sha256
  return arrays, report


@dataclasses.dataclass(frozen=True)
class JsonlPairs:
  """Preference pairs from a file, as `tokenize(kind='prefs')` gives them: the fields of
  data/preferences.PreferencePairs that a train step reads (stages/preference_data.pair_rows),
  and none of the world's (no gold reward, no annotators: the file's labels are hard).

  prompts [N, P] int32; prompt_lengths [N]; chosen, rejected [N, R] int32; chosen_mask,
  rejected_mask [N, R] float32; soft_label [N] float32, all 1; prompt_id [N] int32."""
  prompts: np.ndarray
  prompt_lengths: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray
  chosen_mask: np.ndarray
  rejected_mask: np.ndarray
  soft_label: np.ndarray
  prompt_id: np.ndarray

  @classmethod
  def from_arrays(cls, arrays: dict) -> 'JsonlPairs':
    n = len(arrays['prompts'])
    return cls(soft_label=np.ones(n, np.float32),
               **{f.name: arrays[f.name] for f in dataclasses.fields(cls)
                  if f.name != 'soft_label'})

  def __len__(self) -> int:
    return self.prompts.shape[0]

  def take(self, index) -> 'JsonlPairs':
    return JsonlPairs(**{f.name: np.asarray(getattr(self, f.name)[index])
                         for f in dataclasses.fields(self)})


FIELDS = {'sft': ('prompts', 'prompt_lengths', 'prompt_id', 'response', 'mask'),
          'prefs': ('prompts', 'prompt_lengths', 'prompt_id', 'chosen', 'rejected',
                    'chosen_mask', 'rejected_mask'),
          'prompts': ('prompts', 'prompt_lengths', 'prompt_id')}
