"""The `text:PATH` source: reading files, the tokenizer, and resumable batches."""
import json
import os

import numpy as np
import pytest

from rlhf_jax.data import corpus as corpus_lib
from rlhf_jax.data import packing
from rlhf_jax.data import text_files
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

_SYLLABLES = ['ka', 'lo', 'mi', 'nu', 'sa', 'te', 'vo', 'ri', 'pe', 'do', 'gu',
              'zen', 'bar', 'qui', 'ost', 'ell']


def _sentences(rng, count):
  words = [''.join(rng.choice(_SYLLABLES, size=rng.integers(1, 4)))
           for _ in range(200)]
  return [' '.join(rng.choice(words, size=rng.integers(3, 12))).capitalize() + '.'
          for _ in range(count)]


def _write_corpus(root, *, seed=0, num_files=6, docs_per_file=12):
  """Fortune-format files; returns the documents in reading order."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  documents = []
  for f in range(num_files):
    docs = ['\n'.join(_sentences(rng, int(rng.integers(1, 5))))
            for _ in range(docs_per_file)]
    documents.extend(docs)
    with open(os.path.join(root, f'part{f:02d}.txt'), 'w') as out:
      out.write('\n%\n'.join(docs) + '\n')
  return documents


# -- reading files -------------------------------------------------------------


def test_split_documents_rule():
  text = ('\n\nfirst line\nsecond\n\nsame doc, new paragraph\n%\n'
          'second doc\r\n\r\n\r\nthird doc\n  \n\t\n\n%  \n\n%\nlast\n\n')
  assert text_files.split_documents(text=text) == [
      'first line\nsecond\n\nsame doc, new paragraph',
      'second doc',
      'third doc',
      'last',
  ]
  # '%' inside a line or with text beside it is just text.
  assert text_files.split_documents(text='50%\n% off\n') == ['50%\n% off']


def test_invalid_bytes_are_counted(tmp_path):
  # 1 + 2 + 2 bad bytes: a Latin-1 byte, two stray bytes, a cut 3-byte sequence.
  (tmp_path / 'a.txt').write_bytes(b'caf\xe9 ok\nprice 5\xe2\x82\n')
  (tmp_path / 'b.txt').write_bytes('\u20ac fine\n'.encode() + b'\xff\xfe x\n')
  found = text_files.read_text_documents(path=str(tmp_path))
  assert found.invalid_bytes_replaced == 5
  assert found.documents == ['caf\ufffd ok\nprice 5\ufffd', '\u20ac fine\n\ufffd\ufffd x']
  assert found.skipped_files == []


def test_binary_and_duplicate_files_are_skipped(tmp_path):
  documents = _write_corpus(tmp_path / 'sub', num_files=2, docs_per_file=3)
  (tmp_path / 'index.dat').write_bytes(b'\x00\x00\x00\x02' + b'%' * 100)
  rng = np.random.default_rng(0)
  (tmp_path / 'noise.bin').write_bytes(bytes(rng.integers(0x80, 0x100, 4000)))
  os.symlink(tmp_path / 'sub' / 'part00.txt', tmp_path / 'sub' / 'part00.u8')
  (tmp_path / '.hidden').write_text('never read\n')
  found = text_files.read_text_documents(path=str(tmp_path))
  assert found.documents == documents
  assert [os.path.basename(p) for p, _ in found.skipped_files] == [
      'index.dat', 'noise.bin', 'part00.u8']
  assert found.invalid_bytes_replaced == 0
  assert len(found.files_read) == 2


def test_fortunes_folder_if_installed():
  root = '/usr/share/games/fortunes'
  if not os.path.isdir(root):
    # CI installs it (.ci/run): a skip there would hide that the test never ran.
    (pytest.fail if os.environ.get('CI') else pytest.skip)('Debian fortunes package not installed')
  found = text_files.read_text_documents(path=root)
  assert not any(p.endswith('.dat') for p in found.files_read)
  assert len(found.documents) > 1000


@pytest.mark.parametrize('make', ['missing', 'empty_dir', 'only_binary', 'blank'])
def test_bad_text_paths_raise(tmp_path, make):
  path = tmp_path / 'data'
  if make == 'empty_dir':
    path.mkdir()
  elif make == 'only_binary':
    path.mkdir()
    (path / 'x.dat').write_bytes(b'\x00\x01\x02')
  elif make == 'blank':
    path.write_text('\n\n%\n  \n')
  with pytest.raises(UserError, match='data'):
    text_files.read_text_documents(path=str(path))
  with pytest.raises(UserError):
    text_files.read_text_documents(path='')


# -- tokenizer -----------------------------------------------------------------


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  return str(root), _write_corpus(root)


@pytest.fixture(scope='module')
def tokenizer(corpus_dir, tmp_path_factory):
  model_path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.model')
  return tokenizer_lib.train_or_load_tokenizer(
      texts=corpus_dir[1], model_path=model_path, vocab_size=400)


def test_tokenizer_round_trip_and_special_ids(corpus_dir, tokenizer):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
          tokenizer.unk_id) == (0, 1, 2, 3)
  assert 260 < tokenizer.vocab_size <= 400
  samples = ['Kalomi nuzen bar.', '  two  spaces\tand tab\n\nnew  lines ',
             'Unseen: caf\u00e9 \u00fcber \u6f22\u5b57 \U0001F642 \ufffd', '']
  for text in samples:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
  assert tokenizer.encode_batch(samples) == [tokenizer.encode(t) for t in samples]
  # Pieces were learnt from the corpus: its text takes far fewer ids than bytes.
  text = corpus_dir[1][0]
  assert len(tokenizer.encode(text)) < len(text.encode()) / 2


def test_tokenizer_reload_and_determinism(corpus_dir, tokenizer, tmp_path):
  again = tokenizer_lib.train_or_load_tokenizer(
      texts=[], model_path=tokenizer.model_path, vocab_size=400)
  text = '\n'.join(corpus_dir[1][:5])
  assert again.encode(text) == tokenizer.encode(text)
  retrained_path = str(tmp_path / 'tokenizer.model')
  tokenizer_lib.train_or_load_tokenizer(
      texts=corpus_dir[1], model_path=retrained_path, vocab_size=400)
  with open(retrained_path, 'rb') as a, open(tokenizer.model_path, 'rb') as b:
    assert a.read() == b.read()
  assert os.listdir(tmp_path) == ['tokenizer.model']  # No temp file left.


def test_a_small_corpus_tokenizer_reloads_with_the_size_asked(tmp_path):
  """A corpus too small for vocab_size gives fewer pieces; the same vocab_size loads it
  again (a resumed text run), another is still refused."""
  words = ('alpha', 'beta', 'gamma', 'delta', 'eps')
  texts = [' '.join(words[(i * 7 + j) % 5] for j in range(20)) for i in range(50)]
  path = str(tmp_path / 'tokenizer.model')
  first = tokenizer_lib.train_or_load_tokenizer(texts=texts, model_path=path, vocab_size=400)
  assert first.vocab_size < 400  # the corpus's own size, not the one asked for
  again = tokenizer_lib.train_or_load_tokenizer(texts=[], model_path=path, vocab_size=400)
  assert again.vocab_size == first.vocab_size
  assert again.encode(texts[3]) == first.encode(texts[3])
  with pytest.raises(UserError, match='vocab_size=400'):
    tokenizer_lib.train_or_load_tokenizer(texts=[], model_path=path,
                                          vocab_size=first.vocab_size)


def test_tokenizer_errors(tokenizer, tmp_path):
  with pytest.raises(UserError, match='vocab_size=500'):
    tokenizer_lib.train_or_load_tokenizer(
        texts=[], model_path=tokenizer.model_path, vocab_size=500)
  with pytest.raises(UserError, match='empty'):
    tokenizer_lib.train_or_load_tokenizer(
        texts=['', '\n'], model_path=str(tmp_path / 'a.model'), vocab_size=400)
  with pytest.raises(UserError, match='vocab_size=50'):
    tokenizer_lib.train_or_load_tokenizer(
        texts=['tiny text'], model_path=str(tmp_path / 'b.model'), vocab_size=50)
  (tmp_path / 'c.model').write_bytes(b'not a model')
  with pytest.raises(UserError, match='c.model'):
    tokenizer_lib.train_or_load_tokenizer(
        texts=['x'], model_path=str(tmp_path / 'c.model'), vocab_size=400)
  assert not (tmp_path / 'a.model').exists()
  assert not (tmp_path / 'b.model').exists()


# -- corpus source -------------------------------------------------------------


_BATCH = 7  # Not a divisor of the row count, so batches straddle epochs.


def _source(corpus_dir, workdir, **overrides):
  kwargs = dict(source=f'text:{corpus_dir[0]}', workdir=str(workdir),
                seq_len=32, batch_size=_BATCH, seed=0, vocab_size=400,
                eval_fraction=0.1, tfds_split='train', tfds_eval_split=None,
                tfds_data_dir=None, text_key='text')
  kwargs.update(overrides)
  return corpus_lib.make_corpus_source(**kwargs)


def _rows(batch):
  """The full `[B, T+1]` token rows a batch was cut from."""
  return np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1)


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for field in ('inputs', 'targets', 'weights', 'segment_ids', 'positions'):
      np.testing.assert_array_equal(getattr(x, field), getattr(y, field))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp('run')


def test_corpus_stats_and_split(corpus_dir, workdir):
  source = _source(corpus_dir, workdir)
  documents = corpus_dir[1]
  assert source.world is None
  assert source.vocab_size == source.tokenizer.vocab_size
  assert os.path.exists(os.path.join(workdir, 'tokenizer.model'))
  train_idx, eval_idx = corpus_lib.split_train_eval(
      num_documents=len(documents), eval_fraction=0.1, seed=0)
  assert len(eval_idx) == round(0.1 * len(documents))
  assert sorted(set(train_idx) | set(eval_idx)) == list(range(len(documents)))
  tok = source.tokenizer
  stats = source.stats
  assert stats['documents'] == len(documents)
  assert stats['eval_documents'] == len(eval_idx)
  assert stats['train_tokens'] == sum(len(tok.encode(documents[i])) for i in train_idx)
  assert stats['eval_tokens'] == sum(len(tok.encode(documents[i])) for i in eval_idx)
  assert stats['invalid_bytes_replaced'] == 0 and stats['skipped_files'] == 0

  batch = source.next_batch()
  assert batch.inputs.shape == (_BATCH, 32) and batch.inputs.dtype == np.int32
  # Eval batches hold every held-out target once: len(ids) + EOS per document.
  eval_batches = source.eval_batches(max_batches=1000)
  total = sum(float(b.weights.sum()) for b in eval_batches)
  assert total == sum(len(tok.encode(documents[i])) + 1 for i in eval_idx)
  assert all(b.inputs.shape == (_BATCH, 32) for b in eval_batches)
  last = eval_batches[-1]
  padded = stats['eval_rows'] % _BATCH
  if padded:
    assert np.all(last.weights[padded:] == 0)
  _assert_same_batches(eval_batches, source.eval_batches(max_batches=1000))
  assert len(source.eval_batches(max_batches=1)) == 1


def test_every_row_once_per_epoch(corpus_dir, workdir):
  source = _source(corpus_dir, workdir)
  documents = corpus_dir[1]
  train_idx, _ = corpus_lib.split_train_eval(
      num_documents=len(documents), eval_fraction=0.1, seed=0)
  tok = source.tokenizer
  expected = packing.pack_documents(
      documents=[tok.encode(documents[i]) for i in train_idx], seq_len=32,
      bos_id=1, eos_id=2, pad_id=0).tokens
  num_rows = len(expected)
  assert num_rows == source.stats['train_rows'] and num_rows % _BATCH != 0
  seen = np.concatenate(
      [_rows(source.next_batch()) for _ in range(-(-3 * num_rows // _BATCH))])
  key = lambda rows: sorted(map(tuple, rows.tolist()))
  epochs = [seen[e * num_rows:(e + 1) * num_rows] for e in range(3)]
  for rows in epochs:
    assert key(rows) == key(expected)
  assert not np.array_equal(epochs[0], epochs[1])


def test_state_resumes_exact_batches_across_epochs(corpus_dir, workdir):
  source = _source(corpus_dir, workdir)
  num_rows = source.stats['train_rows']
  # Stop where the next batch straddles the end of epoch 0.
  for _ in range(num_rows // _BATCH):
    source.next_batch()
  state = source.get_state()
  assert state['epoch'] == 0 and state['index'] + _BATCH > num_rows
  assert state == json.loads(json.dumps(state))
  following = [source.next_batch() for _ in range(num_rows // _BATCH)]
  assert source.get_state()['epoch'] == 1

  resumed = _source(corpus_dir, workdir)  # A fresh process would do this.
  resumed.set_state(state)
  _assert_same_batches(following, [resumed.next_batch() for _ in following])
  source.set_state(state)  # Rewinding the same object works too.
  _assert_same_batches(following[:3], [source.next_batch() for _ in range(3)])


def test_seeds_change_the_order(corpus_dir, workdir):
  first = _rows(_source(corpus_dir, workdir).next_batch())
  assert np.array_equal(first, _rows(_source(corpus_dir, workdir).next_batch()))
  other = _rows(_source(corpus_dir, workdir, seed=1).next_batch())
  assert not np.array_equal(first, other)


def test_corpus_errors(corpus_dir, workdir, tmp_path):
  with pytest.raises(UserError, match='batch_size'):
    _source(corpus_dir, workdir, batch_size=10_000)
  with pytest.raises(UserError, match='unknown data source'):
    _source(corpus_dir, workdir, source='csv:/x')
  with pytest.raises(UserError, match='does not exist'):
    _source(corpus_dir, workdir, source=f'text:{tmp_path}/missing')
  source = _source(corpus_dir, workdir)
  with pytest.raises(UserError, match='training rows'):
    source.set_state({'epoch': 0, 'index': 0, 'train_rows': 1})
  with pytest.raises(UserError):
    source.set_state({'epoch': 'x'})
  one_file = tmp_path / 'one.txt'
  one_file.write_text('only one document\n')
  with pytest.raises(UserError, match='at least 2 documents'):
    _source(corpus_dir, tmp_path / 'w', source=f'text:{one_file}')
