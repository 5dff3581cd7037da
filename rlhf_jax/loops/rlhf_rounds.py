"""Iterated RLHF: round r deploys policy r, samples fresh comparisons of its responses, has
the annotators label them, refits the reward model on all comparisons so far (or only the
fresh ones: rounds.rm_data), and trains policy r+1 from policy r by PPO against that
reward model, by DPO on the same comparisons, or by rejection sampling: SFT on the best of
k of policy r's samples under that reward model (expert iteration; rounds.policy_update).

Layout of DIR (configs/rlhf_rounds.py):
  prefs/round_<r>/   the comparisons of round r (a preference set; lineage: round, the
                     policy run and checkpoint that produced them)
  round_<r>/rm/      reward model r (trunk from the base SFT run)
  round_<r>/policy/  policy r+1 (a ppo, dpo or sft run started from policy r, whose
                     reference is policy r; for rejection sampling its demos/ are the
                     reward model's best of k)
  round_<r>/summary.json, metrics.jsonl (one line per round, step = r + 1; step 0 is the
                     base policy)

Reward centring: reward model r learns from the comparisons of every round so far
(rm_data='all'), so its own reward_norm.json centres on the responses of all earlier
policies. The PPO run of round r therefore centres on samples of its own reference,
policy r (stages/reward_norm.py; kept in round_<r>/policy/reward_norm.json), so the proxy
it maximises is 0 on average at policy r in every round.

Per round, measured on the fixed eval prompts against the base SFT policy:
rounds/gold_reward (and _se), rounds/proxy_reward (reward model r; after a PPO round with
the checkpoint and statistics its PPO run used, otherwise centred by the reward model's
own statistics), rounds/kl_sft,
rounds/group{g}_reward (the minority group's reward next to the majority's),
rounds/rm_gold_accuracy (reward model r on its held-out pairs) and
rounds/rm_drift_gold_accuracy (reward model r on the comparisons of policy r+1, which it
never saw: how far the policy moved off its data). Every step of the loop resumes:
finished sets, runs and summaries are kept, a stopped run goes on from its checkpoint, and
a round whose summary is written is read back without re-entering its runs.

Several processes (one GSPMD program, stages/dispatch.MULTI_PROCESS): every process runs
every stage and measurement alike; process 0 alone writes the comparisons, the rejection
sampling demos, the summaries and metrics.jsonl, and the others wait for each write at a
barrier before they read it (distributed.make_once).
"""
import copy
import functools
import json
import os

import jax
import numpy as np

from rlhf_jax import distributed, sampling, sharding
from rlhf_jax.data import array_store, demos, preferences
from rlhf_jax.config import with_fields
from rlhf_jax.errors import UserError
from rlhf_jax.loops import records
from rlhf_jax.stages import dispatch, preference_data, reward_eval, reward_norm
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.stages.policy_eval import PolicyEvaluator
from rlhf_jax.train import ppo_step, reward_step, runs

POLICY_UPDATES = ('ppo', 'dpo', 'rejection_sampling')
SCORE_CHUNK = 1024  # rows per reward-model forward (one compiled shape)
RM_DATA = ('all', 'fresh')


def last_logged_step(flat: dict) -> int | None:
  """Step 0 is the base policy, then one line per round (step r + 1)."""
  n = flat.get('rounds.num')
  return n if isinstance(n, int) else None


def resolve(config) -> None:
  """Checks the loop's own fields before anything runs."""
  r = config.rounds
  if r.policy_update not in POLICY_UPDATES:
    raise UserError(f'rounds.policy_update={r.policy_update!r} is not one of {POLICY_UPDATES}')
  if r.rm_data not in RM_DATA:
    raise UserError(f'rounds.rm_data={r.rm_data!r} is not one of {RM_DATA}')
  if r.num < 1:
    raise UserError(f'rounds.num={r.num} must be >= 1')
  runs.read_config(os.path.abspath(r.init_run), role='rounds.init_run')
  runs.checkpoint_step(r.init_run, step=None, role='rounds.init_run')


class Paths:

  def __init__(self, workdir: str, base: str):
    self.workdir, self.base = workdir, os.path.abspath(base)

  def prefs(self, r: int) -> str:
    return os.path.join(self.workdir, 'prefs', f'round_{r}')

  def rm(self, r: int) -> str:
    return os.path.join(self.workdir, f'round_{r}', 'rm')

  def policy(self, r: int) -> str:
    """Policy r: the base SFT run for r = 0, else the policy run of round r - 1."""
    return self.base if r == 0 else os.path.join(self.workdir, f'round_{r - 1}', 'policy')

  def summary(self, r: int) -> str:
    return os.path.join(self.workdir, f'round_{r}', 'summary.json')


def make_comparisons(config, paths: Paths, r: int) -> str:
  """The labelled comparisons of policy r's responses (made once; process 0 writes them)."""
  directory = paths.prefs(r)

  def make():
    sub = with_fields(config.stages.reward_model,
                      **{'init.run': paths.policy(r), 'prefs.round': r})
    runs.adopt(sub)
    preference_data.make_shard(sub, FromRun(sub, rows_per_step=sub.train.batch_size),
                               directory=directory)
  distributed.make_once(directory, exists=bool(preferences.shard_paths(directory)), make=make)
  return directory


def rejection_sampling_demos(sft_config, paths: Paths, r: int) -> None:
  """Policy r's best of sft.samples_per_prompt samples under reward model r, written
  (once, by process 0) where the SFT stage of round r reads its demonstrations."""
  path = os.path.join(paths.policy(r + 1), 'demos')
  distributed.make_once(path, exists=os.path.isdir(path),
                        make=lambda: _make_demos(sft_config, paths, r, path))


def _make_demos(sft_config, paths: Paths, r: int, path: str) -> None:
  config = copy.deepcopy(sft_config)
  runs.adopt(config)
  setup = FromRun(config, rows_per_step=config.train.batch_size)
  s = config.sft
  rm = runs.load_reward_model(paths.rm(r), mesh=setup.mesh, mesh_config=config.mesh)
  # Centring shifts every sample of a prompt alike, so the best of k does not depend on it;
  # the statistics only have to be this checkpoint's.
  norm = reward_norm.to_norm(reward_norm.read_rm(paths.rm(r), step=rm.step,
                                                 members=rm.config.rm.ensemble,
                                                 role=f'reward model {r}'), mode='mean')
  proxy = jax.jit(functools.partial(ppo_step.proxy_reward, rm_model=rm.model))
  chunk = -(-SCORE_CHUNK // setup.dp) * setup.dp

  def score(prompts, lengths, responses, mask):
    out = []
    for lo in range(0, len(prompts), chunk):
      rows = np.arange(lo, lo + chunk)
      rows = np.where(rows < len(prompts), rows, lo)
      inputs = (prompts[rows], lengths[rows], responses[rows], mask[rows])
      inputs = distributed.put_global(
          inputs, sharding.batch_tree_sharding(setup.mesh, config.mesh, inputs))
      out.append(np.asarray(distributed.to_host(proxy(rm.params, norm, *inputs)))
                 [:len(prompts) - lo])
    return np.concatenate(out)

  sampler = sampling.Sampler(
      model=setup.init.model,
      config=sampling.SampleConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature),
      mesh=setup.mesh, mesh_config=config.mesh, param_shardings=setup.init.param_shardings)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0xDE30), r + 1)
  with sharding.activate(setup.mesh, config.mesh):
    arrays = demos.best_of_k(sampler, setup.init.params, world=setup.world, key=key,
                             num_prompts=s.num_prompts, k=s.samples_per_prompt,
                             prompt_len=s.prompt_len, score=score)
  if not distributed.is_primary():
    return
  os.makedirs(paths.policy(r + 1), exist_ok=True)
  array_store.write(path, arrays, lineage={
      **setup.lineage(), 'round': r, 'rm_run': paths.rm(r), 'k': s.samples_per_prompt,
      'scheme': 'best-of-k under the reward model (rejection sampling)',
      'temperature': s.temperature, 'demos': s.num_prompts})


def _last(workdir: str, key: str) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if key in r][-1]


class Measure:
  """Scores a policy on the fixed eval prompts against the base SFT policy, and a reward
  model on a preference set, on one mesh."""

  def __init__(self, config, paths: Paths):
    self.loop_config, self.paths = config, paths
    self.config = with_fields(config.stages.reward_model, **{'init.run': paths.base})
    runs.adopt(self.config)
    self.setup = FromRun(self.config, rows_per_step=self.config.train.batch_size)
    s = self.setup
    self.policy = PolicyEvaluator(config=self.config, world=s.world, model=s.init.model,
                                  mesh=s.mesh, mesh_config=self.config.mesh,
                                  param_shardings=s.init.param_shardings,
                                  ref_params=s.init.params, dp=s.dp)

  def load_rm(self, r: int):
    """(reward model r, its RewardNorm). After a PPO round: the checkpoint and statistics
    its PPO run used (on samples of policy r, its reference), so rounds/proxy_reward is the
    proxy that run maximised, 0 at policy r; otherwise the newest checkpoint with the
    reward model's own statistics (its held-out responses), centred."""
    step, stats, mode = None, None, 'mean'
    if self.loop_config.rounds.policy_update == 'ppo':
      stats = reward_norm.read_ppo(self.paths.policy(r + 1))
      step, mode = stats['rm_step'], self.loop_config.stages.ppo.ppo.reward_norm
    rm = runs.load_reward_model(self.paths.rm(r), mesh=self.setup.mesh,
                                mesh_config=self.config.mesh, step=step)
    if stats is None:
      stats = reward_norm.read_rm(self.paths.rm(r), step=rm.step,
                                  members=rm.config.rm.ensemble, role=f'reward model {r}')
    return rm, reward_norm.to_norm(stats, mode=mode)

  def policy_metrics(self, policy_dir: str, rm=None) -> dict:
    s = self.setup
    params = s.init.params if policy_dir == s.init.workdir else runs.load(
        policy_dir, mesh=s.mesh, mesh_config=self.config.mesh).params
    self.policy.proxy = None
    if rm is not None:
      (loaded, norm) = rm
      score = jax.jit(functools.partial(ppo_step.proxy_reward, rm_model=loaded.model))
      self.policy.proxy = lambda *rollout: score(loaded.params, norm, *distributed.put_global(
          rollout, sharding.batch_tree_sharding(s.mesh, self.config.mesh, rollout)))
    with sharding.activate(s.mesh, self.config.mesh):
      return self.policy(params)

  def rm_gold_accuracy(self, rm, directory: str) -> float:
    """Agreement of the reward model with the gold preference on every pair of a set."""
    loaded, _ = rm
    pairs, _ = preferences.read(directory)
    rewards = jax.jit(functools.partial(reward_step.pair_rewards, model=loaded.model))
    b = self.config.train.batch_size
    chosen, rejected = [], []
    with sharding.activate(self.setup.mesh, self.config.mesh):
      for lo in range(0, len(pairs), b):
        rows = np.arange(lo, lo + b)
        valid = rows < len(pairs)
        batch = preference_data.pair_rows(pairs, np.where(valid, rows, lo), valid)
        batch = distributed.put_global(batch, sharding.batch_tree_sharding(
            self.setup.mesh, self.config.mesh, batch))
        c, r = distributed.to_host(rewards(loaded.params, batch))
        chosen.append(np.asarray(c)[:, valid])
        rejected.append(np.asarray(r)[:, valid])
    out = reward_eval.metrics(np.concatenate(chosen, 1), np.concatenate(rejected, 1), pairs,
                              group_utility=reward_eval.group_utilities(self.setup.world, pairs))
    return out['rm/gold_accuracy']


def _row(step: int, metrics: dict) -> dict:
  keep = ('gold_reward', 'gold_reward_se', 'proxy_reward', 'group0_reward', 'group1_reward',
          'harm_rate', 'response_length')
  row = {'step': step, 'rounds/kl_sft': metrics['policy/kl_ref']}
  row.update({f'rounds/{k}': metrics[f'policy/{k}'] for k in keep if f'policy/{k}' in metrics})
  return row


def run(config, *, workdir: str) -> None:
  from rlhf_jax import config as config_lib
  config_lib.write_or_check(config, workdir)
  rounds = config.rounds
  paths = Paths(workdir, rounds.init_run)
  measure = None
  rows = []
  base_summary = os.path.join(workdir, 'base_summary.json')

  def measure_base():
    nonlocal measure
    measure = Measure(config, paths)
    records.write_json(base_summary, _row(0, measure.policy_metrics(paths.base)))
  distributed.make_once(base_summary, exists=os.path.exists(base_summary), make=measure_base)
  rows.append(json.load(open(base_summary)))
  for r in range(rounds.num):
    distributed.barrier(f'rlhf_rounds: looked for round {r}')  # no process decides after
    if os.path.exists(paths.summary(r)):                        # another has written
      # A finished round (its summary is written last) is read, not re-entered: its runs'
      # configs are fixed by this loop's config.json, checked above.
      rows.append(json.load(open(paths.summary(r))))
      continue
    print(f'rlhf_rounds: round {r}', flush=True)
    make_comparisons(config, paths, r)
    data = ','.join(paths.prefs(k) for k in range(r + 1)) if rounds.rm_data == 'all' \
        else paths.prefs(r)
    dispatch.run(with_fields(config.stages.reward_model, **{'init.run': paths.base,
                                                            'prefs.dir': data}), paths.rm(r))
    distributed.barrier(f'rlhf_rounds: reward model {r}')  # its metrics, read below
    if rounds.policy_update == 'ppo':
      sub = with_fields(config.stages.ppo, **{'init.run': paths.policy(r),
                                              'ppo.rm_run': paths.rm(r)})
    elif rounds.policy_update == 'dpo':
      sub = with_fields(config.stages.dpo, **{'init.run': paths.policy(r), 'prefs.dir': data})
    else:
      sub = with_fields(config.stages.sft, **{'init.run': paths.policy(r)})
      rejection_sampling_demos(sub, paths, r)
    dispatch.run(sub, paths.policy(r + 1))
    distributed.barrier(f'rlhf_rounds: policy {r + 1}')  # its metrics and reward_norm.json
    measure = measure or Measure(config, paths)
    rm = measure.load_rm(r)
    row = _row(r + 1, measure.policy_metrics(paths.policy(r + 1), rm))
    row['rounds/rm_gold_accuracy'] = _last(paths.rm(r), 'rm/gold_accuracy')['rm/gold_accuracy']
    row['rounds/rm_drift_gold_accuracy'] = measure.rm_gold_accuracy(
        rm, make_comparisons(config, paths, r + 1))
    row['rounds/rm_train_pairs'] = _last(paths.rm(r), 'rm/train_pairs')['rm/train_pairs']
    row['lineage'] = {'round': r, 'policy_from': paths.policy(r),
                      'policy_run': paths.policy(r + 1), 'rm_run': paths.rm(r),
                      'comparisons': data.split(',')}
    records.write_json(paths.summary(r), row)
    distributed.barrier(f'rlhf_rounds: summary of round {r}')
    rows.append(json.load(open(paths.summary(r))))
    records.write_metrics(workdir, rows)
  records.write_metrics(workdir, rows)
  if distributed.is_primary():
    print(table(rows), flush=True)


def table(rows: list[dict]) -> str:
  cols = (('gold', 'rounds/gold_reward', '{:.3f}'), ('proxy', 'rounds/proxy_reward', '{:.3f}'),
          ('KL to SFT', 'rounds/kl_sft', '{:.2f}'), ('majority', 'rounds/group0_reward', '{:.3f}'),
          ('minority', 'rounds/group1_reward', '{:.3f}'),
          ('RM gold acc', 'rounds/rm_gold_accuracy', '{:.3f}'),
          ('RM drift acc', 'rounds/rm_drift_gold_accuracy', '{:.3f}'))
  return records.table(rows, label='policy', cols=cols, width=13)
