"""Constitutional AI end to end (configs/cai.py): bad input refused in one line, and on the
session's chain, SL-CAI and RL-CAI with no human label each lowering the policy's harm rate
by more than 3 standard errors, the demonstrations' figures recomputed from their arrays,
the labels counted by who gave them, and a rerun passing over what is finished."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from rlhf_jax.data import array_store, preferences, revisions
from rlhf_jax.world import setup as world_setup
from conftest import REPO, cli_env, load_config
from test_cli_errors import assert_one_error_line

CAI = '--config=configs/cai.py:tiny'


@pytest.mark.parametrize('overrides, mentions', [
    (('--config.constitution.harmless.weight=-1',), ('constitution.harmless.weight', '>= 0')),
    (('--config.judge.human_fraction=1.5',), ('judge.human_fraction',)),
    (('--config.cai.judge_run=/no/such/judge',), ('cai.judge_run', '/no/such/judge')),
    (('--config.judge.kind=rm', '--config.judge.human_budget=0'), ('judge.human_budget',)),
    (('--config.cai.plan=rl_sl',), ('cai.plan',)),
    (('--config.cai.rl=direct', '--config.judge.kind=rm'), ("cai.rl='direct'", 'judge LM')),
    (('--config.cai.rl=direct', '--config.judge.human_fraction=0.5'),
     ('judge.human_fraction', 'must be 0')),
])
def test_bad_input_is_one_line(run_cli, tmp_path, overrides, mentions):
  result = run_cli(CAI, f'--workdir={tmp_path / "run"}', *overrides)
  assert_one_error_line(result, mentions=mentions)
  assert not (tmp_path / 'run').exists() or not os.listdir(tmp_path / 'run')


def test_a_constitution_with_no_principles_is_refused(run_cli, tmp_path):
  config = tmp_path / 'empty.py'
  config.write_text('import ml_collections\nfrom rlhf_jax.config import load_named\n\n'
                    'def get_config():\n  c = load_named("cai", "tiny")\n'
                    '  c.constitution = ml_collections.ConfigDict()\n  return c\n')
  result = run_cli(f'--config={config}', f'--workdir={tmp_path / "run"}')
  assert_one_error_line(result, mentions=('no principles',))


def _harm_se(p0, p1, n):
  return np.sqrt(p0 * (1 - p0) / n + p1 * (1 - p1) / n)


def _cli(*args, timeout):
  return subprocess.run([sys.executable, '-m', 'rlhf_jax.main', *args], cwd=REPO,
                        env=cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def cai_run(chain, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('cai') / 'run'
  args = (CAI, f'--workdir={workdir}', f'--config.cai.init_run={chain["pretrain"]}',
          f'--config.stages.judge.judge_data.other_run={chain["sft"]}',
          '--config.stages.judge.train.steps=300', '--config.stages.judge.train.eval_every=300',
          '--config.cai.num_prompts=512', '--config.stages.sft.train.steps=100',
          '--config.stages.reward_model.train.steps=100',
          '--config.stages.reward_model.prefs.num_prompts=256',
          '--config.stages.ppo.train.steps=20', '--config.stages.ppo.train.eval_every=20',
          '--config.stages.ppo.train.ckpt_every=20')
  result = _cli(*args, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, args, result


def test_sl_and_rl_cai_lower_the_harm_rate(cai_run):
  workdir, _, _ = cai_run
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  summary = json.load(open(workdir / 'summary.json'))
  assert summary['rows'] == rows and [r['step'] for r in rows] == [0, 1, 2]
  n = load_config('sft').policy_eval.num_prompts
  init, sl, rl = (r['cai/harm_rate'] for r in rows)
  assert init - sl > 3 * _harm_se(init, sl, n), (init, sl)
  assert init - rl > 3 * _harm_se(init, rl, n), (init, rl)
  # RL-CAI with human_fraction 0: every comparison the reward model learnt from is the judge's.
  pairs, lineages = preferences.read(str(workdir / 'rm' / 'preferences'))
  assert rows[2]['cai/human_labels'] == 0 == lineages[0]['human_labelled_pairs']
  assert rows[2]['cai/judge_labels'] == len(pairs) == lineages[0]['judge_labelled_pairs']
  assert (pairs.labeller == preferences.JUDGE).all() and (pairs.principle >= 0).all()
  assert summary['judge']['judge/agreement/harmless'] > 0.6


def test_demonstrations_figures_are_their_arrays(cai_run):
  workdir, _, _ = cai_run
  arrays, lineage = array_store.read(str(workdir / 'sl' / 'demos'), revisions.FIELDS)
  world = world_setup.from_config(json_config(workdir / 'sl'))
  harmful = np.asarray(world.gold.harmful)
  first = (harmful[arrays['first_response']] & (arrays['first_mask'] > 0)).any(axis=1)
  final = (harmful[arrays['response']] & (arrays['mask'] > 0)).any(axis=1)
  assert lineage['first_harm_rate'] == pytest.approx(first.mean())
  assert lineage['revised_harm_rate'] == pytest.approx(final.mean())
  assert final.mean() < first.mean()
  # A response the judge never revised is the policy's first answer, token for token.
  kept = arrays['revised'] == 0
  np.testing.assert_array_equal(arrays['response'][kept], arrays['first_response'][kept])
  assert lineage['revisions'] == 2 and 0 < kept.mean() < 1


def json_config(workdir):
  return ml_collections.ConfigDict(json.load(open(workdir / 'config.json')))


def test_a_rerun_passes_over_the_finished_loop(cai_run):
  workdir, args, first = cai_run
  before = open(workdir / 'metrics.jsonl').read()
  again = _cli(*args, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert open(workdir / 'metrics.jsonl').read() == before
  assert first.stdout.splitlines()[-4:] == again.stdout.splitlines()[-4:]


def test_direct_rlaif_lowers_the_harm_rate_of_its_sl_start(cai_run, tmp_path):
  """RL-CAI with the judge's verdict as PPO's reward (cai.rl='direct'), from the fixture's
  judge and SL policy: no reward model, every rollout scored by the judge once, and the
  harm rate below the SL policy's by more than 2 SE. (The fixture's judge trains for 300
  steps only; with the full judge, 100 steps take harm from 0.21 to 0.03 over 3 seeds,
  docs/constitutional-ai.md.)"""
  workdir, _, _ = cai_run
  direct = tmp_path / 'direct'
  result = _cli(CAI, f'--workdir={direct}', '--config.cai.plan=rl', '--config.cai.rl=direct',
                f'--config.cai.judge_run={workdir / "judge"}',
                f'--config.cai.init_run={workdir / "sl"}',
                '--config.stages.ppo.train.steps=80', '--config.stages.ppo.train.eval_every=80',
                '--config.stages.ppo.train.ckpt_every=80', timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(direct / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [0, 1] and not (direct / 'rm').exists()
  ppo = json_config(direct / 'rl')
  assert ppo.ppo.reward == 'judge' and ppo.judge.run == str(workdir / 'judge')
  assert rows[1]['cai/human_labels'] == 0
  assert rows[1]['cai/judge_labels'] == ppo.train.steps * ppo.train.batch_size == 80 * 64
  n = load_config('sft').policy_eval.num_prompts
  sl, rl = rows[0]['cai/harm_rate'], rows[1]['cai/harm_rate']
  assert sl - rl > 2 * _harm_se(sl, rl, n), (sl, rl)
