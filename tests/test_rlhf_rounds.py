"""Iterated RLHF rounds (configs/rlhf_rounds.py) from the session's SFT run, shortened:
every artefact carries its lineage (round, producing policy, the comparisons the reward
model saw), the per-round table's gold and group rewards equal NumPy float64 rewards of the
evaluation's own samples, a loop stopped mid-round resumes to the same
numbers, and bad loop fields end with one error line."""
import json
import os
import shutil

import numpy as np
import pytest

SHORT = ['--config=configs/rlhf_rounds.py:tiny', '--config.rounds.num=2',
         '--config.stages.reward_model.train.steps=20',
         '--config.stages.reward_model.prefs.num_prompts=128',
         '--config.stages.ppo.train.steps=5', '--config.stages.ppo.train.eval_every=5']


def rows(workdir) -> list[dict]:
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def numpy_group_rewards(policy_dirs: list[str], rm_dir: str) -> list[dict]:
  """Per policy dir, {'gold': mean gold reward, g: mean reward to annotator group g} in
  NumPy float64, of the responses the loop's policy evaluation samples from its newest
  checkpoint (its evaluator's prompts and key on one device, under the world of a
  reward-model run of the loop, whose config is the one the loop's Measure uses). One
  world and evaluator serve every policy (same architecture; prompts and key depend on the
  world seed only), as in the loop's Measure."""
  import jax
  import ml_collections
  from rlhf_jax import sharding
  from rlhf_jax.stages.policy_eval import PolicyEvaluator
  from rlhf_jax.train import runs
  from rlhf_jax.world import setup as world_setup
  config = runs.read_config(rm_dir)
  world = world_setup.from_config(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  loaded = [runs.load(d, mesh=mesh, mesh_config=config.mesh) for d in policy_dirs]
  evaluator = PolicyEvaluator(
      config=ml_collections.ConfigDict({'policy_eval': config.policy_eval.to_dict(),
                                        'world': config.world.to_dict()}),
      world=world, model=loaded[0].model, mesh=mesh, mesh_config=config.mesh,
      param_shardings=loaded[0].param_shardings, ref_params=loaded[0].params, dp=1)
  gold = world.gold
  topics, harmful = np.asarray(gold.topics, np.float64), np.asarray(gold.harmful)
  unit = lambda v: v / max(np.linalg.norm(v), 1e-9)

  def reward(weights, prompt, response):
    # mean token weight + topic * cos(prompt, response) + length * n - harm * [forbidden]
    return (weights[response].mean() + gold.topic * unit(topics[prompt].sum(0)) @
            unit(topics[response].sum(0)) + gold.length * len(response)
            - gold.harm * float(harmful[response].any()))

  groups = np.asarray(world.pool.group_helpfulness, np.float64)
  weights = {'gold': np.asarray(gold.helpfulness, np.float64), 0: groups[0], 1: groups[1]}
  out = []
  for policy in loaded:
    sample = jax.device_get(evaluator.sampler.sample(policy.params, evaluator.prompts,
                                                     evaluator.lengths, evaluator.key))
    rows = []
    for prompt, response, mask in zip(evaluator.prompts, sample.response, sample.mask):
      rows.append((prompt[prompt > 0], response[mask > 0]))
    out.append({k: np.mean([reward(w, p, y) for p, y in rows]) for k, w in weights.items()})
  return out


def test_rounds_lineage_metrics_and_resume(chain, run_cli, tmp_path):
  from rlhf_jax.data import preferences
  workdir = tmp_path / 'rounds'
  args = [*SHORT, f'--config.rounds.init_run={chain["sft"]}']
  result = run_cli(*args, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  # Comparisons of round r come from policy r: the SFT run, then round 0's PPO run.
  producers = [chain['sft'], str(workdir / 'round_0' / 'policy'), str(workdir / 'round_1' / 'policy')]
  for r in range(3):  # round 2's set is policy 2's, made to measure reward-model drift
    pairs, lineages = preferences.read(str(workdir / 'prefs' / f'round_{r}'))
    assert [l['round'] for l in lineages] == [r] and np.all(pairs.round == r)
    assert lineages[0]['init_run'] == producers[r]
  # Reward model 1 learned from both rounds' comparisons ('all'), its trunk from SFT; policy
  # 2 started from policy 1 against reward model 1.
  rm1 = json.load(open(workdir / 'round_1' / 'rm' / 'config.json'))
  assert rm1['prefs']['dir'].split(',') == [str(workdir / 'prefs' / f'round_{r}') for r in (0, 1)]
  assert rm1['init']['run'] == chain['sft']
  total = sum(len(preferences.read(str(workdir / 'prefs' / f'round_{r}'))[0]) for r in (0, 1))
  first = json.loads(open(workdir / 'round_1' / 'rm' / 'metrics.jsonl').readline())
  assert 0.8 * total < first['rm/train_pairs'] < total
  ppo1 = json.load(open(workdir / 'round_1' / 'policy' / 'config.json'))
  assert ppo1['init']['run'] == producers[1] and ppo1['ppo']['rm_run'] == str(workdir / 'round_1' / 'rm')

  table = rows(workdir)
  assert [r['step'] for r in table] == [0, 1, 2]
  assert abs(table[0]['rounds/kl_sft']) < 1e-4  # the base policy against itself
  # The base policy's and the last policy's rows against NumPy float64 rewards of the very
  # samples the loop's evaluation drew (gold, and each annotator group's helpfulness
  # weights from the pool); matching gold first shows the samples are the same.
  wants = numpy_group_rewards([chain['sft'], str(workdir / 'round_1' / 'policy')],
                              str(workdir / 'round_0' / 'rm'))
  for step, want in zip((0, 2), wants):
    row = table[step]
    assert row['rounds/gold_reward'] == pytest.approx(want['gold'], abs=1e-5)
    for g in (0, 1):
      assert row[f'rounds/group{g}_reward'] == pytest.approx(want[g], abs=1e-5)
    assert abs(want[1] - want['gold']) > 0.01  # the minority's weights tell here
  for r in table[1:]:
    assert 0 <= r['rounds/rm_drift_gold_accuracy'] <= 1 and 'rounds/proxy_reward' in r
    # Reward model r's own held-out figure is the last one its run logged.
  rm0_last = [json.loads(l) for l in open(workdir / 'round_0' / 'rm' / 'metrics.jsonl')][-1]
  assert table[1]['rounds/rm_gold_accuracy'] == rm0_last['rm/gold_accuracy']
  summary = json.load(open(workdir / 'round_1' / 'summary.json'))
  assert summary['lineage']['policy_from'] == producers[1]
  # Each round's PPO run centres reward model r on samples of its own reference, policy r
  # (not on the held-out pairs of every policy so far that reward model r learned from):
  # its step-0 evaluation (policy r itself) has proxy reward 0 within sampling error; the
  # round's rounds/proxy_reward is the proxy that run maximised, scored on policy r+1.
  for r in (0, 1):
    policy_dir = workdir / f'round_{r}' / 'policy'
    norm = json.load(open(policy_dir / 'reward_norm.json'))
    assert norm['reference_run'] == producers[r]
    assert norm['rm_run'] == str(workdir / f'round_{r}' / 'rm')
    evals = [e for e in rows(policy_dir) if 'policy/proxy_reward' in e]
    assert evals[0]['step'] == 0
    assert abs(evals[0]['policy/proxy_reward']) < 4 * norm['std'][0] * np.sqrt(
        1 / 256 + 1 / norm['samples'])
    assert table[r + 1]['rounds/proxy_reward'] == pytest.approx(
        evals[-1]['policy/proxy_reward'], abs=1e-5)

  # As if stopped in round 1 after its reward model (runs name each other by absolute
  # path, so this happens in place): the policy run, the summary and the drift set are
  # gone; rerunning the same command reproduces the same table.
  shutil.rmtree(workdir / 'round_1' / 'policy')
  shutil.rmtree(workdir / 'prefs' / 'round_2')
  os.remove(workdir / 'round_1' / 'summary.json')
  result = run_cli(*args, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert rows(workdir) == table


def test_preference_sets_join_with_commas(tmp_path):
  from rlhf_jax.data import preferences
  rng = np.random.default_rng(0)

  def shard(directory, n, round_):
    fields = {}
    for f in preferences.FIELDS:
      two_d = f in ('prompts', 'chosen', 'rejected', 'chosen_mask', 'rejected_mask')
      fields[f] = np.zeros((n, 4) if two_d else (n,), np.float32 if 'mask' in f or
                           f in ('gold_chosen', 'gold_rejected', 'annotator_prob') else np.int32)
    pairs = preferences.PreferencePairs(**fields)
    pairs.prompts[:, -1] = 1
    pairs.prompt_lengths[:] = 1
    pairs.chosen[:, 0] = rng.integers(3, 10, n)
    pairs.rejected[:, 0] = pairs.chosen[:, 0] + 10
    pairs.chosen_mask[:, 0] = pairs.rejected_mask[:, 0] = 1
    pairs.prompt_id[:] = np.arange(n)
    pairs.round[:] = round_
    preferences.write_shard(str(directory), pairs, lineage={'round': round_})
    return pairs

  a, b = shard(tmp_path / 'a', 3, 0), shard(tmp_path / 'b', 5, 1)
  joined, lineages = preferences.read(f'{tmp_path / "a"},{tmp_path / "b"}')
  assert [l['round'] for l in lineages] == [0, 1]
  np.testing.assert_array_equal(joined.chosen, np.concatenate([a.chosen, b.chosen]))
  # Prompt ids stay distinct across the sets.
  np.testing.assert_array_equal(joined.prompt_id, [0, 1, 2, 3, 4, 5, 6, 7])


@pytest.mark.parametrize('override,expected', [
    ('--config.rounds.policy_update=best_of_n', "rounds.policy_update='best_of_n' is not one of"),
    ('--config.rounds.init_run=/nonexistent/run', 'rounds.init_run /nonexistent/run holds no run'),
    ('--config.rounds.num=0', 'rounds.num=0 must be >= 1')])
def test_bad_loop_fields(override, expected, run_cli, tmp_path):
  result = run_cli('--config=configs/rlhf_rounds.py:tiny', f'--workdir={tmp_path / "r"}',
                   override)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], lines


def test_best_of_k_ranks_by_the_given_score():
  """Rejection sampling keeps, per prompt, the sample the score ranks first, and reports
  that sample's gold reward; with no score, gold ranks."""
  import jax
  from conftest import load_config
  from rlhf_jax.data import demos
  from rlhf_jax.sampling import SampleOutput
  from rlhf_jax.world import reward as reward_lib
  from rlhf_jax.world import setup as world_setup
  config = load_config('reward_model', 'tiny')
  world = world_setup.from_config(config)
  rng = np.random.default_rng(0)
  num, k, n = 6, 5, 7

  class FixedSampler:
    """Stands in for the policy: random responses of random lengths, EOS-terminated."""
    def sample_in_chunks(self, params, prompts, lengths, key):
      rows = len(prompts)
      length = rng.integers(1, n + 1, rows)
      mask = (np.arange(n)[None] < length[:, None]).astype(np.float32)
      response = np.where(mask > 0, rng.integers(3, world.lang.vocab_size, (rows, n)), 0)
      response[np.arange(rows), length - 1] = 2
      self.out = SampleOutput(tokens=None, response=response.astype(np.int32), mask=mask,
                              logprobs=None, raw_logprobs=None, prompt_lengths=lengths,
                              lengths=length)
      return self.out

  for score in (None, lambda p, l, y, m: -np.asarray(reward_lib.gold_reward(
      world.gold, prompts=p, prompt_mask=p > 0, responses=y, response_mask=m))):
    sampler = FixedSampler()
    out = demos.best_of_k(sampler, None, world=world, key=jax.random.key(0), num_prompts=num,
                          k=k, prompt_len=8, score=score)
    prompts = np.repeat(out['prompts'], k, axis=0)
    gold = np.asarray(reward_lib.gold_reward(
        world.gold, prompts=prompts, prompt_mask=prompts > 0, responses=sampler.out.response,
        response_mask=sampler.out.mask), np.float64).reshape(num, k)
    pick = gold.argmax(1) if score is None else gold.argmin(1)
    rows = np.arange(num) * k + pick
    np.testing.assert_array_equal(out['response'], sampler.out.response[rows])
    np.testing.assert_allclose(out['gold'], gold[np.arange(num), pick], atol=1e-6)
    np.testing.assert_allclose(out['sample_gold'], gold.mean(1), atol=1e-6)
