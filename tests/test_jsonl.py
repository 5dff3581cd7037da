"""Local JSONL datasets (rlhf_jax/data/jsonl.py, stages/jsonl_data.py): every kind of bad row
refused with its line, the tokenized arrays against a spelling by hand with a character
tokenizer (the loss mask token by token), the stage checks, and a tiny CLI run: a text
pretrain, SFT on a JSONL of demonstrations, then DPO and a reward model on a preference
JSONL, whose recorded row counts are the file's."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env, load_config
from rlhf_jax.data import jsonl
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError
from rlhf_jax.stages import jsonl_data
from test_cli_errors import assert_one_error_line

BOS, EOS = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID
ALPHABET = '<|>\n abcdefghijklmnopqrstuvwxyz,.?!'


def write_jsonl(path, rows) -> str:
  """rows: dicts (written as JSON) or raw strings (written as they are), one a line."""
  with open(path, 'w') as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def char_tok(tmp_path_factory):
  """A character tokenizer: every character of ALPHABET one piece, so token ids can be
  spelled by hand from the pieces table."""
  path = str(tmp_path_factory.mktemp('char') / 'tokenizer.model')
  return tokenizer_lib.train_or_load_tokenizer(texts=[ALPHABET.replace('\n', ' ') + ' x\ny'],
                                               model_path=path, vocab_size=320,
                                               model_type='char')


def spell(tok, text: str) -> list[int]:
  """sentencepiece's encoding of `text` by a character model, by hand: the dummy prefix
  (a word boundary, U+2581) and then one piece per character, spaces as U+2581."""
  ids = {p: i for i, p in enumerate(tok.pieces())}
  return [ids['\u2581']] + [ids['\u2581' if c == ' ' else c] for c in text]


# -- bad rows, each refused with its line -------------------------------------------------

GOOD = {'sft': {'prompt': 'p', 'completion': 'c'},
        'prefs': {'prompt': 'p', 'chosen': 'a', 'rejected': 'b'},
        'prompts': {'prompt': 'p'}}


@pytest.mark.parametrize('kind, bad, expected', [
    ('sft', '{"prompt": "a", ', 'invalid JSON'),
    ('sft', '[1, 2]', 'an array, not a JSON object'),
    ('sft', '"text"', 'a string, not a JSON object'),
    ('sft', {'prompt': 'a'}, "missing field 'completion'"),
    ('sft', {'completion': 'a'}, "missing field 'prompt'"),
    ('sft', {'text': 'a'}, "an SFT row has 'prompt' and 'completion', or 'messages'"),
    ('sft', {'prompt': 3, 'completion': 'a'}, "field 'prompt' is a number, not a string"),
    ('sft', {'prompt': 'a', 'completion': ' \n'}, "field 'completion' is empty"),
    ('sft', {'messages': 'hi'}, "field 'messages' is a string, not an array"),
    ('sft', {'messages': []}, "field 'messages' is empty"),
    ('sft', {'messages': [{'role': 'bot', 'content': 'x'}]},
     "message 1: role 'bot' is not one of system, user, assistant"),
    ('sft', {'messages': [{'role': 'user', 'content': 'x'}]}, 'no assistant turn'),
    ('sft', {'messages': [{'role': 'user', 'content': 'x'}, {'role': 'assistant'}]},
     "message 2: missing field 'content'"),
    ('sft', {'messages': [{'role': 'user', 'content': 'x'},
                          {'role': 'assistant', 'content': ''}]},
     'message 2 (assistant) is empty'),
    ('sft', {'messages': [{'role': 'assistant', 'content': 'x'}], 'prompt': 'p'},
     "both 'messages' and 'prompt'/'completion'"),
    ('prefs', {'prompt': 'p', 'chosen': 'a'}, "missing field 'rejected'"),
    ('prefs', {'prompt': 'p', 'chosen': '', 'rejected': 'b'}, "field 'chosen' is empty"),
    ('prefs', {'prompt': 'p', 'chosen': 'same', 'rejected': 'same'},
     "'chosen' equals 'rejected'"),
    ('prefs', {'prompt': None, 'chosen': 'a', 'rejected': 'b'},
     "field 'prompt' is null, not a string"),
    ('prompts', {'prompt': ''}, "field 'prompt' is empty"),
    ('prompts', {'question': 'q'}, "missing field 'prompt'"),
])
def test_bad_row_is_refused_with_its_line(kind, bad, expected, tmp_path):
  # Line 3 is bad; a blank line 2 holds no row (and is no error).
  path = write_jsonl(tmp_path / 'd.jsonl', [GOOD[kind], '', bad, GOOD[kind]])
  with pytest.raises(UserError) as e:
    jsonl.read(path, kind=kind)
  assert str(e.value).startswith(f'{path} line 3: ') and expected in str(e.value), str(e.value)


def test_every_bad_row_is_counted_and_the_first_shown(tmp_path):
  rows = [GOOD['prefs'], '{', {'prompt': 'p', 'chosen': 'x', 'rejected': 'x'}, GOOD['prefs'],
          {'prompt': 'p'}, '7', {'chosen': 'a'}]
  path = write_jsonl(tmp_path / 'd.jsonl', rows)
  with pytest.raises(UserError) as e:
    jsonl.read(path, kind='prefs')
  message = str(e.value)
  assert message.startswith(f'{path}: 5 bad rows (of 7); first: line 2: invalid JSON'), message
  assert "line 3: 'chosen' equals 'rejected'" in message
  assert "line 5: missing field 'chosen'" in message
  assert 'line 6' not in message  # three are spelled out, the count says the rest


def test_empty_and_missing_files(tmp_path):
  path = write_jsonl(tmp_path / 'empty.jsonl', ['', '  '])
  with pytest.raises(UserError, match='holds no rows'):
    jsonl.read(path, kind='sft')
  with pytest.raises(UserError, match='no such file'):
    jsonl.read(str(tmp_path / 'missing.jsonl'), kind='sft')


# -- tokenized arrays against a hand spelling ----------------------------------------------

def test_prompt_completion_arrays(char_tok, tmp_path):
  rows = [{'prompt': 'ab c', 'completion': 'de'}, {'prompt': 'x', 'completion': 'fg hi'},
          {'prompt': 'ab c', 'completion': 'z', 'id': 7}]  # same prompt: same prompt_id
  path = write_jsonl(tmp_path / 'd.jsonl', rows)
  arrays, report = jsonl.tokenize(path, kind='sft', tokenizer=char_tok, prompt_len=8,
                                  response_len=8)
  prompts = [[BOS] + spell(char_tok, r['prompt']) for r in rows]
  responses = [spell(char_tok, r['completion']) + [EOS] for r in rows]
  p, r = max(map(len, prompts)), max(map(len, responses))  # as wide as the widest row
  assert arrays['prompts'].shape == (3, p) and arrays['response'].shape == (3, r)
  for i in range(3):
    assert arrays['prompts'][i].tolist() == [0] * (p - len(prompts[i])) + prompts[i]
    assert arrays['response'][i].tolist() == responses[i] + [0] * (r - len(responses[i]))
    assert arrays['mask'][i].tolist() == [1.0] * len(responses[i]) + [0.0] * (
        r - len(responses[i]))
  assert arrays['prompt_lengths'].tolist() == [len(x) for x in prompts]
  assert arrays['prompt_id'].tolist() == [0, 1, 0]
  assert (report['rows'], report['kept'], report['dropped_overlong'], report['prompts']) == (
      3, 3, 0, 2)
  assert report['sha256'] == jsonl.sha256(path)


def test_messages_template_and_assistant_only_mask(char_tok, tmp_path):
  messages = [{'role': 'system', 'content': 'be ok'}, {'role': 'user', 'content': 'hi'},
              {'role': 'assistant', 'content': 'yo'}, {'role': 'user', 'content': 'why'},
              {'role': 'assistant', 'content': 'so!'}]
  path = write_jsonl(tmp_path / 'd.jsonl', [{'messages': messages}])
  arrays, report = jsonl.tokenize(path, kind='sft', tokenizer=char_tok, prompt_len=64,
                                  response_len=64)
  s = lambda text: spell(char_tok, text)
  # The documented template, piece by piece: markers and other turns outside the loss.
  prompt = ([BOS] + s('<|system|>\n') + s('be ok\n') + s('<|user|>\n') + s('hi\n') +
            s('<|assistant|>\n'))
  parts = [(s('yo') + [EOS], 1.0), (s('<|user|>\n'), 0.0), (s('why\n'), 0.0),
           (s('<|assistant|>\n'), 0.0), (s('so!') + [EOS], 1.0)]
  response = [t for ids, _ in parts for t in ids]
  mask = [m for ids, m in parts for _ in ids]
  assert arrays['prompts'][0].tolist() == prompt
  assert arrays['response'][0].tolist() == response
  assert arrays['mask'][0].tolist() == mask  # token by token
  # The masked tokens are the assistant turns' text and their EOS, nothing else.
  kept = arrays['response'][0][arrays['mask'][0] > 0]
  assert (kept == EOS).sum() == 2
  assert char_tok.decode(kept) == 'yo so!'
  assert report['messages_rows'] == 1


def test_pair_arrays_and_the_pairs_a_step_reads(char_tok, tmp_path):
  from rlhf_jax.stages.preference_data import pair_rows
  rows = [{'prompt': 'q', 'chosen': 'good', 'rejected': 'bad'},
          {'prompt': 'r s', 'chosen': 'a', 'rejected': 'bcd'}]
  path = write_jsonl(tmp_path / 'p.jsonl', rows)
  arrays, _ = jsonl.tokenize(path, kind='prefs', tokenizer=char_tok, prompt_len=8,
                             response_len=8)
  pairs = jsonl.JsonlPairs.from_arrays(arrays)
  batch = pair_rows(pairs, np.array([1, 0]), np.array([True, False]))
  chosen = spell(char_tok, 'a') + [EOS]
  rejected = spell(char_tok, 'bcd') + [EOS]
  width = len(spell(char_tok, 'good')) + 1
  assert batch.chosen[0].tolist() == chosen + [0] * (width - len(chosen))
  assert batch.rejected[0].tolist() == rejected + [0] * (width - len(rejected))
  assert batch.chosen_mask[0].sum() == len(chosen)
  assert batch.rejected_mask[0].sum() == len(rejected)
  assert batch.prompts[0].tolist() == [BOS] + spell(char_tok, 'r s')
  assert batch.weight.tolist() == [1.0, 0.0] and batch.label.tolist() == [1.0, 1.0]


def test_prompts_only(char_tok, tmp_path):
  path = write_jsonl(tmp_path / 'p.jsonl', [{'prompt': 'ab'}, {'prompt': 'abc'}])
  arrays, report = jsonl.tokenize(path, kind='prompts', tokenizer=char_tok, prompt_len=8,
                                  response_len=1)
  assert sorted(arrays) == sorted(jsonl.FIELDS['prompts'])
  assert arrays['prompts'].tolist() == [[0] + [BOS] + spell(char_tok, 'ab'),
                                        [BOS] + spell(char_tok, 'abc')]
  assert report['kept'] == 2


def test_over_long_rows_refused_or_dropped_and_counted(char_tok, tmp_path):
  # 'abcdef' is 7 tokens (the prefix and 6 characters), + EOS 8; 'ab' + BOS 4.
  rows = [{'prompt': 'a', 'completion': 'ab'}, {'prompt': 'a', 'completion': 'abcdef'},
          {'prompt': 'abcdefg', 'completion': 'a'}, {'prompt': 'b', 'completion': 'c'}]
  path = write_jsonl(tmp_path / 'd.jsonl', rows)
  kwargs = dict(kind='sft', tokenizer=char_tok, prompt_len=4, response_len=7,
                limit_fields=('sft.prompt_len', 'sft.max_new_tokens'))
  with pytest.raises(UserError) as e:
    jsonl.tokenize(path, **kwargs)
  assert str(e.value) == (
      f'{path}: 2 bad rows (of 4); first: line 2: the response is 8 tokens (EOS included), '
      'over sft.max_new_tokens=7; line 3: the prompt is 9 tokens (BOS included), over '
      'sft.prompt_len=4')
  arrays, report = jsonl.tokenize(path, overlong='drop', **kwargs)
  assert (report['rows'], report['kept'], report['dropped_overlong']) == (4, 2, 2)
  assert report['dropped_lines'] == [2, 3]
  assert arrays['response'].shape[0] == 2
  with pytest.raises(UserError, match='all 4 rows are too long'):
    jsonl.tokenize(path, **{**kwargs, 'prompt_len': 2}, overlong='drop')


# -- the stage checks ---------------------------------------------------------------------

def _with(config, **fields):
  from rlhf_jax.config import with_fields
  return with_fields(config, **fields)


def test_stage_source_fields_and_conflicts(tmp_path):
  sft, dpo, rm = (load_config(n) for n in ('sft', 'dpo', 'reward_model'))
  assert jsonl_data.source(sft) is None and jsonl_data.source(dpo) is None  # the defaults
  src = jsonl_data.validate(_with(sft, **{'sft.data': 'jsonl:rows.jsonl'}))
  assert (src.field, src.kind, src.path) == ('sft.data', 'sft', os.path.abspath('rows.jsonl'))
  assert jsonl_data.validate(_with(rm, **{'prefs.data': 'jsonl:p.jsonl'})).kind == 'prefs'
  cases = [
      (_with(sft, **{'sft.data': 'csv:rows.csv'}), "sft.data='csv:rows.csv' is not"),
      (_with(sft, **{'sft.data': 'jsonl:'}), "is not '' or 'jsonl:PATH'"),
      (_with(sft, **{'sft.data': 'jsonl:a', 'sft.overlong': 'cut'}), 'sft.overlong='),
      (_with(dpo, **{'prefs.data': 'jsonl:a', 'prefs.dir': 'runs/x'}), 'choose one'),
      (_with(load_config('sft', 'task_tiny'), **{'sft.data': 'jsonl:a'}), 'task block'),
  ]
  for config, expected in cases:
    with pytest.raises(UserError, match=expected.replace('(', r'\(').replace('?', r'\?')):
      jsonl_data.validate(config)


def test_multi_process_is_refused(monkeypatch):
  import jax
  from rlhf_jax.stages import dispatch
  config = _with(load_config('sft'), **{'sft.data': 'jsonl:a.jsonl'})
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(UserError, match='on a JSONL file .sft.data. runs in one process only'):
    dispatch.check_processes(config)
  dispatch.check_processes(load_config('sft'))  # the world's SFT runs on several, as before


# -- the CLI, end to end ------------------------------------------------------------------

WORDS = 'the cat sat on a mat and dog ran to park with big red ball under tree sun hill'.split()
TINY = ('--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.n_layers=1',
        '--config.train.progress=False')


def cli(*args):
  return subprocess.run([sys.executable, '-m', 'rlhf_jax.main', *args], cwd=REPO,
                        env=cli_env(), capture_output=True, text=True, timeout=600)


def _words(rng, n: int) -> str:
  return ' '.join(rng.choice(WORDS, n))


@pytest.fixture(scope='module')
def text_run(tmp_path_factory):
  """A text pretrain of 2 steps on a small local corpus: a tokenizer and a checkpoint."""
  root = tmp_path_factory.mktemp('text_run')
  rng = np.random.default_rng(0)
  corpus = root / 'corpus.txt'
  corpus.write_text(''.join(_words(rng, int(rng.integers(5, 15))) + '\n\n\n'
                            for _ in range(200)))
  workdir = str(root / 'pretrain')
  result = cli('--config=configs/pretrain.py:tiny', f'--workdir={workdir}', *TINY,
               f'--config.data.source=text:{corpus}', '--config.data.vocab_size=300',
               '--config.train.steps=2', '--config.train.seq_len=32',
               '--config.train.batch_size=4', '--config.train.eval_batches=1')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def sft_rows(n: int, seed: int = 1) -> list:
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    if i % 2:
      rows.append({'prompt': _words(rng, 3), 'completion': _words(rng, 4)})
    else:
      rows.append({'messages': [{'role': 'user', 'content': _words(rng, 2)},
                                {'role': 'assistant', 'content': _words(rng, 3)}]})
  return rows


def pref_rows(n: int, seed: int = 2) -> list:
  rng = np.random.default_rng(seed)
  return [{'prompt': _words(rng, 3), 'chosen': 'big red ball', 'rejected': _words(rng, 4)}
          for _ in range(n)]


STEPS = ('--config.train.steps=2', '--config.train.batch_size=4', '--config.train.log_every=1')
SFT_LENS = ('--config.sft.prompt_len=48', '--config.sft.max_new_tokens=32')
PREF_LENS = ('--config.prefs.prompt_len=48', '--config.prefs.max_new_tokens=32')


@pytest.mark.parametrize('stage, rows, mentions', [
    ('sft', [sft_rows(1)[0], '{"prompt": "a", "completion"', sft_rows(2)[1]],
     ('line 2: invalid JSON',)),
    pytest.param('sft', [{'prompt': 'the cat', 'completion': ''}],
                 ("line 1: field 'completion' is empty",), marks=pytest.mark.slow),
    ('dpo', [pref_rows(1)[0], pref_rows(1)[0], {'prompt': 'a', 'chosen': 'x', 'rejected': 'x'}],
     ("line 3: 'chosen' equals 'rejected'",)),
    pytest.param('dpo', [{'prompt': 'a', 'chosen': 'x'}], ("line 1: missing field 'rejected'",),
                 marks=pytest.mark.slow),
    pytest.param('sft', [{'prompt': ' '.join(['cat'] * 60), 'completion': 'dog'}],
                 ('line 1: the prompt is', 'over sft.prompt_len=48'), marks=pytest.mark.slow),
])
def test_cli_refuses_bad_rows(stage, rows, mentions, text_run, tmp_path):
  path = write_jsonl(tmp_path / 'rows.jsonl', rows)
  field = 'sft.data' if stage == 'sft' else 'prefs.data'
  workdir = tmp_path / 'run'
  result = cli(f'--config=configs/{stage}.py:tiny', f'--workdir={workdir}',
               f'--config.init.run={text_run}', f'--config.{field}=jsonl:{path}',
               *(SFT_LENS if stage == 'sft' else PREF_LENS), *STEPS, *TINY[-1:])
  assert_one_error_line(result, mentions=(path, *mentions))
  assert not workdir.exists()  # refused before DIR was made


@pytest.mark.slow
def test_cli_refuses_mismatched_init_runs(text_run, tmp_path):
  path = write_jsonl(tmp_path / 'rows.jsonl', sft_rows(4))
  # A run on the world (the text run's files less its tokenizer, its config saying world).
  world = tmp_path / 'world_run'
  shutil.copytree(text_run, world, ignore=shutil.ignore_patterns('tokenizer.model'))
  config = json.loads((world / 'config.json').read_text())
  config['data']['source'] = 'world'
  (world / 'config.json').write_text(json.dumps(config))
  result = cli('--config=configs/sft.py:tiny', f'--workdir={tmp_path / "a"}',
               f'--config.init.run={world}', f'--config.sft.data=jsonl:{path}', *TINY[-1:])
  assert_one_error_line(result, mentions=('sft.data names a JSONL file', 'no tokenizer.model'))
  # A run on text, and no JSONL source: the world's demonstrations cannot be made from it.
  result = cli('--config=configs/sft.py:tiny', f'--workdir={tmp_path / "b"}',
               f'--config.init.run={text_run}', *TINY[-1:])
  assert_one_error_line(result, mentions=('was trained on', "'jsonl:PATH'"))
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def _metrics(workdir) -> list:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow  # an end-to-end run of three stages
def test_cli_text_pretrain_sft_dpo_rm_on_jsonl(text_run, tmp_path):
  sft_file = write_jsonl(tmp_path / 'demos.jsonl', sft_rows(10))
  pref_file = write_jsonl(tmp_path / 'pairs.jsonl', pref_rows(12))
  sft = str(tmp_path / 'sft')
  result = cli('--config=configs/sft.py:tiny', f'--workdir={sft}', f'--config.init.run={text_run}',
               f'--config.sft.data=jsonl:{sft_file}', *SFT_LENS, *STEPS, *TINY[-1:])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'sft: 10 rows of 10 from' in result.stdout and 'skipped: policy/*' in result.stdout
  m = _metrics(sft)
  assert [r['step'] for r in m] == [0, 1, 2]
  assert m[0]['sft/jsonl_rows'] == 10 and m[0]['sft/jsonl_dropped'] == 0
  assert m[0]['sft/demos'] + m[0]['sft/held_out_demos'] == 10
  assert np.isfinite(m[0]['eval/loss']) and np.isfinite(m[-1]['eval/loss'])
  assert not any(k.startswith('policy/') for r in m for k in r)
  # The rows the run stored are the loader's, with the init run's tokenizer (copied).
  tok_path = os.path.join(sft, 'tokenizer.model')
  with open(tok_path, 'rb') as a, open(os.path.join(text_run, 'tokenizer.model'), 'rb') as b:
    assert a.read() == b.read()
  tok = tokenizer_lib.load_tokenizer(model_path=tok_path)
  expected, _ = jsonl.tokenize(sft_file, kind='sft', tokenizer=tok, prompt_len=48,
                               response_len=32)
  with open(os.path.join(sft, 'jsonl', 'lineage.json')) as f:
    lineage = json.load(f)
  assert (lineage['rows'], lineage['kept'], lineage['messages_rows']) == (10, 10, 5)
  assert lineage['sha256'] == jsonl.sha256(sft_file)
  assert 'policy/*' in lineage['skipped_evaluations']
  for name in jsonl.FIELDS['sft']:
    np.testing.assert_array_equal(np.load(os.path.join(sft, 'jsonl', f'{name}.npy')),
                                  expected[name])

  for stage, prefix, evals in (('dpo', 'dpo', 'dpo_eval/accuracy'),
                               ('reward_model', 'rm', 'rm/label_accuracy')):
    workdir = str(tmp_path / stage)
    result = cli(f'--config=configs/{stage}.py:tiny', f'--workdir={workdir}',
                 f'--config.init.run={sft}', f'--config.prefs.data=jsonl:{pref_file}',
                 *PREF_LENS, *STEPS, *TINY[-1:])
    assert result.returncode == 0, result.stderr[-3000:]
    m = _metrics(workdir)
    assert [r['step'] for r in m] == [0, 1, 2]
    assert m[0][f'{prefix}/jsonl_rows'] == 12 and m[0][f'{prefix}/jsonl_kept'] == 12
    train = m[0][f'{prefix}/train_pairs']
    held = m[0].get('dpo/held_out_pairs', m[-1].get('rm/held_out_pairs'))
    assert train + held == 12
    assert 0.0 <= m[-1][evals] <= 1.0 and np.isfinite(m[-1]['train/loss'])
    assert not any(k.startswith(('policy/', 'rm/gold')) for r in m for k in r)
  with open(tmp_path / 'reward_model' / 'reward_norm.json') as f:
    assert json.load(f)['reference_responses'] == 2 * held

  check_ppo_on_prompts(tmp_path, sft=sft, rm=str(tmp_path / 'reward_model'))

  # A resumed run whose file has changed is refused, and its DIR left as it was.
  before = open(os.path.join(tmp_path, 'dpo', 'config.json')).read()
  write_jsonl(pref_file, pref_rows(13))
  result = cli('--config=configs/dpo.py:tiny', f'--workdir={tmp_path / "dpo"}',
               f'--config.init.run={sft}', f'--config.prefs.data=jsonl:{pref_file}',
               *PREF_LENS, '--config.train.steps=3', *STEPS[1:], *TINY[-1:])
  assert_one_error_line(result, mentions=('has changed since',))
  assert open(os.path.join(tmp_path, 'dpo', 'config.json')).read() == before


# -- PPO on a prompts JSONL ------------------------------------------------------------------

PPO_ARGS = ('--config.ppo.prompt_len=48', '--config.ppo.max_new_tokens=8',
            '--config.ppo.reward_norm_prompts=8', '--config.ppo.epochs=1',
            '--config.ppo.minibatches=2', '--config.train.eval_every=2')


def prompt_rows(n: int, seed: int = 3) -> list:
  rng = np.random.default_rng(seed)
  return [{'prompt': _words(rng, int(rng.integers(2, 6))), 'source': 'test'} for _ in range(n)]


def check_ppo_on_prompts(tmp_path, *, sft: str, rm: str) -> None:
  """PPO from the JSONL SFT run against the JSONL reward model, its rollouts on a prompts
  file: the prompts the stage stored (and sampled from) are the tokenizer's encoding of
  the file's, computed here through sentencepiece itself; no gold number is reported."""
  import sentencepiece as spm
  rows = prompt_rows(12)
  prompt_file = write_jsonl(tmp_path / 'prompts.jsonl', rows)
  ppo = str(tmp_path / 'ppo')
  result = cli('--config=configs/ppo.py:tiny', f'--workdir={ppo}', f'--config.init.run={sft}',
               f'--config.ppo.rm_run={rm}', f'--config.ppo.data=jsonl:{prompt_file}',
               *PPO_ARGS, *STEPS, *TINY[-1:])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ppo: 12 rows of 12 from' in result.stdout and 'rl/gold_reward' in result.stdout
  sp = spm.SentencePieceProcessor(model_file=os.path.join(text_run_of(sft), 'tokenizer.model'))
  encoded = [[BOS] + sp.encode(r['prompt']) for r in rows]
  width = max(map(len, encoded))
  expected = np.array([[0] * (width - len(e)) + e for e in encoded], np.int32)
  np.testing.assert_array_equal(np.load(os.path.join(ppo, 'jsonl', 'prompts.npy')), expected)
  with open(os.path.join(ppo, 'jsonl', 'lineage.json')) as f:
    lineage = json.load(f)
  assert lineage['kind'] == 'prompts' and lineage['sha256'] == jsonl.sha256(prompt_file)
  assert lineage['source_field'] == 'ppo.data'
  distinct = len({tuple(e) for e in encoded})
  m = _metrics(ppo)
  assert [r['step'] for r in m] == [0, 1, 2]
  assert m[0]['rl/prompt_pool'] + m[0]['ppo/held_out_prompts'] == distinct == 12
  assert m[0]['ppo/jsonl_rows'] == 12
  assert all(np.isfinite(r['rl/proxy_reward']) for r in m[1:])
  assert np.isfinite(m[-1]['policy/proxy_reward']) and np.isfinite(m[-1]['policy/kl_ref'])
  assert not any(k.startswith(('rl/gold', 'rl/harm', 'policy/gold', 'policy/group',
                               'policy/harm')) for r in m for k in r)
  with open(os.path.join(ppo, 'reward_norm.json')) as f:
    stats = json.load(f)
  assert stats['prompts_sha256'] == lineage['sha256'] and stats['samples'] == 8
  # A bad row: its line, exit 2, and no DIR.
  bad = write_jsonl(tmp_path / 'bad_prompts.jsonl', [rows[0], {'prompt': ''}])
  result = cli('--config=configs/ppo.py:tiny', f'--workdir={tmp_path / "ppo_bad"}',
               f'--config.init.run={sft}', f'--config.ppo.rm_run={rm}',
               f'--config.ppo.data=jsonl:{bad}', *PPO_ARGS, *STEPS, *TINY[-1:])
  assert_one_error_line(result, mentions=(bad, "line 2: field 'prompt' is empty"))
  assert not (tmp_path / 'ppo_bad').exists()


def text_run_of(run: str) -> str:
  """The init.run of `run` (the text pretrain, whose tokenizer.model it copied)."""
  with open(os.path.join(run, 'config.json')) as f:
    return json.load(f)['init']['run']


@pytest.mark.parametrize('args, mentions', [
    (('--config=configs/ppo.py:tiny', '--config.ppo.reward=gold'),
     ("ppo.reward='gold'", "use ppo.reward='rm'")),
    pytest.param(('--config=configs/ppo.py:task_tiny',),
                 ("ppo.reward='task'", "use ppo.reward='rm'"), marks=pytest.mark.slow),
    (('--config=configs/grpo.py:tiny',), ('grpo.data=', 'no answer to check',
                                          "task.name='jsonl'")),
])
def test_cli_refuses_jsonl_prompts_without_a_reward_model(args, mentions, tmp_path):
  path = write_jsonl(tmp_path / 'p.jsonl', [{'prompt': 'the cat'}])
  field = 'grpo' if 'grpo' in args[0] else 'ppo'
  result = cli(*args, f'--workdir={tmp_path / "run"}', f'--config.{field}.data=jsonl:{path}')
  assert_one_error_line(result, mentions=mentions)
  assert not (tmp_path / 'run').exists()


def test_ppo_reward_model_must_share_the_tokenizer(tmp_path):
  from rlhf_jax.stages import jsonl_prompts
  runs = {}
  for name, model in (('sft', b'tok A'), ('rm_same', b'tok A'), ('rm_other', b'tok B'),
                      ('rm_world', None)):
    runs[name] = tmp_path / name
    runs[name].mkdir()
    (runs[name] / 'config.json').write_text(json.dumps({'stage': name}))
    if model is not None:
      (runs[name] / 'tokenizer.model').write_bytes(model)
  config = _with(load_config('ppo'), **{'ppo.data': 'jsonl:p.jsonl',
                                        'init.run': str(runs['sft'])})
  for rm, ok in (('rm_same', True), ('rm_other', False), ('rm_world', False)):
    config = _with(config, **{'ppo.rm_run': str(runs[rm])})
    if ok:
      jsonl_prompts.check_rm_run(config)
    else:
      with pytest.raises(UserError, match='does not use the tokenizer of init.run'):
        jsonl_prompts.check_rm_run(config)
