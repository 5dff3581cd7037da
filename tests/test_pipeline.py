"""The main job, configs/pipeline.py: pretrain -> SFT -> reward model -> PPO in one command
(shortened stages), each stage chained to the one before; its summary table equals what
each stage's own metrics.jsonl says; a rerun trains nothing more and prints the same
table; a changed stage config is refused with one error line."""
import json
import os

import pytest

SHORT = ['--config=configs/pipeline.py:tiny', '--config.stages.pretrain.train.steps=40',
         '--config.stages.sft.train.steps=20', '--config.stages.sft.sft.num_prompts=128',
         '--config.stages.reward_model.train.steps=20',
         '--config.stages.reward_model.prefs.num_prompts=128',
         '--config.stages.ppo.train.steps=5', '--config.stages.ppo.train.eval_every=5',
         '--config.stages.pretrain.train.progress=False',
         '--config.stages.sft.train.progress=False',
         '--config.stages.reward_model.train.progress=False',
         '--config.stages.ppo.train.progress=False']


def records(path) -> list[dict]:
  return [json.loads(l) for l in open(os.path.join(path, 'metrics.jsonl'))]


@pytest.mark.slow
def test_pipeline_chains_stages_and_summarises_them(run_cli, tmp_path):
  workdir = tmp_path / 'pipe'
  result = run_cli(*SHORT, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  dirs = {name: str(workdir / name) for name in ('pretrain', 'sft', 'reward_model', 'ppo')}
  # Each stage started from the one before it.
  cfg = {n: json.load(open(os.path.join(d, 'config.json'))) for n, d in dirs.items()}
  assert cfg['sft']['init']['run'] == dirs['pretrain']
  assert cfg['reward_model']['init']['run'] == dirs['sft']
  assert cfg['ppo']['init']['run'] == dirs['sft']
  assert cfg['ppo']['ppo']['rm_run'] == dirs['reward_model']
  assert cfg['pretrain']['train']['steps'] == 40 and cfg['ppo']['train']['steps'] == 5
  # The table holds each stage's own figures.
  rows = {r['stage']: r for r in json.load(open(workdir / 'summary.json'))}
  sft_evals = [r for r in records(dirs['sft']) if 'policy/gold_reward' in r]
  ppo_evals = [r for r in records(dirs['ppo']) if 'policy/gold_reward' in r]
  assert rows['pretrain']['gold_reward'] == sft_evals[0]['policy/gold_reward']
  assert rows['sft']['gold_reward'] == sft_evals[-1]['policy/gold_reward']
  assert rows['sft']['kl'] == sft_evals[-1]['policy/kl_ref']
  assert rows['ppo']['gold_reward'] == ppo_evals[-1]['policy/gold_reward']
  assert rows['ppo']['kl'] == ppo_evals[-1]['policy/kl_ref']
  # PPO's reference is the SFT policy: its step-0 evaluation is SFT's last one, exactly
  # (same prompts, same key, same params).
  assert ppo_evals[0]['policy/gold_reward'] == pytest.approx(sft_evals[-1]['policy/gold_reward'],
                                                             abs=1e-6)
  rm_last = [r for r in records(dirs['reward_model']) if 'rm/gold_accuracy' in r][-1]
  assert f'{rm_last["rm/gold_accuracy"]:.3f}' in rows['reward_model']['note']
  printed = result.stdout.strip().splitlines()
  assert printed[-4].startswith('pretrain') and printed[-1].startswith('ppo')

  before = {n: records(d) for n, d in dirs.items()}
  again = run_cli(*SHORT, f'--workdir={workdir}')
  assert again.returncode == 0, again.stderr[-3000:]
  assert {n: records(d) for n, d in dirs.items()} == before
  assert again.stdout.strip().splitlines()[-5:] == printed[-5:]

  changed = run_cli(*SHORT, f'--workdir={workdir}', '--config.stages.ppo.ppo.kl_coef=0.2')
  assert changed.returncode == 2
  lines = changed.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'different config' in lines[0]


def test_finished_is_the_last_logged_step_with_its_checkpoint_under_the_same_config(tmp_path):
  """dispatch.finished, which the pipeline asks before re-entering a stage: a run counts as
  finished only with its last line at train.steps and that step's checkpoint in place; a
  different config is refused as a rerun would be."""
  from conftest import load_config
  from rlhf_jax import config as config_lib
  from rlhf_jax.errors import UserError
  from rlhf_jax.stages import dispatch
  config = load_config('pretrain', 'tiny')
  config.train.steps = 6
  workdir = tmp_path / 'run'
  assert not dispatch.finished(config, str(workdir))  # nothing there
  workdir.mkdir()
  config_lib.write_or_check(config, str(workdir))
  (workdir / 'checkpoints' / '6').mkdir(parents=True)
  lines = lambda *steps: ''.join(json.dumps({'step': s, 'train/loss': 1.0}) + '\n'
                                 for s in steps)
  (workdir / 'metrics.jsonl').write_text(lines(0, 3, 6))
  assert dispatch.finished(config, str(workdir))
  (workdir / 'metrics.jsonl').write_text(lines(0, 3))  # stopped before its last line
  assert not dispatch.finished(config, str(workdir))
  (workdir / 'metrics.jsonl').write_text(lines(0, 3, 6))
  os.rmdir(workdir / 'checkpoints' / '6')              # its last checkpoint moved aside
  (workdir / 'checkpoints' / '3').mkdir()
  assert not dispatch.finished(config, str(workdir))
  (workdir / 'metrics.jsonl').write_text('')
  assert not dispatch.finished(config, str(workdir))
  config.model.d_model = 48
  with pytest.raises(UserError, match='different config'):
    dispatch.finished(config, str(workdir))
