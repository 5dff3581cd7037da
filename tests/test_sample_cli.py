"""`python -m rlhf_jax.sample` on a world run: the printed samples and their true
log-probabilities (checked against a plain-NumPy walk of the true chain), and bad input."""
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env
from rlhf_jax.world import language

SMALL = ('--config.model.d_model=32', '--config.model.d_ff=64', '--config.train.seq_len=32',
         '--config.train.batch_size=8', '--config.train.eval_batches=1',
         '--config.train.progress=False', '--config.train.steps=20')


def sample_cli(*args):
  return subprocess.run([sys.executable, '-m', 'rlhf_jax.sample', *args], cwd=REPO,
                        env=cli_env(1), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def world_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('world') / 'run'
  result = subprocess.run([sys.executable, '-m', 'rlhf_jax.main',
                           '--config=configs/pretrain.py:tiny', f'--workdir={workdir}', *SMALL],
                          cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


def true_logp_numpy(lang, ids) -> float:
  """Sum of log p(next | prev) along ids, from the sparse table, in float64."""
  succ, logp = np.asarray(lang.succ), np.asarray(lang.logp, np.float64)
  total = 0.0
  for prev, nxt in zip(ids[:-1], ids[1:]):
    hit = np.nonzero(succ[prev] == nxt)[0]
    total += logp[prev, hit[0]] if len(hit) else -math.inf
  return total


def test_samples_and_their_true_logprobs(world_run):
  result = sample_cli(f'--workdir={world_run}', '--num=6', '--max_new_tokens=12',
                      '--prompt=5 17', '--seed=3')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith(f'# {world_run}, checkpoint 20; prompt: <bos> 5 17')
  assert len(lines) == 7
  w = json.loads((world_run / 'config.json').read_text())['world']
  lang = language.make_language(seed=w['seed'], vocab_size=w['vocab_size'],
                                branching=w['branching'], zipf_a=w['zipf_a'],
                                eos_prob=w['eos_prob'])
  for i, line in enumerate(lines[1:]):
    m = re.match(r'\[(\d+)\] \((\d+) tokens, log p_model (\S+), log p_true (\S+)\) (.*)$', line)
    assert m and int(m.group(1)) == i, line
    names = {'<pad>': 0, '<bos>': 1, '<eos>': 2}
    ids = [names[t] if t in names else int(t) for t in m.group(5).split()]
    assert len(ids) == int(m.group(2)) and 1 <= len(ids) <= 12
    assert float(m.group(3)) < 0
    want = true_logp_numpy(lang, [17] + ids)
    got = float(m.group(4))
    assert (got == want == -math.inf) or abs(got - want) < 0.006, (line, want)
  # Same seed, same samples.
  again = sample_cli(f'--workdir={world_run}', '--num=6', '--max_new_tokens=12',
                     '--prompt=5 17', '--seed=3')
  assert again.stdout == result.stdout


@pytest.mark.parametrize('args, mentions', [
    (('--prompt=five',), 'token ids'),
    (('--prompt=1 99',), 'content tokens'),
    (('--step=7',), 'no checkpoint at step 7'),
    (('--top_k=-1',), 'top_k'),
    (('--num=0',), '--num'),
], ids=['words-for-world', 'id-outside-vocab', 'missing-step', 'bad-top-k', 'zero-num'])
def test_bad_input(world_run, args, mentions):
  result = sample_cli(f'--workdir={world_run}', *args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and mentions in lines[0], lines


def test_no_run_in_workdir(tmp_path):
  result = sample_cli(f'--workdir={tmp_path}')
  assert result.returncode == 2 and result.stderr.startswith('error: ')
  assert 'no config.json' in result.stderr and list(tmp_path.iterdir()) == []
