"""Pretraining on a local text file from the CLI: the held-out loss falls well below
what a unigram model of the same tokens can reach."""
import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.data.text_files import read_text_documents

SUBJECTS = ['the cat', 'a dog', 'my friend', 'the teacher', 'our neighbour', 'an old man']
VERBS = ['sees', 'likes', 'finds', 'follows', 'hears', 'greets']
OBJECTS = ['the garden', 'a red ball', 'the river', 'an apple', 'the quiet street', 'the moon']


def write_corpus(path, docs=300, seed=0):
  rng = np.random.default_rng(seed)
  pick = lambda xs: xs[rng.integers(len(xs))]
  text = '\n\n\n'.join(
      ' '.join(f'{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)}.'
               for _ in range(rng.integers(2, 6))) for _ in range(docs))
  path.write_text(text)


def unigram_entropy(workdir, corpus) -> float:
  """Entropy (nats/token) of the corpus's own token frequencies, EOS included: the best
  loss any model that ignores context can reach on it."""
  tok = load_tokenizer(model_path=os.path.join(workdir, 'tokenizer.model'))
  counts = np.zeros(tok.vocab_size)
  for doc in read_text_documents(path=str(corpus)).documents:
    np.add.at(counts, tok.encode(doc) + [tok.eos_id], 1)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_text_pretraining_learns_the_corpus(run_cli, tmp_path):
  corpus = tmp_path / 'corpus.txt'
  write_corpus(corpus)
  workdir = tmp_path / 'run'
  result = run_cli('--config=configs/pretrain.py:tiny', f'--workdir={workdir}',
                   f'--config.data.source=text:{corpus}', '--config.data.vocab_size=400',
                   '--config.train.steps=60', '--config.train.eval_every=20',
                   '--config.train.progress=False')
  assert result.returncode == 0, result.stderr[-2000:]
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['eval/loss'] for r in records if 'eval/loss' in r]
  config = json.loads((workdir / 'config.json').read_text())
  assert losses[0] > 0.9 * math.log(config['model']['vocab_size'])  # starts near uniform
  assert losses[-1] < 0.5 * unigram_entropy(workdir, corpus)
  assert all(b < a for a, b in zip(losses, losses[1:]))

  # Samples decode to text with the run's tokenizer, continuing the prompt.
  import ast
  import subprocess
  import sys
  from conftest import REPO, cli_env
  sampled = subprocess.run([sys.executable, '-m', 'rlhf_jax.sample', f'--workdir={workdir}',
                            '--num=4', '--prompt=the cat', '--max_new_tokens=24',
                            '--temperature=0.5'],
                           cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=300)
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  lines = sampled.stdout.strip().splitlines()
  assert lines[0].endswith("prompt: 'the cat'") and len(lines) == 5
  words = {w.strip('.') for phrase in SUBJECTS + VERBS + OBJECTS for w in phrase.split()}
  texts = [ast.literal_eval(line.split(') ', 1)[1]) for line in lines[1:]]
  said = [w.strip('.') for text in texts for w in text.split()]
  # After 60 steps, at temperature 0.5, most sampled words are words of the corpus.
  assert said and sum(w in words for w in said) >= 0.8 * len(said), texts


@pytest.mark.slow
def test_invalid_bytes_are_reported_in_metrics_and_the_first_line(run_cli, tmp_path):
  """Two text files with 4 and 3 bytes that are not UTF-8, and a binary file: step 0 of
  metrics.jsonl and the run's first line say 7 bytes replaced and 1 file skipped."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for name, docs, bad in (('a.txt', 200, 4), ('b.txt', 100, 3)):
    write_corpus(corpus / name, docs=docs, seed=len(name) + docs)
    data = (corpus / name).read_bytes()
    # After the first `bad` full stops: inside a sentence, never in a document break.
    (corpus / name).write_bytes(data.replace(b'.', b'.\xff', bad))
  (corpus / 'index.dat').write_bytes(bytes(range(256)) * 4)  # NUL bytes: skipped
  workdir = tmp_path / 'run'
  result = run_cli('--config=configs/pretrain.py:tiny', f'--workdir={workdir}',
                   f'--config.data.source=text:{corpus}', '--config.data.vocab_size=300',
                   '--config.train.steps=2', '--config.train.eval_every=2',
                   '--config.train.log_every=2', '--config.train.ckpt_every=2',
                   '--config.train.eval_batches=1', '--config.train.progress=False')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines()[0] == (
      f'data: 300 documents from text:{corpus} (7 invalid UTF-8 bytes replaced, '
      '1 files skipped)')
  first = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[0])
  assert first['step'] == 0
  assert first['data/invalid_bytes_replaced'] == 7 and first['data/skipped_files'] == 1
