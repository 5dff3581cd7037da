"""The preference-loss family end to end on tiny, through experiments/preference_frontier.py:
every loss of train/preference_losses.LOSSES raises the gold reward over the SFT policy in
a short run; the experiment's points are the runs' own metrics and its frontier table is
the best point within each budget; reference-free losses never score the reference (a
count of the reference pass's forward batches); and the frontier's statistics on
hand-made points."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env

sys.path.insert(0, os.path.join(REPO, 'experiments'))
import preference_frontier as pf  # noqa: E402

# One strength per loss: 50 steps at lr 1e-3 on 256 prompts' pairs (1536). Measured
# (one seed, gain over SFT in units of the two evals' combined SE): dpo 4.3, ipo 4.1,
# ipo_mean 5.5, cdpo 3.8, robust_dpo 4.4, hinge 4.8, kto 5.0, orpo 3.7, simpo 5.2,
# apo_zero 5.0. ORPO needs a large lambda here: at 0.1-1 its SFT term holds it within
# KL 0.8 of the SFT policy and the gain is 1-2 SE; IPO's summed target margin needs a small
# tau for the same reason (tau 0.05: 2.9 SE).
FAMILY = {'dpo': 0.1, 'ipo': 0.02, 'ipo_mean': 0.1, 'cdpo': 0.1, 'robust_dpo': 0.1,
          'hinge': 0.1, 'kto': 0.1, 'orpo': 10.0, 'simpo': 2.0, 'apo_zero': 0.1}


@pytest.fixture(scope='module')
def family(chain, tmp_path_factory):
  out = tmp_path_factory.mktemp('frontier') / 'out'
  cmd = [sys.executable, os.path.join('experiments', 'preference_frontier.py'),
         f'--sft_run={chain["sft"]}', f'--out={out}', '--sets=t0.1', '--seeds=1',
         '--strengths=' + ','.join(f'{k}={v}' for k, v in FAMILY.items()),
         '--dpo_steps=50', '--evals=1', '--set=dpo.optim.lr=1e-3',
         '--set=rm.prefs.num_prompts=256', '--set=rm.train.steps=20', '--kl_coefs=', '--ns=']
  result = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def _evals(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if 'policy/gold_reward' in r]


def _run_dir(out, loss):
  from rlhf_jax.train.preference_losses import LOSSES
  return out / 't0.1' / 'seed0' / f'{loss}_{LOSSES[loss].strength}{FAMILY[loss]:g}'


def test_every_loss_raises_gold_reward_over_sft(family):
  for loss in FAMILY:
    first, last = (lambda e: (e[0], e[-1]))(_evals(_run_dir(family, loss)))
    assert first['step'] == 0 and last['step'] == 50
    se = math.hypot(first['policy/gold_reward_se'], last['policy/gold_reward_se'])
    gain = last['policy/gold_reward'] - first['policy/gold_reward']
    assert gain > 3 * se, (loss, gain, se)
    assert last['policy/kl_ref'] > 0.3, loss
  # Every run started from the same SFT policy measured on the same prompts and key.
  starts = {_evals(_run_dir(family, l))[0]['policy/gold_reward'] for l in FAMILY}
  assert len(starts) == 1
  config = json.load(open(_run_dir(family, 'simpo') / 'config.json'))
  assert config['dpo']['gamma'] == pytest.approx(pf.SIMPO_GAMMA_OVER_BETA * 2.0)
  assert config['prefs']['dir'] == str(family / 't0.1' / 'seed0' / 'rm' / 'preferences')


def test_points_are_the_runs_metrics_and_the_frontier_their_best_within_budget(family):
  with open(family / 'points.csv') as f:
    points = list(csv.DictReader(f))
  sft = [p for p in points if p['method'] == 'sft']
  assert len(sft) == 1 and float(sft[0]['kl']) == 0.0
  assert float(sft[0]['gold']) == pytest.approx(
      _evals(_run_dir(family, 'dpo'))[0]['policy/gold_reward'])
  by_method = {p['method']: p for p in points if p['method'] != 'sft'}
  assert set(by_method) == set(FAMILY)
  for loss, p in by_method.items():
    last = _evals(_run_dir(family, loss))[-1]
    assert float(p['gold']) == pytest.approx(last['policy/gold_reward'])
    assert float(p['kl']) == pytest.approx(max(last['policy/kl_ref'], 0.0))
  with open(family / 'frontier.csv') as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    inside = [float(p['gold']) for p in points if p['method'] == r['method']
              and float(p['kl']) <= float(r['budget'])]
    if inside:
      assert float(r['gold_mean']) == pytest.approx(max(inside))
      assert r['seeds_inside'] == '1'
    else:
      assert r['gold_mean'] == 'nan' and r['seeds_inside'] == '0'
  assert (family / 'frontier.png').stat().st_size > 10_000


# Run in a one-device process, as the family's runs were, so that its programs are theirs
# (the session's compilation cache has them) instead of new 8-device ones.
COUNT_REFERENCE_FORWARDS = """
import json, sys
from rlhf_jax.config import load_named
from rlhf_jax.stages import dispatch, dpo
sft, prefs, out = sys.argv[1:]
forwards, real = [], dpo.reference_logprobs
def counting(logprobs, *args, **kwargs):
  def counted(*a):
    forwards.append(1)
    return logprobs(*a)
  return real(counted, *args, **kwargs)
dpo.reference_logprobs = counting
counts = {}
for loss in ('simpo', 'kto'):
  config = load_named('dpo', 'tiny_' + loss)
  config.init.run, config.prefs.dir = sft, prefs
  config.policy_eval.num_prompts = 16
  config.train.update(steps=1, eval_every=1, ckpt_every=1, progress=False)
  forwards.clear()
  dispatch.run(config, out + '/' + loss)
  counts[loss] = len(forwards)
print(json.dumps(counts))
"""


def test_reference_free_losses_never_score_the_reference(chain, family, tmp_path):
  """The reference pass's forward batches, counted: none for SimPO; for KTO two passes over
  every pair (the pairs, then the mismatched partners)."""
  from rlhf_jax.data import preferences
  prefs = family / 't0.1' / 'seed0' / 'rm' / 'preferences'
  pairs = len(preferences.read(str(prefs))[0])
  result = subprocess.run([sys.executable, '-c', COUNT_REFERENCE_FORWARDS, chain['sft'],
                           str(prefs), str(tmp_path)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  counts = json.loads(result.stdout.strip().splitlines()[-1])
  assert counts == {'simpo': 0, 'kto': 2 * math.ceil(pairs / 32)}


def test_frontier_and_winners_on_hand_made_points():
  # Two methods, three seeds; a's points: (kl, gold) per seed.
  pts = []
  for seed, (a, b) in enumerate([([(1, 0.5), (4, 0.9)], [(1.5, 0.4), (3, 0.6)]),
                                 ([(1, 0.6), (6, 1.2)], [(1.8, 0.5), (4, 0.7)]),
                                 ([(3, 0.7), (4, 0.8)], [(1.0, 0.45), (9, 0.9)])]):
    pts += [{'set': 's', 'seed': seed, 'method': 'a', 'kl': k, 'gold': g} for k, g in a]
    pts += [{'set': 's', 'seed': seed, 'method': 'b', 'kl': k, 'gold': g} for k, g in b]
  rows = {(r['method'], r['budget']): r for r in pf.frontier(pts, [2, 5])}
  # Budget 2: a has no point inside on seed 2; b's best per seed 0.4, 0.5, 0.45.
  assert rows['a', 2]['seeds_inside'] == 2 and rows['a', 2]['gold_mean'] == pytest.approx(0.55)
  from scipy import stats
  b2 = np.array([0.4, 0.5, 0.45])
  assert rows['b', 2]['gold_mean'] == pytest.approx(b2.mean())
  assert rows['b', 2]['gold_ci95'] == pytest.approx(
      stats.t.ppf(0.975, 2) * b2.std(ddof=1) / np.sqrt(3))
  # Budget 5: a 0.9, 0.6, 0.8; b 0.6, 0.7, 0.45: a wins; paired differences 0.3, -0.1, 0.35
  # have a 95% interval holding 0, so b is tied within the noise. At budget 2 only b has
  # every seed inside, so it is the winner alone.
  wins = {w['budget']: w for w in pf.winners(list(rows.values()))}
  assert wins[5]['winner'] == 'a' and wins[5]['tied_within_noise'] == 'b'
  assert wins[2]['winner'] == 'b' and wins[2]['tied_within_noise'] == ''
  one = pf.winners(pf.frontier([p for p in pts if p['seed'] == 0], [5]))
  assert one[0]['winner'] == 'a' and one[0]['tied_within_noise'] == 'unknown (one seed)'


def test_best_of_n_points_are_its_gain_placed_at_the_common_sft_point():
  rows = [{'n': '1', 'kl_bound': '0.0', 'gold_of_proxy_best': '0.40',
           'gold_of_proxy_best_ci95': '0.05'},
          {'n': '4', 'kl_bound': '0.636', 'gold_of_proxy_best': '0.55',
           'gold_of_proxy_best_ci95': '0.04'}]
  pts = pf.points_of('s', 0, 'best_of_n', '', rows, sft_gold=0.30)
  assert [p['setting'] for p in pts] == ['n=1', 'n=4']
  assert [p['gold'] for p in pts] == pytest.approx([0.30, 0.45])
  assert pts[1]['kl'] == pytest.approx(np.log(4) - 3 / 4, abs=1e-3)


@pytest.mark.parametrize('argv, mention', [
    (['--sets=x1'], "'x1' is not t<temperature>"),
    (['--losses=dpo,foo'], 'foo not in'),
    (['--strengths=dpo=0.1/x'], '--strengths dpo'),
    (['--set=dpo.optim.lrr=1'], 'has no field optim.lrr'),
    (['--set=dpo.dpo.epsilon=0.7'], 'dpo.epsilon=0.7'),
    (['--ns=2,4'], 'hold 1'),
    (['--shard=2/2'], '--shard=2/2'),
])
def test_bad_input_is_one_error_line_and_writes_nothing(argv, mention, tmp_path, capsys):
  out = tmp_path / 'out'
  with pytest.raises(SystemExit) as e:
    pf.main([f'--out={out}', '--sft_run=runs/does_not_matter_here', *argv])
  lines = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith('error: ')
  assert mention in lines[0], lines
  assert not out.exists()


def test_the_rounds_loop_takes_every_loss_and_refuses_an_unknown_one():
  """Online iterative DPO (rlhf_rounds:tiny_dpo: each round's pairs sampled from the current
  policy, which is also the round's reference) runs the DPO stage, so every loss of the
  family is one override away; a name outside the registry is refused before any compute."""
  from conftest import load_config
  from rlhf_jax import config as config_lib
  from rlhf_jax.errors import UserError
  from rlhf_jax.train.preference_losses import LOSSES
  config = load_config('rlhf_rounds', 'tiny_dpo')
  assert config.rounds.policy_update == 'dpo'
  for loss in LOSSES:
    config.stages.dpo.dpo.loss = loss
    config_lib.validate(config)
  config.stages.dpo.dpo.loss = 'slic'
  with pytest.raises(UserError) as e:
    config_lib.validate(config)
  assert "dpo.loss='slic' is not one of" in str(e.value) and 'stages.dpo' in str(e.value)
