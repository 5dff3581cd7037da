"""The Transformer collapse loop from the CLI (configs/collapse.py), small and short:

- on the tiny world over 5 generations, replace raises the true KL every generation and
  lowers the tail mass, while accumulate keeps the true KL within 0.15 nats/token of
  generation 0;
- each schedule trains generation g on the rows it should (replace: the newest samples;
  accumulate: real + all samples; mix: fresh real + samples), with lineage;
- the loop's true KL and perplexity equal the pretraining evaluator's (another code path:
  the world's token log-probs against the model's target log-probs) on the same rows, and
  its sample and data statistics equal a plain-Python count of the stored rows;
- a loop stopped mid-generation (a checkpoint and the summaries removed) resumes to the same
  numbers; a text corpus runs the same loop without a true KL; bad fields exit 2.
"""
import collections
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env

SMALL = ['--config=configs/collapse.py:tiny', '--config.train.progress=False',
         '--config.train.steps=10', '--config.train.eval_every=10', '--config.train.ckpt_every=10',
         '--config.train.log_every=5', '--config.collapse.samples=96',
         '--config.collapse.heldout_rows=64', '--config.collapse.generations=2']


def metrics(workdir) -> list[dict]:
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def rows_of(path) -> np.ndarray:
  return np.load(os.path.join(path, 'rows.npy'))


def python_stats(rows) -> dict:
  """distinct-1/2, unigram entropy and mean length by counting in plain Python."""
  pairs, tokens = collections.Counter(), collections.Counter()
  for row in rows.tolist():
    for prev, nxt in zip(row, row[1:]):
      if nxt != 0 and prev not in (0, 2):
        pairs[prev, nxt] += 1
        tokens[nxt] += 1
  n = sum(tokens.values())
  entropy = -sum(c / n * math.log(c / n) for c in tokens.values())
  return {'distinct_1': len(tokens) / n, 'distinct_2': len(pairs) / n,
          'unigram_entropy': entropy, 'mean_length': n / len(rows)}


def check_stats(row: dict, prefix: str, rows) -> None:
  for name, value in python_stats(rows).items():
    assert row[f'collapse/{prefix}_{name}'] == pytest.approx(value, rel=1e-5), name


def parts(workdir, g) -> list[tuple]:
  spec = json.load(open(os.path.join(workdir, f'gen_{g}', 'data.json')))
  return [(p['path'], p['rows']) for p in spec['parts']]


# The evaluator scores all 8 held-out batches (not the default 4), so that its final
# figures can be checked against the loop's on the same rows; evaluation never feeds back
# into training, so the runs are otherwise as they were.
WORLD_LM = ['--config=configs/collapse.py:tiny', '--config.train.progress=False',
            '--config.train.steps=100', '--config.train.eval_every=100',
            '--config.train.ckpt_every=50', '--config.collapse.samples=512',
            '--config.collapse.heldout_rows=256', '--config.train.eval_batches=8',
            '--config.collapse.generations=4']


@pytest.fixture(scope='module')
def world_lm(tmp_path_factory):
  """Four generations of the tiny world's Transformer under replace and under accumulate,
  both run at once (two processes on the two cores)."""
  root = tmp_path_factory.mktemp('collapse')
  procs = {s: subprocess.Popen(
      [sys.executable, '-m', 'rlhf_jax.main', *WORLD_LM, f'--workdir={root / s}',
       f'--config.collapse.schedule={s}'], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for s in ('replace', 'accumulate')}
  for s, proc in procs.items():
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
  return {s: root / s for s in procs}


def test_world_lm_replace_collapses_and_accumulate_does_not(world_lm):
  """Measured (one seed): replace 0.164, 0.300, 0.428, 0.534 nats/token true KL and tail
  mass 0.078 -> 0.059 over generations 0..3; accumulate 0.164 -> 0.238 and 0.068. The margins below
  leave room for other CPUs' float rounding."""
  rep, acc = (metrics(world_lm[s]) for s in ('replace', 'accumulate'))
  kl = [r['collapse/true_kl'] for r in rep]
  assert all(b > a for a, b in zip(kl, kl[1:])), kl  # rises every generation
  assert kl[3] > kl[0] + 0.25
  assert rep[3]['collapse/tail_mass'] < rep[0]['collapse/tail_mass'] - 0.01
  # Generation 0 is the same run in both (same seed, same real rows).
  assert acc[0] == rep[0]
  # Accumulate stays within 0.15 nats/token of generation 0 (stated margin).
  assert acc[3]['collapse/true_kl'] < acc[0]['collapse/true_kl'] + 0.15
  assert acc[3]['collapse/true_kl'] < kl[3] - 0.2
  assert [r['collapse/data_rows'] for r in acc] == [512 * (g + 1) for g in range(4)]
  assert parts(world_lm['accumulate'], 3) == [('real', 512)] + [
      (f'gen_{k}/samples', 512) for k in range(3)]


def test_lineage_metrics_and_resume(world_lm, run_cli, tmp_path):
  workdir = world_lm['replace']
  rows = metrics(workdir)
  assert [r['step'] for r in rows] == list(range(4))
  assert parts(workdir, 0) == [('real', 512)]
  assert parts(workdir, 3) == [('gen_2/samples', 512)]
  lineage = json.load(open(workdir / 'gen_2' / 'samples' / 'lineage.json'))
  assert lineage['generation'] == 2 and lineage['checkpoint'] == 100
  assert lineage['model_run'].endswith('gen_2/model')
  check_stats(rows[0], 'real', np.load(workdir / 'real' / 'heldout.npy'))
  for g, row in enumerate(rows):
    check_stats(row, 'sample', rows_of(workdir / f'gen_{g}' / 'samples'))
    data = rows_of(workdir / 'real') if g == 0 else rows_of(workdir / f'gen_{g - 1}' / 'samples')
    check_stats(row, 'data', data)
    assert 0 < row['collapse/tail_mass'] < 1
  # The truth puts about a tenth of its mass on the tail (its share of expected transitions).
  assert 0.05 < rows[0]['collapse/true_tail_mass'] < 0.15

  # Stop generation 3 after its first checkpoint: drop its later checkpoint, samples and
  # summary; the same command finishes it to the same numbers.
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed)
  gen = resumed / 'gen_3'
  shutil.rmtree(gen / 'model' / 'checkpoints' / '100')
  shutil.rmtree(gen / 'samples')
  os.remove(gen / 'summary.json')
  result = run_cli(*WORLD_LM, f'--workdir={resumed}', '--config.collapse.schedule=replace')
  assert result.returncode == 0, result.stderr[-3000:]
  assert metrics(resumed) == rows
  np.testing.assert_array_equal(rows_of(gen / 'samples'), rows_of(workdir / 'gen_3' / 'samples'))


def test_true_kl_and_perplexity_match_the_pretraining_evaluator(world_lm):
  # The fixture's runs, not one of its own: the same check on every generation of both.
  for schedule in ('replace', 'accumulate'):
    workdir = world_lm[schedule]
    for g, row in enumerate(metrics(workdir)):
      # The evaluator scores the same 256 held-out rows (8 batches of 32) by another path:
      # the world's token log-probs against the model's target log-probs.
      evals = [json.loads(l) for l in open(workdir / f'gen_{g}' / 'model' / 'metrics.jsonl')]
      final = [e for e in evals if 'eval/true_kl' in e][-1]
      assert final['step'] == 100
      assert row['collapse/true_kl'] == pytest.approx(final['eval/true_kl'], abs=2e-5)
      assert row['collapse/perplexity'] == pytest.approx(final['eval/perplexity'], rel=2e-5)


@pytest.mark.slow
def test_mix_trains_on_fresh_real_and_samples(run_cli, tmp_path):
  schedule = 'mix'
  workdir = tmp_path / schedule
  result = run_cli(*SMALL, f'--workdir={workdir}', f'--config.collapse.schedule={schedule}',
                   '--config.collapse.generations=3', '--config.collapse.mix_fraction=0.25',
                   '--config.collapse.init=finetune')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = metrics(workdir)
  assert parts(workdir, 2) == [('gen_2/fresh', 24), ('gen_1/samples', 72)]
  fresh = rows_of(workdir / 'gen_2' / 'fresh')
  assert fresh.shape == (24, 65) and (fresh[:, 0] == 1).all()
  # Fresh real rows are new true samples, not the real pool again.
  assert not np.array_equal(fresh, rows_of(workdir / 'real')[:24])
  check_stats(rows[2], 'data', np.concatenate([fresh, rows_of(workdir / 'gen_1' / 'samples')[:72]]))
  assert [r['collapse/data_rows'] for r in rows] == [96, 96, 96]
  assert [r['collapse/data_real_rows'] for r in rows] == [96, 24, 24]


@pytest.mark.slow
def test_text_corpus_has_no_true_kl(run_cli, tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  rng = np.random.default_rng(0)
  words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'dog', 'ran', 'far', 'away', 'zebra']
  docs = [' '.join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(400)]
  text = '\n%\n'.join(docs).encode() + b'\n'
  # Five bytes that are not UTF-8: three lone 0xff and a 0xfe pair, inside documents.
  for pos, bad in ((100, b'\xff'), (900, b'\xff'), (2000, b'\xfe\xfe'), (3000, b'\xff')):
    text = text[:pos] + bad + text[pos:]
  (corpus / 'a.txt').write_bytes(text)
  (corpus / 'a.dat').write_bytes(bytes(range(256)) * 4)  # a binary index file, skipped
  workdir = tmp_path / 'text'
  result = run_cli(*SMALL, f'--workdir={workdir}', f'--config.data.source=text:{corpus}',
                   '--config.data.vocab_size=320', '--config.data.eval_fraction=0.2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[0] == (
      f'data: 400 documents from text:{corpus} (5 invalid UTF-8 bytes replaced, '
      '1 files skipped)')
  rows = metrics(workdir)
  assert all('collapse/true_kl' not in r for r in rows)
  assert rows[0]['data/invalid_bytes_replaced'] == 5 and rows[0]['data/skipped_files'] == 1
  # Generation 0 trains on collapse.samples of the 320 training documents, recorded as such.
  lineage = json.load(open(workdir / 'real' / 'lineage.json'))
  assert lineage['rows'] == 320 and lineage['selected_rows'] == 96
  assert parts(workdir, 0) == [('real', 96)]
  assert [r['collapse/data_real_rows'] for r in rows] == [96, 0]
  check_stats(rows[0], 'data', rows_of(workdir / 'real')[:96])
  heldout = np.load(workdir / 'real' / 'heldout.npy')
  check_stats(rows[0], 'real', heldout)
  evals = [json.loads(l) for l in open(workdir / 'gen_0' / 'model' / 'metrics.jsonl')]
  final = [e for e in evals if 'eval/perplexity' in e][-1]
  assert rows[0]['collapse/perplexity'] == pytest.approx(final['eval/perplexity'], rel=2e-5)


def distinct_docs(n, seed=0) -> list[str]:
  """n distinct short documents (well under a 65-token row, so no two rows coincide), with
  words enough to fill a 300-piece vocabulary (so the tokenizer reloads as is)."""
  rng = np.random.default_rng(seed)
  words = ('the cat sat on a mat dog ran far away zebra quietly under bright yellow '
           'window garden river stone market evening morning kettle lantern orchard '
           'pebble harbour meadow thunder velvet whisper').split()
  docs = {}
  while len(docs) < n:
    doc = ' '.join(rng.choice(words, size=rng.integers(3, 12)))
    docs[doc] = None
  return list(docs)


def numpy_text_tail(rows, vocab, fraction=0.1) -> set:
  """The rarest emitted tokens of `rows` (collapse_metrics' text tail), counted in NumPy."""
  prev, nxt = rows[:, :-1].ravel(), rows[:, 1:].ravel()
  counts = np.bincount(nxt[(nxt != 0) & (prev != 0) & (prev != 2)], minlength=vocab)
  ranked = sorted(range(2, vocab), key=lambda t: (counts[t], -t))  # rarest, then high id
  share = np.cumsum(counts[ranked]) / counts.sum()
  return set(ranked[:int((share <= fraction).sum())])


def test_text_real_rows_are_a_seeded_draw_and_set_the_tail(tmp_path):
  from conftest import load_config
  from rlhf_jax.data.corpus import split_train_eval
  from rlhf_jax.data.tokenizer import load_tokenizer
  from rlhf_jax.loops import collapse

  corpus = tmp_path / 'corpus.txt'
  docs = distinct_docs(400)
  corpus.write_text('\n%\n'.join(docs) + '\n')

  def real(name, *, seed=0, samples=96):
    config = load_config('collapse', 'tiny')
    config.seed = seed
    config.data.update(source=f'text:{corpus}', vocab_size=300, eval_fraction=0.2)
    config.collapse.samples = samples
    data, lineage = collapse.real_data(config, collapse.Paths(str(tmp_path / name)))
    return config, data, lineage

  def file_order_rows(name, seed):
    """The training documents' rows in file order, built here from the documents."""
    tok = load_tokenizer(model_path=str(tmp_path / name / 'real_tokenizer' / 'tokenizer.model'))
    train_idx, _ = split_train_eval(num_documents=len(docs), eval_fraction=0.2, seed=seed)
    rows = np.zeros((len(train_idx), 65), np.int32)
    for i, d in enumerate(train_idx):
      ids = [1, *tok.encode(docs[d]), 2]
      rows[i, :len(ids)] = ids
    return rows

  config, data, lineage = real('a')
  pool = file_order_rows('a', 0)
  index = {tuple(r): i for i, r in enumerate(pool.tolist())}
  assert len(index) == len(pool) == 320
  # The stored pool is every training document once, in a new order.
  order = [index[tuple(r)] for r in data.train.tolist()]
  assert sorted(order) == list(range(320))
  picked = order[:96]
  assert lineage['selected_rows'] == 96 and len(data.selected) == 96
  np.testing.assert_array_equal(data.selected, pool[picked])
  assert picked != list(range(96)) and max(picked) >= 96  # not the file prefix

  # Same seed: the same draw, whether read back (resume) or made afresh; another seed
  # draws other documents.
  _, again, _ = real('a')
  _, fresh, _ = real('b')
  np.testing.assert_array_equal(again.train, data.train)
  np.testing.assert_array_equal(fresh.selected, data.selected)
  _, other, _ = real('c', seed=1)
  assert ({tuple(r) for r in other.selected.tolist()} !=
          {tuple(r) for r in data.selected.tolist()})

  # The tail is the selected rows' rarest tokens, not the whole corpus's.
  v = data.vocab_size
  tail = np.asarray(collapse.Measure(config, data).tail)
  want = numpy_text_tail(pool[picked], v)
  assert want and set(np.flatnonzero(tail[0])) == want
  assert (tail == tail[0]).all()
  assert want != numpy_text_tail(pool, v)

  # A corpus with fewer training documents than collapse.samples trains on all of them,
  # and says so.
  _, small, lineage = real('d', samples=1000)
  assert lineage['selected_rows'] == len(small.selected) == 320


@pytest.mark.parametrize('override, message', [
    ('--config.collapse.schedule=bogus', 'collapse.schedule'),
    ('--config.collapse.mix_fraction=2.0', 'collapse.mix_fraction'),
    ('--config.collapse.init=warm', 'collapse.init'),
    ('--config.collapse.temperature=0.0', 'collapse.temperature'),
])
def test_bad_fields(override, message, run_cli, tmp_path):
  result = run_cli(*SMALL, f'--workdir={tmp_path / "bad"}', override)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0]
