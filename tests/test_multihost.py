"""Multi-controller runs on this machine: 2 processes x 4 CPU devices (JAX's gloo collectives
between them) give the losses of 1 process x 8 devices, only process 0 writes, and the
2-process run resumes from its checkpoint (every process restoring its data position) to
the same metrics, here when its newest checkpoint is damaged. Every other stage and loop
gives the same data (sampled on the global mesh, written once) and the same figures as one
process; a stage left out of dispatch.MULTI_PROCESS is refused with one line."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env

ARGS = ['--config=configs/pretrain.py:tiny', '--config.train.steps=6',
        '--config.train.log_every=2', '--config.train.eval_every=6',
        '--config.train.ckpt_every=3', '--config.train.progress=False']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start_processes(workdir, processes: int, devices: int,
                    args=ARGS) -> list[subprocess.Popen]:
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, '-m', 'rlhf_jax.main', *args, f'--workdir={workdir}',
       *([f'--coordinator=localhost:{port}', f'--num_processes={processes}',
          f'--process_id={i}'] if processes > 1 else [])],
      cwd=REPO, env=cli_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(processes)]


def finish_processes(*runs: list[subprocess.Popen]) -> list[list[str]]:
  """Waits for every run's processes to end; returns each one's stderr, by run."""
  try:
    out = []
    for procs in runs:
      errs = []
      for i, p in enumerate(procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f'process {i}: {err[-3000:]}'
        errs.append(err)
      out.append(errs)
    return out
  finally:
    for p in (p for procs in runs for p in procs):
      p.kill()


def run_processes(workdir, processes: int, devices: int, args=ARGS) -> list[str]:
  """Runs the processes to the end; returns each one's stderr."""
  return finish_processes(start_processes(workdir, processes, devices, args))[0]


def records(workdir) -> list[dict]:
  return [{k: v for k, v in json.loads(l).items() if not k.startswith('perf/')}
          for l in open(workdir / 'metrics.jsonl')]


@pytest.mark.slow
def test_two_processes_equal_one_and_resume(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  # Independent runs: both at once (their start-ups and compiles overlap on the two cores).
  finish_processes(start_processes(one, processes=1, devices=8),
                   start_processes(two, processes=2, devices=4))
  a, b = records(one), records(two)
  assert [r['step'] for r in a] == [r['step'] for r in b] == [0, 2, 3, 4, 6]
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for key in x:
      if key.startswith(('train/loss', 'eval/')):
        # Same global batches and params; only the all-reduce order may differ.
        assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x['step'], key)
  # Only process 0 writes: one metrics file, one event file, one line per logged step.
  assert len(list(two.glob('events.out.tfevents.*'))) == 1

  # Its newest checkpoint damaged: both processes fail to restore it and agree to resume
  # from step 3; process 0 alone moves it aside and says so. Then both restore the state and
  # the data position of step 3, as a run stopped after step 3 would (Checkpointer.
  # restore_newest tries step 6, then restores step 3 by the same call), to the same
  # metrics: one 2-process rerun for both claims.
  damaged = tmp_path / 'damaged'
  shutil.copytree(two, damaged)
  data = [p for p in (damaged / 'checkpoints' / '6' / 'state').rglob('*')
          if p.is_file() and p.parent.name == 'd']
  assert data
  for path in data:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  errs = run_processes(damaged, processes=2, devices=4)
  warnings = [[l for l in e.splitlines() if l.startswith('warning: ')] for e in errs]
  assert len(warnings[0]) == 1 and warnings[1] == [], warnings
  assert warnings[0][0].endswith(f'moved it to {damaged / "corrupt_checkpoints" / "6"}; '
                                 'resuming from checkpoint 3')
  assert sorted(p.name for p in (damaged / 'corrupt_checkpoints').iterdir()) == ['6']
  assert records(damaged) == b


# The pipeline loop (SFT -> reward model -> PPO, each stage from the one before, cut short)
# and then DPO from its SFT run on its reward model's pairs, on 1 process x 8 devices and on
# 2 x 4, the two groups at once. Each group's pipeline starts from a copy of the chain's
# pretraining run, which it finds finished; the stages' figures are compared one by one.
SHORT = ['train.steps=4', 'train.eval_every=4', 'train.log_every=2', 'train.ckpt_every=4',
         'train.progress=False']
PIPELINE = [f'--config.stages.{stage}.{field}' for stage, field in (
    ('pretrain', 'train.progress=False'), ('sft', 'sft.num_prompts=64'),
    ('sft', 'sft.samples_per_prompt=2'), ('sft', 'policy_eval.num_prompts=16'),
    ('reward_model', 'prefs.num_prompts=48'), ('ppo', 'ppo.num_prompts=64'),
    ('ppo', 'ppo.reward_norm_prompts=32'), ('ppo', 'ppo.epochs=2'),
    ('ppo', 'ppo.minibatches=2'), ('ppo', 'train.batch_size=16'),
    ('ppo', 'policy_eval.num_prompts=16'),
    *((stage, short) for stage in ('sft', 'reward_model') for short in SHORT),
    *(('ppo', short.replace('ckpt_every=4', 'ckpt_every=2')) for short in SHORT))]
# DPO from one SFT run for both groups, the 1-process group's: the groups' SFT runs agree to
# rounding only, which flips the sign of a near-zero implicit-reward margin (dpo/accuracy).
DPO = lambda d: ['--config=configs/dpo.py:tiny',
                 f'--config.init.run={d.parent / "one" / "pipeline" / "sft"}',
                 f'--config.prefs.dir={d / "pipeline" / "reward_model" / "preferences"}',
                 '--config.policy_eval.num_prompts=16', *(f'--config.{s}' for s in SHORT)]


@pytest.fixture(scope='module')
def feedback_runs(chain, tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  one, two = root / 'one', root / 'two'
  for group in (one, two):
    shutil.copytree(chain['pretrain'], group / 'pipeline' / 'pretrain')
  pipeline = ['--config=configs/pipeline.py:tiny', *PIPELINE]
  finish_processes(start_processes(one / 'pipeline', processes=1, devices=8, args=pipeline),
                   start_processes(two / 'pipeline', processes=2, devices=4, args=pipeline))
  finish_processes(start_processes(one / 'dpo', processes=1, devices=8, args=DPO(one)),
                   start_processes(two / 'dpo', processes=2, devices=4, args=DPO(two)))
  return one, two


def assert_same_records(a_dir, b_dir, *, unidentified=()):
  """Every logged figure equal within 1e-5 relative, but those in `unidentified`, which
  the loss leaves free (their gradient is rounding noise, whose sign Adam follows). Near
  0, 1e-6 absolute; 1e-5 for the sampled sequence KLs (rl/kl, policy/kl_ref): sums over up
  to 48 tokens of differences of float32 log-probs a few nats large, whose rounding is up
  to about 48 x 4 x 6e-8 = 1e-5 nats however the reductions are ordered (measured: at
  most 9e-7)."""
  a, b = records(a_dir), records(b_dir)
  assert [r['step'] for r in a] == [r['step'] for r in b] == [0, 2, 4]
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for key in set(x) - set(unidentified):  # the same batches and params; only the
      # all-reduce order may differ
      near_zero = 1e-5 if key in ('rl/kl', 'policy/kl_ref') else 1e-6
      assert y[key] == pytest.approx(x[key], rel=1e-5, abs=near_zero, nan_ok=True), (
          x['step'], key)  # nan: e.g. an AUC of labels of one class
  assert len(list(b_dir.glob('events.out.tfevents.*'))) == 1  # process 0 alone wrote


def assert_same_store(a_dir, b_dir, names, *, close=()):
  """The same arrays and lineage (but the paths it names, each group's own); the float
  arrays named in `close` (a model's scores) to float32 rounding."""
  from rlhf_jax.data import array_store
  (a, a_lineage), (b, b_lineage) = (array_store.read(str(d), names) for d in (a_dir, b_dir))
  is_path = lambda v: (isinstance(v, str) and v.startswith(os.sep)) or (
      isinstance(v, list) and v and all(map(is_path, v)))
  assert {k: v for k, v in a_lineage.items() if not is_path(v)} == {
      k: v for k, v in b_lineage.items() if not is_path(v)}
  for name in names:
    if name in close:
      np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(b[name], a[name], err_msg=name)
  assert sorted(p.name for p in b_dir.parent.iterdir() if p.name.startswith(b_dir.name)) == [
      b_dir.name]  # one writer: no second copy, no temporary left


@pytest.mark.slow
def test_sft_on_two_processes_equals_one(feedback_runs):
  """The same demonstrations (best-of-k samples on the global mesh, gathered to every
  process, written by process 0 alone) and the same logged figures, sampled policy/*
  included."""
  from rlhf_jax.data import demos
  one, two = (d / 'pipeline' / 'sft' for d in feedback_runs)
  assert_same_store(one / 'demos', two / 'demos', demos.FIELDS)
  assert any('policy/gold_reward' in r for r in records(two))
  assert_same_records(one, two)


@pytest.mark.slow
def test_reward_model_on_two_processes_equals_one(feedback_runs):
  """The same preference pairs (one shard, written by process 0) and the same rm/*, and
  reward_norm.json."""
  from rlhf_jax.data import preferences
  one, two = (d / 'pipeline' / 'reward_model' for d in feedback_runs)
  assert [os.path.basename(p) for p in preferences.shard_paths(str(two / 'preferences'))] == [
      'shard_00000']
  assert_same_store(one / 'preferences' / 'shard_00000', two / 'preferences' / 'shard_00000',
                    preferences.ALL_FIELDS)
  assert any('rm/gold_accuracy' in r for r in records(two))
  # Bradley-Terry sees reward differences only: a shift of every reward (the head's bias,
  # any feature every response shares) has zero gradient up to rounding, which Adam's
  # normalised step turns into motion of about the learning rate. So the mean reward is
  # the one figure 1 and 2 processes may differ in (measured: 1e-3 after 4 steps); every
  # figure of reward differences (accuracies, calibration, correlation, spread) is equal.
  assert_same_records(one, two, unidentified=('rm/reference_mean',))
  norms = [json.load(open(d / 'reward_norm.json')) for d in (one, two)]
  assert norms[1]['step'] == norms[0]['step'] == 4
  np.testing.assert_allclose(norms[1]['std'], norms[0]['std'], rtol=1e-5)
  for d, norm in zip((one, two), norms):  # the statistics of the run's own last evaluation
    assert norm['mean'] == pytest.approx([records(d)[-1]['rm/reference_mean']], rel=1e-6)


@pytest.mark.slow
def test_dpo_on_two_processes_equals_one(feedback_runs):
  """On its own group's pairs: reference log-probs gathered from both processes, the same
  dpo/*, dpo_eval/* and policy/*."""
  one, two = (d / 'dpo' for d in feedback_runs)
  assert any('dpo_eval/accuracy' in r for r in records(two))
  assert_same_records(one, two)


@pytest.mark.slow
def test_ppo_and_the_pipeline_on_two_processes_equal_one(feedback_runs):
  """PPO against its own group's reward model: rewards centred on reference samples gathered
  from both processes (the statistics written by process 0), the same rl/*, ppo/* and
  policy/* (rollouts, scores and updates on the global mesh); the two reward models differ
  by their free shift only (see above), which the centring removes. Then the pipeline's
  table, written once."""
  one, two = (d / 'pipeline' / 'ppo' for d in feedback_runs)
  norms = [json.load(open(d / 'reward_norm.json')) for d in (one, two)]
  assert norms[0]['samples'] == norms[1]['samples'] == 32
  np.testing.assert_allclose(norms[1]['std'], norms[0]['std'], rtol=1e-5)
  assert any('policy/proxy_reward' in r for r in records(two))
  assert_same_records(one, two)
  a, b = (json.load(open(d / 'pipeline' / 'summary.json')) for d in feedback_runs)
  assert [r['stage'] for r in b] == ['pretrain', 'sft', 'reward_model', 'ppo']
  for x, y in zip(a, b):
    assert x.keys() == y.keys() and x['note'] == y['note']
    for key in x.keys() - {'note'}:
      assert y[key] == (pytest.approx(x[key], rel=1e-5, abs=1e-6)
                        if isinstance(x[key], float) else x[key]), (x['stage'], key)
  assert sorted(p.name for p in (feedback_runs[1] / 'pipeline').iterdir()
                if p.suffix or p.name.startswith('summary')) == ['config.json', 'summary.json']


# Iterated RLHF by rejection sampling, one round cut short, from the 1-process group's
# pipeline SFT run for both groups: comparisons of the SFT policy, reward model 0, SFT on its
# best of 2 samples per prompt, then the comparisons of policy 1 its drift is measured on.
ROUNDS = lambda d: [
    '--config=configs/rlhf_rounds.py:tiny_rejection_sampling', '--config.rounds.num=1',
    f'--config.rounds.init_run={d.parent / "one" / "pipeline" / "sft"}',
    *(f'--config.stages.{stage}.{short}' for stage in ('reward_model', 'sft')
      for short in SHORT),
    *(f'--config.stages.{stage}.policy_eval.num_prompts=16' for stage in ('reward_model', 'sft')),
    '--config.stages.reward_model.prefs.num_prompts=48',
    '--config.stages.sft.sft.num_prompts=64', '--config.stages.sft.sft.samples_per_prompt=2']


@pytest.mark.slow
def test_rlhf_rounds_on_two_processes_equal_one(feedback_runs):
  """The loop's host-side work on the global mesh: the comparisons (sampled, labelled, one
  shard each, written once), the demonstrations chosen by reward model 0's centred scores
  of the samples, and the round's figures (the policy against the SFT run, with reward model
  0's proxy score, and its gold agreement on the fresh comparisons) and its runs'."""
  from rlhf_jax.data import demos, preferences
  one, two = (d / 'rounds' for d in feedback_runs)
  finish_processes(start_processes(one, processes=1, devices=8, args=ROUNDS(feedback_runs[0])),
                   start_processes(two, processes=2, devices=4, args=ROUNDS(feedback_runs[1])))
  for r in (0, 1):
    shards = preferences.shard_paths(str(two / 'prefs' / f'round_{r}'))
    assert [os.path.basename(p) for p in shards] == ['shard_00000']
    assert_same_store(one / 'prefs' / f'round_{r}' / 'shard_00000',
                      two / 'prefs' / f'round_{r}' / 'shard_00000', preferences.ALL_FIELDS)
  assert_same_store(one / 'round_0' / 'policy' / 'demos', two / 'round_0' / 'policy' / 'demos',
                    demos.FIELDS)
  assert_same_records(one / 'round_0' / 'rm', two / 'round_0' / 'rm',
                      unidentified=('rm/reference_mean',))
  assert_same_records(one / 'round_0' / 'policy', two / 'round_0' / 'policy')
  a, b = records(one), records(two)
  assert [r['step'] for r in a] == [r['step'] for r in b] == [0, 1]
  assert {'rounds/proxy_reward', 'rounds/rm_drift_gold_accuracy'} <= b[1].keys()
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      near_zero = 1e-5 if key == 'rounds/kl_sft' else 1e-6  # as for policy/kl_ref
      assert y[key] == pytest.approx(x[key], rel=1e-5, abs=near_zero), (x['step'], key)
  assert json.load(open(two / 'round_0' / 'summary.json'))['lineage']['round'] == 0
  assert sorted(p.name for p in two.iterdir()) == [
      'base_summary.json', 'config.json', 'metrics.jsonl', 'prefs', 'round_0']


@pytest.mark.slow
def test_pipeline_stopped_in_ppo_resumes_on_two_processes(feedback_runs):
  """As if killed inside its PPO stage after step 2's checkpoint, before the table: the
  2-process rerun passes over the finished stages, resumes PPO from step 2 and ends with
  the same figures, final params and table. In place, since a pipeline's stages name each
  other by absolute path (the last test of the module: what it leaves is what it found)."""
  import jax
  from conftest import read_state
  pipeline = feedback_runs[1] / 'pipeline'
  ppo = pipeline / 'ppo'
  before = records(ppo), json.load(open(pipeline / 'summary.json'))
  final = read_state(ppo / 'checkpoints' / '4')
  assert sorted(int(p.name) for p in (ppo / 'checkpoints').iterdir()) == [2, 4]
  shutil.rmtree(ppo / 'checkpoints' / '4')
  os.remove(pipeline / 'summary.json')
  run_processes(pipeline, processes=2, devices=4,
                args=['--config=configs/pipeline.py:tiny', *PIPELINE])
  assert records(ppo) == before[0]
  assert json.load(open(pipeline / 'summary.json')) == before[1]
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(read_state(ppo / 'checkpoints' / '4')),
                  strict=True):
    np.testing.assert_array_equal(a, b)


# RL against a verifier, cut short, from the chain's pretraining run: the warm start (SFT on
# solved traces), an outcome reward model on its verifier-labelled samples, and GRPO scored
# by that learned verifier.
TASK = {
    'sft': lambda d: ['--config=configs/sft.py:task_tiny', f'--config.init.run={d["pretrain"]}',
                      '--config.sft.num_prompts=128', '--config.sft.eval_prompts=16',
                      '--config.sft.eval_samples=2'],
    'orm': lambda d: ['--config=configs/reward_model.py:task_tiny',
                      f'--config.init.run={d["sft"]}', '--config.outcome.num_problems=64',
                      '--config.outcome.samples_per_problem=2',
                      '--config.outcome.eval_prompts=16', '--config.outcome.eval_samples=2'],
    'grpo': lambda d: ['--config=configs/grpo.py:tiny_orm', f'--config.init.run={d["sft"]}',
                       f'--config.grpo.rm_run={d["orm"]}', '--config.grpo.num_prompts=64',
                       '--config.grpo.eval_prompts=16', '--config.grpo.eval_samples=2',
                       '--config.grpo.group_size=4', '--config.train.batch_size=8'],
}


@pytest.mark.slow
def test_rl_against_a_verifier_on_two_processes_equals_one(chain, tmp_path):
  """Each group's own chain, stage after stage (the two groups at once): the same solved
  traces and verifier-labelled outcomes (written once), and every train/*, eval/* (pass@k,
  maj@k, greedy pass, KL), orm/*, rl/* and grpo/* figure as on one process."""
  from rlhf_jax.stages import sft
  groups = {n: {'pretrain': chain['pretrain'], **{s: tmp_path / n / s for s in TASK}}
            for n in ('one', 'two')}
  for stage, args in TASK.items():
    finish_processes(*(start_processes(d[stage], processes=p, devices=8 // p,
                                       args=[*args(d), *(f'--config.{x}' for x in SHORT)])
                       for p, d in zip((1, 2), groups.values())))
  one, two = groups['one'], groups['two']
  assert_same_store(one['sft'] / 'demos', two['sft'] / 'demos', sft.TASK_FIELDS)
  a, b = (np.load(d['orm'] / 'outcomes.npz') for d in (one, two))
  assert a.files == b.files
  for name in a.files:
    np.testing.assert_array_equal(b[name], a[name], err_msg=name)
  for stage, figure in (('sft', 'eval/pass@2'), ('orm', 'orm/accuracy'),
                        ('grpo', 'eval/maj@2'), ('grpo', 'rl/orm_score')):
    assert any(figure in r for r in records(two[stage])), (stage, figure)
    assert_same_records(one[stage], two[stage])


SELF_IMPROVE = [
    '--config=configs/self_improve.py:tiny', '--config.self_improve.rounds=1',
    '--config.self_improve.filter=learned', '--config.self_improve.prompts=16',
    '--config.self_improve.samples=2', '--config.self_improve.label_budget=16',
    '--config.self_improve.eval_prompts=16', '--config.self_improve.eval_samples=2',
    '--config.self_improve.kl_rows=32',
    *(f'--config.stages.{stage}.{short}' for stage in ('sft', 'reward_model') for short in SHORT),
    '--config.stages.reward_model.outcome.eval_prompts=16',
    '--config.stages.reward_model.outcome.eval_samples=2',
    '--config.stages.sft.sft.eval_prompts=16', '--config.stages.sft.sft.eval_samples=2']


@pytest.mark.slow
def test_self_improvement_on_two_processes_equals_one(task_warm_start, tmp_path):
  """One round of the learned filter from the warm start: samples graded, 16 of them
  labelled, an outcome reward model refit on them scoring the rest, the kept samples as
  the next policy's demonstrations (every store written once), and every eval/*,
  self_improve/*, orm/* and train/* figure as on one process."""
  from rlhf_jax.stages import sft
  from rlhf_jax.loops import self_improve
  one, two = tmp_path / 'one', tmp_path / 'two'
  args = [*SELF_IMPROVE, f'--config.self_improve.init_run={task_warm_start}']
  finish_processes(start_processes(one, processes=1, devices=8, args=args),
                   start_processes(two, processes=2, devices=4, args=args))
  for store, names in (('samples', self_improve.SAMPLE_FIELDS),
                       ('labels', ['prompts', 'response', 'label', 'row']),
                       ('kept', ['kept', 'score']), ('policy/demos', sft.TASK_FIELDS)):
    assert_same_store(one / 'round_0' / store, two / 'round_0' / store, names,
                      close=('score',))  # the ORM's: its all-reduces' order differs
  assert_same_records(one / 'round_0' / 'orm', two / 'round_0' / 'orm')
  assert_same_records(one / 'round_0' / 'policy', two / 'round_0' / 'policy')
  a, b = records(one), records(two)
  assert [r['step'] for r in a] == [r['step'] for r in b] == [0, 1]
  assert b[0]['self_improve/kept_rows'] > 0 and 'self_improve/orm_auc' in b[0]
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-5, nan_ok=True), (x['step'], key)
  assert sorted(p.name for p in (two / 'round_0').iterdir()) == [
      'kept', 'labels', 'orm', 'policy', 'samples', 'summary.json']


DISTILL = ['--config=configs/distill.py:tiny_gkd', '--config.distill.eval_prompts=32',
           '--config.policy_eval.num_prompts=16', '--config.train.eval_batches=2',
           *(f'--config.{short}' for short in SHORT)]


@pytest.mark.slow
def test_distill_on_two_processes_equals_one(chain, tmp_path):
  """GKD of the chain's SFT policy into the 1-layer student, half of each batch the
  student's own samples: every train/*, eval/*, distill/* (the KLs to and from the teacher
  on the global mesh) and policy/* figure (student and teacher against the teacher's
  reference) as on one process."""
  one, two = tmp_path / 'one', tmp_path / 'two'
  args = [*DISTILL, f'--config.distill.teacher_run={chain["sft"]}']
  finish_processes(start_processes(one, processes=1, devices=8, args=args),
                   start_processes(two, processes=2, devices=4, args=args))
  assert {'distill/kl_to_teacher', 'distill/teacher_gold_reward',
          'policy/gold_reward'} <= records(two)[0].keys()
  assert_same_records(one, two)


COLLAPSE = ['--config=configs/collapse.py:tiny', '--config.collapse.generations=2',
            '--config.collapse.samples=128', '--config.collapse.heldout_rows=64',
            '--config.collapse.schedule=mix', '--config.collapse.init=finetune',
            *(f'--config.{short}' for short in SHORT)]


@pytest.mark.slow
def test_collapse_on_two_processes_equals_one(tmp_path):
  """Two generations (the second fine-tuned from the first on half fresh real rows, half its
  samples): the same real, fresh and sampled rows (sampled on the global mesh, written once)
  and the same collapse/* figures (the held-out rows scored on the global mesh) and
  generation runs' figures."""
  one, two = tmp_path / 'one', tmp_path / 'two'
  finish_processes(start_processes(one, processes=1, devices=8, args=COLLAPSE),
                   start_processes(two, processes=2, devices=4, args=COLLAPSE))
  for store in ('real', 'gen_1/fresh', 'gen_0/samples', 'gen_1/samples'):
    names = ['rows', 'heldout'] if store == 'real' else ['rows']
    assert_same_store(one / store, two / store, names)
  for g in (0, 1):
    assert_same_records(one / f'gen_{g}' / 'model', two / f'gen_{g}' / 'model')
  a, b = records(one), records(two)
  assert [r['step'] for r in a] == [r['step'] for r in b] == [0, 1]
  assert {'collapse/true_kl', 'collapse/sample_distinct_2',
          'collapse/data_real_rows'} <= b[1].keys()
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x['step'], key)
  assert sorted(p.name for p in two.iterdir()) == [
      'config.json', 'gen_0', 'gen_1', 'metrics.jsonl', 'real']
  assert sorted(p.name for p in (two / 'gen_1').iterdir()) == [
      'data.json', 'fresh', 'model', 'samples', 'summary.json']


SELFPLAY = ['--config=configs/selfplay.py:tic_tac_toe', '--config.selfplay.iterations=2',
            '--config.selfplay.games=32', '--config.train.steps=5',
            '--config.train.batch_size=32', '--config.search.num_simulations=4',
            '--config.arena.games=16', '--config.arena.num_simulations=4',
            "--config.arena.players=('search',)", "--config.arena.lags=(1,)"]


@pytest.mark.slow
def test_selfplay_on_two_processes_equals_one(tmp_path):
  """Two iterations of tic-tac-toe self-play (games and replay positions along the data
  axis of the global mesh), each rated in the arena against the fixed opponents and against
  the checkpoint one evaluation earlier (read back from process 0's params file): every
  selfplay/*, train/*, replay/*, arena/* and elo/* figure as on one process. One group after
  the other: the arena's in-process all-gathers time out when the two cores are
  oversubscribed."""
  one, two = tmp_path / 'one', tmp_path / 'two'
  run_processes(one, processes=1, devices=8, args=SELFPLAY)
  run_processes(two, processes=2, devices=4, args=SELFPLAY)
  a, b = records(one), records(two)
  assert [r['step'] for r in a] == [r['step'] for r in b] == [0, 1, 2]
  assert {'train/total', 'replay/positions', 'arena/search_vs_lag_1/win',
          'arena/search_vs_perfect/loss', 'elo/search'} <= b[2].keys()
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x['step'], key)
  assert len(list(two.glob('events.out.tfevents.*'))) == 1
  assert sorted(p.name for p in (two / 'params').iterdir()) == [
      f'iter_{i}.msgpack' for i in range(3)]
  assert sorted(p.name for p in (two / 'iterations').iterdir()) == [
      'iter_0.json', 'iter_1.json', 'iter_1_train.json', 'iter_2.json', 'iter_2_train.json']


def test_bad_process_flags(run_cli, tmp_path):
  result = run_cli(*ARGS, f'--workdir={tmp_path / "bad"}', '--num_processes=2',
                   '--process_id=0')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and '--coordinator' in lines[0]


def test_a_stage_not_made_multi_process_is_refused(monkeypatch):
  """Every stage and loop but AI feedback's runs on several processes; one left out of
  dispatch.MULTI_PROCESS (the judge stage, the constitutional loop, or one added to the
  registry without its multi-process work) is refused before any compute, on its own and
  as a loop's stage, with one error line naming it; so is a stage with a judge block."""
  import jax
  from rlhf_jax.config import load_named
  from rlhf_jax.errors import UserError
  from rlhf_jax.stages import dispatch
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  assert set(dispatch.STAGES) - set(dispatch.MULTI_PROCESS) == {'judge', 'constitutional'}
  for stage in dispatch.MULTI_PROCESS:  # each one's config (configs/<stage>.py) passes
    dispatch.check_processes(load_named(stage, 'tic_tac_toe' if stage == 'selfplay' else 'tiny'))
  for name, stage in (('judge', 'judge'), ('cai', 'constitutional')):
    with pytest.raises(UserError, match=f'^stage {stage} runs in one process only'):
      dispatch.check_processes(load_named(name, 'tiny'))
  with_judge = load_named('reward_model', 'tiny')
  with_judge.judge = load_named('cai', 'tiny').judge
  with pytest.raises(UserError, match='^AI feedback .* runs in one process only'):
    dispatch.check_processes(with_judge)
  monkeypatch.setattr(dispatch, 'MULTI_PROCESS',
                      tuple(s for s in dispatch.MULTI_PROCESS if s != 'ppo'))
  for config in (load_named('ppo', 'tiny'), load_named('pipeline', 'tiny')):
    with pytest.raises(UserError, match=r'^stage ppo runs in one process only \(this run '
                                        r'has 2; only pretrain, sft, .* runs on several\)'):
      dispatch.check_processes(config)
