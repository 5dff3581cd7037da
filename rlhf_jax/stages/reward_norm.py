"""Reward normalisation: each reward-model member's mean and standard deviation on samples
of a reference policy, so that the proxy reward is 0 on average at that policy (and, with
ppo.reward_norm='mean_std', each member has unit spread there before the members are
averaged, as Huang et al. 2024 normalise the reward model).

Two files hold such statistics, each naming the checkpoint they belong to:

  <reward_model run>/reward_norm.json  written by the reward-model stage at its end: the
      final checkpoint's (`step`) members on the responses of its held-out pairs, which
      the policies that made its preference set wrote. `read_rm` refuses them for any
      other checkpoint of the run.
  <ppo run>/reward_norm.json  written by the PPO stage before its first update
      (`for_ppo`): the members of ppo.rm_run at the checkpoint it loads (`rm_step`), on
      one response of its reference policy (init.run at `reference_step`) to each of
      ppo.reward_norm_prompts world prompts, drawn and sampled as its rollouts are
      (ppo.prompt_len, ppo.max_new_tokens, temperature 1) with keys from config.seed. A
      resumed run reads them back and so centres with the very same numbers; a run that
      would load other runs or checkpoints than they name is refused. With ppo.data=
      'jsonl:PATH' the prompts are the file's rollout pool instead (stages/jsonl_prompts.py
      reward_norm_prompts), and the file's sha256 is named with the rest.
"""
import json
import os

import jax
import numpy as np

from rlhf_jax import distributed, sampling, sharding
from rlhf_jax.data.preferences import world_prompts
from rlhf_jax.errors import UserError
from rlhf_jax.train import ppo_step

FILE = 'reward_norm.json'
SCORE_CHUNK = 1024  # rows per reward-model forward (one compiled shape)


def moments(members) -> dict:
  """{'mean', 'std'}: lists of [K] float64 moments (std with ddof 0) of rewards [K, N]."""
  members = np.asarray(members, np.float64)
  return {'mean': members.mean(axis=1).tolist(), 'std': members.std(axis=1).tolist()}


def to_norm(stats: dict, *, mode: str) -> ppo_step.RewardNorm:
  """The RewardNorm of statistics `stats` under ppo.reward_norm `mode`."""
  mean = np.asarray(stats['mean'], np.float32)
  scale = np.asarray(stats['std'], np.float32) if mode == 'mean_std' else np.ones_like(mean)
  if not (scale > 0).all():
    raise UserError(f"ppo.reward_norm='mean_std': a member's reward has std {scale.min()} on "
                    "the reference samples (a constant reward cannot be scaled); use 'mean'")
  return ppo_step.RewardNorm(mean=mean, scale=scale)


def _read(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      stats = json.load(f)
    for key in ('mean', 'std'):
      if not isinstance(stats[key], list):
        raise ValueError(f'{key} is not a list')
    return stats
  except FileNotFoundError:
    raise UserError(f'{what} has no {FILE}: its run has not finished') from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path} is unreadable ({e!r})') from None


def read_rm(rm_run: str, *, step: int | None = None, members: int | None = None,
            role: str = 'ppo.rm_run') -> dict:
  """A reward_model run's own statistics (see the module docstring), checked to belong to
  checkpoint `step` (None: any) of an ensemble of `members` (None: any)."""
  path = os.path.join(os.path.abspath(rm_run), FILE)
  stats = _read(path, f'{role} {rm_run}')
  if step is not None and stats.get('step') != step:
    raise UserError(f'{path} holds the statistics of checkpoint {stats.get("step")}, not of '
                    f'checkpoint {step}, which was loaded')
  if members is not None and len(stats['mean']) != members:
    raise UserError(f'{path} holds {len(stats["mean"])} members\' statistics; the reward '
                    f'model has {members}')
  return stats


def read_ppo(ppo_run: str) -> dict:
  """The statistics a PPO run centred with (its DIR/reward_norm.json, from `for_ppo`)."""
  return _read(os.path.join(os.path.abspath(ppo_run), FILE), f'ppo run {ppo_run}')


def reference_samples(config, setup, *, given=None):
  """(prompts [N, P], lengths [N], responses [N, T], mask [N, T]) host arrays: one sample
  of the reference policy (setup.init) for each of the N = ppo.reward_norm_prompts (rounded
  up to the data-parallel size) prompts, as PPO samples its rollouts. given: those N
  (prompts, lengths) instead of world prompts."""
  p = config.ppo
  key = jax.random.fold_in(jax.random.key(config.seed), 0x4E0)
  if given is not None:
    prompts, lengths = given
  else:
    prompts, lengths = world_prompts(setup.world.lang, key=jax.random.fold_in(key, 0),
                                     num=setup.round_rows(p.reward_norm_prompts),
                                     max_len=p.prompt_len)
  sampler = sampling.Sampler(model=setup.init.model,
                             config=sampling.SampleConfig(max_new_tokens=p.max_new_tokens),
                             mesh=setup.mesh, mesh_config=config.mesh,
                             param_shardings=setup.init.param_shardings)
  out = sampler.sample_in_chunks(setup.init.params, np.asarray(prompts), np.asarray(lengths),
                                 jax.random.fold_in(key, 1))
  return np.asarray(prompts), np.asarray(lengths), out.response, out.mask


def score_members(rm, prompts, lengths, responses, mask, *, mesh, mesh_config,
                  dp: int) -> np.ndarray:
  """[K, N] the members' rewards (rm: a runs.LoadedRun of a reward model), SCORE_CHUNK rows
  at a time (the last chunk padded with copies of its first row)."""
  score = jax.jit(lambda params, *rows: ppo_step.member_rewards(params, *rows,
                                                                rm_model=rm.model))
  n = len(prompts)
  chunk = -(-min(SCORE_CHUNK, n) // dp) * dp
  parts = []
  with sharding.activate(mesh, mesh_config):
    for lo in range(0, n, chunk):
      rows = np.arange(lo, lo + chunk)
      rows = np.where(rows < n, rows, lo)
      chunk_rows = (prompts[rows], lengths[rows], responses[rows], mask[rows])
      out = score(rm.params, *distributed.put_global(
          chunk_rows, sharding.batch_tree_sharding(mesh, mesh_config, chunk_rows)))
      parts.append(np.asarray(distributed.to_host(out))[:, :n - lo])
  return np.concatenate(parts, axis=1)


def for_ppo(config, setup, rm, *, workdir: str, given=None, prompts_sha256=None) -> dict:
  """The statistics a PPO run in `workdir` centres with: read from DIR/reward_norm.json if
  an earlier start of the run wrote it, else computed on samples of its reference policy
  and written (process 0). rm: the reward model it loaded (runs.LoadedRun). given, and
  prompts_sha256: the JSONL prompts to sample on (reference_samples) and their file's."""
  source = {'rm_run': rm.workdir, 'rm_step': int(rm.step), 'reference_run': setup.init.workdir,
            'reference_step': int(setup.init.step),
            'samples': setup.round_rows(config.ppo.reward_norm_prompts)}
  if prompts_sha256 is not None:
    source['prompts_sha256'] = prompts_sha256
  path = os.path.join(workdir, FILE)
  if os.path.exists(path):
    stats = _read(path, workdir)
    differ = [f'{k} {stats.get(k)} (this run: {v})' for k, v in source.items()
              if stats.get(k) != v]
    if len(stats['mean']) != rm.config.rm.ensemble:
      differ.append(f'{len(stats["mean"])} members (this run: {rm.config.rm.ensemble})')
    if differ:
      raise UserError(f'{path} holds the reward statistics of {", ".join(differ)}: the run '
                      'cannot go on with other centring; start it in a new --workdir')
    return stats
  members = score_members(rm, *reference_samples(config, setup, given=given), mesh=setup.mesh,
                          mesh_config=config.mesh, dp=setup.dp)
  stats = {**source, **moments(members)}
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(stats, f, indent=2)
    os.replace(path + '.tmp', path)
  return stats
