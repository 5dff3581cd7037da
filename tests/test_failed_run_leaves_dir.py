"""A run that stops on bad input leaves its DIR as it found it, for every stage and loop, so
that the corrected command (a different config) is not refused as "a different config"
(the review issue's case: dpo with prefs.dir at an empty folder)."""
import os
import shutil

import pytest

from test_cli_errors import assert_one_error_line, snapshot
from rlhf_jax.stages import dispatch

QUICK = ('--config.train.progress=False',)  # for stages with a train block


def _cases(chain, reward_run, tmp):
  empty = tmp / 'empty_prefs'
  empty.mkdir()
  no_ckpt = tmp / 'sft_without_checkpoints'
  no_ckpt.mkdir()
  shutil.copy(os.path.join(chain['sft'], 'config.json'), no_ckpt / 'config.json')
  missing = tmp / 'no_such_corpus'
  return {
      'pretrain': ('configs/pretrain.py:tiny', (f'--config.data.source=text:{missing}',),
                   str(missing)),
      'sft': ('configs/sft.py:tiny', (f'--config.init.run={chain["pretrain"]}',
                                      '--config.init.step=12345'), 'step 12345'),
      'reward_model': ('configs/reward_model.py:tiny', (f'--config.init.run={chain["sft"]}',
                                                        f'--config.prefs.dir={empty}'),
                       str(empty)),
      'dpo': ('configs/dpo.py:tiny', (f'--config.init.run={chain["sft"]}',
                                      f'--config.prefs.dir={empty}'), str(empty)),
      'ppo': ('configs/ppo.py:tiny', (f'--config.init.run={chain["sft"]}',
                                      f'--config.ppo.rm_run={reward_run}',
                                      '--config.ppo.rm_step=12345'), 'step 12345'),
      # Found by the pipeline's first stage, after the pipeline wrote its own config.json.
      'pipeline': ('configs/pipeline.py:tiny',
                   (f'--config.stages.pretrain.data.source=text:{missing}',), str(missing)),
      'rlhf_rounds': ('configs/rlhf_rounds.py:tiny', (f'--config.rounds.init_run={no_ckpt}',),
                      'no checkpoints'),
      # Found when the loop reads its real data, after it wrote its config.json.
      'collapse': ('configs/collapse.py:tiny', (f'--config.data.source=text:{missing}',),
                   str(missing)),
      'selfplay': ('configs/selfplay.py:tic_tac_toe', ('--config.network.name=nope',), 'nope'),
  }


@pytest.mark.parametrize('stage', ['pretrain', 'sft', 'reward_model', 'dpo', 'ppo',
                                   'pipeline', 'rlhf_rounds', 'collapse', 'selfplay'])
def test_bad_input_writes_nothing(stage, chain, reward_run, run_cli, tmp_path):
  config, overrides, mention = _cases(chain, reward_run, tmp_path)[stage]
  fresh = tmp_path / 'fresh'
  result = run_cli(f'--config={config}', f'--workdir={fresh}', *overrides)
  assert_one_error_line(result, mentions=(mention,))
  assert not fresh.exists(), snapshot(fresh)
  # A DIR the user made, with their files in it, is left exactly as it was.
  kept = tmp_path / 'kept'
  (kept / 'notes').mkdir(parents=True)
  (kept / 'notes' / 'plan.txt').write_text('keep me\n')
  (kept / 'empty').mkdir()
  before = snapshot(kept)
  result = run_cli(f'--config={config}', f'--workdir={kept}', *overrides)
  assert_one_error_line(result, mentions=(mention,))
  assert snapshot(kept) == before


def test_dpo_corrected_after_a_wrong_prefs_dir(chain, reward_run, run_cli, tmp_path):
  """The review issue's case: the same DIR, then the right preference set, runs."""
  empty = tmp_path / 'empty_prefs'
  empty.mkdir()
  workdir = tmp_path / 'dpo'
  args = ('--config=configs/dpo.py:tiny', f'--workdir={workdir}', *QUICK,
          f'--config.init.run={chain["sft"]}', '--config.train.steps=2',
          '--config.policy_eval.num_prompts=8', '--config.policy_eval.max_new_tokens=4')
  assert_one_error_line(run_cli(*args, f'--config.prefs.dir={empty}'), mentions=(str(empty),))
  prefs = os.path.join(reward_run, 'preferences')
  result = run_cli(*args, f'--config.prefs.dir={prefs}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']


def test_only_what_this_call_wrote_goes(tmp_path, monkeypatch):
  """The rule itself: config.json and empty folders this call made go; a DIR that got
  anything else (a computed file) keeps all of it; files that were there stay."""
  workdir = tmp_path / 'run'
  before = dispatch._fresh_paths(str(workdir))
  (workdir / 'sub' / 'deeper').mkdir(parents=True)
  (workdir / 'config.json').write_text('{}')
  dispatch._remove_if_nothing_computed(str(workdir), before)
  assert not workdir.exists()

  (workdir / 'mine').mkdir(parents=True)
  (workdir / 'mine' / 'a.txt').write_text('x')
  before = dispatch._fresh_paths(str(workdir))
  (workdir / 'config.json').write_text('{}')
  (workdir / 'new_empty').mkdir()
  dispatch._remove_if_nothing_computed(str(workdir), before)
  assert sorted(os.listdir(workdir)) == ['mine'] and (workdir / 'mine' / 'a.txt').exists()

  before = dispatch._fresh_paths(str(workdir))
  (workdir / 'config.json').write_text('{}')
  (workdir / 'tokenizer.model').write_bytes(b'computed')
  dispatch._remove_if_nothing_computed(str(workdir), before)
  assert sorted(os.listdir(workdir)) == ['config.json', 'mine', 'tokenizer.model']
  # A DIR that already holds a run is never touched.
  assert dispatch._fresh_paths(str(workdir)) is None


def test_init_step_newest_is_pinned(chain, tmp_path):
  """init.step=-1 is pinned to the newest checkpoint at the start: once the earlier run has
  a newer checkpoint (it was extended), the same command is refused as a different config
  instead of resuming against another reference."""
  from conftest import checkpoint_steps, load_config
  from rlhf_jax import config as config_lib
  from rlhf_jax.errors import UserError
  from rlhf_jax.stages import from_run
  upstream = tmp_path / 'pretrain'
  shutil.copytree(chain['pretrain'], upstream)
  newest = checkpoint_steps(upstream)[-1]

  def resolved():
    config = load_config('sft', 'tiny')
    config.init.run = str(upstream)
    from_run.resolve(config)
    return config

  first = resolved()
  assert first.init.step == newest
  workdir = tmp_path / 'sft'
  workdir.mkdir()
  config_lib.write_or_check(first, str(workdir))
  config_lib.write_or_check(resolved(), str(workdir), write=False)  # same newest: resumes
  shutil.copytree(upstream / 'checkpoints' / str(newest),
                  upstream / 'checkpoints' / str(newest + 100))
  later = resolved()
  assert later.init.step == newest + 100
  with pytest.raises(UserError, match='init.step'):
    config_lib.write_or_check(later, str(workdir), write=False)
