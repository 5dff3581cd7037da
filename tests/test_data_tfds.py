"""The `tfds:NAME` source, read through `tfds.data_source` without TensorFlow.

A tiny dataset is generated in array_record format into a temporary data_dir
by a builder that is deliberately not registered, so reading it goes through
the same files-only path as a dataset prepared on another machine.
"""
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import corpus as corpus_lib
from rlhf_jax.data import tfds_source
from rlhf_jax.errors import UserError

_NAME = 'rlhf_jax_tiny_text'
_WORDS = ['alpha', 'beta', 'gamma', 'delta', 'omega', 'sigma', 'kappa', 'zeta']
_BAD = b'bad \xff byte in one document'  # One invalid UTF-8 byte.


def _documents(split):
  rng = np.random.default_rng({'train': 0, 'test': 1}[split])
  count = {'train': 40, 'test': 8}[split]
  return [' '.join(rng.choice(_WORDS, size=rng.integers(5, 30)))
          for _ in range(count)]


with tfds.core.registered.skip_registration():

  class RlhfJaxTinyText(tfds.core.GeneratorBasedBuilder):
    """Plain-text documents with a nested title, for these tests only."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'text': tfds.features.Text(),
              'meta': {'title': tfds.features.Text()},
              'label': np.int64,
          }))

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {split: self._generate_examples(split) for split in ('train', 'test')}

    def _generate_examples(self, split):
      for i, text in enumerate(_documents(split)):
        if split == 'train' and i == 0:
          text = _BAD
        yield i, {'text': text, 'meta': {'title': f'{split} {i}'}, 'label': i}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  path = str(tmp_path_factory.mktemp('tfds'))
  builder = RlhfJaxTinyText(data_dir=path, file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return path


def test_reads_array_record_without_tensorflow(data_dir):
  texts = tfds_source.load_tfds_texts(
      name=_NAME, split='train', data_dir=data_dir, text_key='text')
  expected = _documents('train')
  expected[0] = _BAD.decode('utf-8', errors='replace')
  assert len(texts) == 40
  everything = list(texts)
  assert sorted(everything) == sorted(expected)  # TFDS shuffles records.
  assert texts.invalid_bytes_replaced == 1
  assert everything == [texts[i] for i in range(40)]  # Batched = single reads.
  assert texts[-1] == everything[-1] and texts[1:3] == everything[1:3]
  with pytest.raises(IndexError):
    texts[40]  # pylint: disable=pointless-statement
  titles = tfds_source.load_tfds_texts(
      name=_NAME, split='test', data_dir=data_dir, text_key='meta/title')
  assert sorted(titles) == sorted(f'test {i}' for i in range(8))
  split_slice = tfds_source.load_tfds_texts(
      name=_NAME, split='train[:10]', data_dir=data_dir, text_key='text')
  assert list(split_slice) == everything[:10]
  assert 'tensorflow' not in sys.modules


def test_mock_data_source():
  with tfds.testing.mock_data(num_examples=6):
    texts = tfds_source.load_tfds_texts(
        name='imdb_reviews', split='train', data_dir=None, text_key='text')
    again = tfds_source.load_tfds_texts(
        name='imdb_reviews', split='train', data_dir=None, text_key='text')
    assert len(texts) == 6
    assert all(isinstance(t, str) and t for t in texts)
    assert list(texts) == list(again)
    with pytest.raises(UserError, match="no text feature 'body'"):
      tfds_source.load_tfds_texts(
          name='imdb_reviews', split='train', data_dir=None, text_key='body')


def _source(data_dir, workdir, **overrides):
  kwargs = dict(source=f'tfds:{_NAME}', workdir=str(workdir), seq_len=16,
                batch_size=4, seed=0, vocab_size=300, eval_fraction=0.25,
                tfds_split='train', tfds_eval_split='test',
                tfds_data_dir=data_dir, text_key='text')
  kwargs.update(overrides)
  return corpus_lib.make_corpus_source(**kwargs)


def test_corpus_from_tfds_with_eval_split(data_dir, tmp_path):
  source = _source(data_dir, tmp_path)
  tok = source.tokenizer
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  stats = source.stats
  assert (stats['documents'], stats['train_documents'],
          stats['eval_documents']) == (48, 40, 8)
  assert stats['invalid_bytes_replaced'] == 1
  total = sum(float(b.weights.sum()) for b in source.eval_batches(max_batches=100))
  assert total == sum(len(tok.encode(t)) + 1 for t in _documents('test'))
  batch = source.next_batch()
  assert batch.inputs.shape == (4, 16)
  state = source.get_state()
  following = [source.next_batch() for _ in range(30)]
  source.set_state(state)
  for expected in following:
    np.testing.assert_array_equal(source.next_batch().inputs, expected.inputs)


def test_corpus_from_tfds_holds_out_a_fraction(data_dir, tmp_path):
  source = _source(data_dir, tmp_path, tfds_eval_split=None)
  assert (source.stats['train_documents'], source.stats['eval_documents']) == (30, 10)


@pytest.mark.parametrize('overrides, message', [
    (dict(name='no_such_dataset_xyz'), 'unknown tfds dataset'),
    (dict(split='validation'), 'Unknown split'),
    (dict(text_key='content'), "no text feature 'content'"),
    (dict(text_key='label'), 'is not text'),
    (dict(text_key='meta/author'), "no text feature 'meta/author'"),
    (dict(name='huggingface:foo'), 'namespaced'),
    (dict(name=''), 'needs a dataset name'),
])
def test_bad_tfds_inputs_raise(data_dir, overrides, message):
  kwargs = dict(name=_NAME, split='train', data_dir=data_dir, text_key='text')
  kwargs.update(overrides)
  with pytest.raises(UserError, match=message):
    tfds_source.load_tfds_texts(**kwargs)


def test_missing_data_dir_and_unprepared_dataset(tmp_path):
  with pytest.raises(UserError, match='data_dir does not exist'):
    tfds_source.load_tfds_texts(
        name=_NAME, split='train', data_dir=str(tmp_path / 'nope'),
        text_key='text')
  # A registered dataset that was never prepared locally: no download.
  with pytest.raises(UserError, match='not prepared'):
    tfds_source.load_tfds_texts(
        name='imdb_reviews', split='train', data_dir=str(tmp_path),
        text_key='text')
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_pretrains_on_tfds(data_dir, run_cli, tmp_path):
  """End to end from the command line: a fresh process reads the prepared files by name."""
  import json
  workdir = tmp_path / 'run'
  result = run_cli('--config=configs/pretrain.py:tiny', f'--workdir={workdir}',
                   f'--config.data.source=tfds:{_NAME}', f'--config.data.tfds_data_dir={data_dir}',
                   '--config.data.tfds_eval_split=test', '--config.data.vocab_size=300',
                   '--config.train.steps=30', '--config.train.batch_size=8',
                   '--config.train.seq_len=32', '--config.train.eval_every=30',
                   '--config.train.progress=False')
  assert result.returncode == 0, result.stderr[-2000:]
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['eval/loss'] for r in records if 'eval/loss' in r]
  assert losses[-1] < 0.6 * losses[0]
  assert (workdir / 'tokenizer.model').exists()
