"""pretrain -> SFT -> reward model -> PPO, each in DIR/<stage>, each started from the one
before (configs/pipeline.py), then a table of what each stage achieved against the truth.

Stages run through the same checks as the CLI (stages/dispatch.py), so a rerun resumes the
stage it stopped in and passes over finished ones (dispatch.finished: without building
them); a changed stage config is refused by the pipeline's own config.json check, and by
the stage's, as for any run.
"""
import copy
import json
import os

from rlhf_jax import config as config_lib
from rlhf_jax import distributed
from rlhf_jax.errors import UserError
from rlhf_jax.stages import dispatch

ORDER = ('pretrain', 'sft', 'reward_model', 'ppo')


def last_logged_step(flat: dict) -> None:
  """The pipeline logs no metrics of its own (summary.json); each stage is a run of its own
  in DIR/<stage>, to compare as such."""
  return None


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _last(records: list[dict], key: str) -> dict:
  return [r for r in records if key in r][-1]


def summarize(dirs: dict) -> list[dict]:
  """One row per stage from its metrics.jsonl: gold reward of the policy it leaves (with
  standard error), its sequence KL to the stage's reference, and the stage's own figure."""
  pre = _records(dirs['pretrain'])
  sft = _records(dirs['sft'])
  rm = _records(dirs['reward_model'])
  ppo = _records(dirs['ppo'])
  sft_first = [r for r in sft if 'policy/gold_reward' in r][0]  # the pretrained policy
  sft_last, rm_last = _last(sft, 'policy/gold_reward'), _last(rm, 'rm/gold_accuracy')
  ppo_last = _last(ppo, 'policy/gold_reward')
  row = lambda stage, r, kl_to, note: {
      'stage': stage, 'gold_reward': r['policy/gold_reward'],
      'gold_reward_se': r['policy/gold_reward_se'], 'kl': r['policy/kl_ref'], 'kl_to': kl_to,
      'note': note}
  return [
      row('pretrain', sft_first, 'itself',
          f'true KL {_last(pre, "eval/true_kl")["eval/true_kl"]:.3f} nats/token'),
      row('sft', sft_last, 'pretrain', f'{sft_last["step"]} steps'),
      {'stage': 'reward_model', 'gold_reward': None, 'gold_reward_se': None, 'kl': None,
       'kl_to': None, 'note': f'gold agreement {rm_last["rm/gold_accuracy"]:.3f} (noise '
                              f'ceiling {rm_last["rm/noise_ceiling"]:.3f})'},
      row('ppo', ppo_last, 'sft',
          f'proxy reward {ppo_last.get("policy/proxy_reward", float("nan")):.3f}'),
  ]


def table(rows: list[dict]) -> str:
  lines = [f'{"stage":<13} {"gold reward":>17} {"KL (nats)":>10} {"to":>9}  note']
  for r in rows:
    gold = (f'{r["gold_reward"]:.3f} ± {r["gold_reward_se"]:.3f}'
            if r['gold_reward'] is not None else '-')
    kl = f'{r["kl"]:.2f}' if r['kl'] is not None else '-'
    lines.append(f'{r["stage"]:<13} {gold:>17} {kl:>10} {r["kl_to"] or "-":>9}  {r["note"]}')
  return '\n'.join(lines)


def stage_configs(config, workdir: str) -> dict:
  """Each stage's config with its links to sibling stages made absolute."""
  out = {}
  for name in ORDER:
    sub = copy.deepcopy(config.stages[name])
    with sub.unlocked():
      if 'init' in sub:
        sub.init.run = os.path.join(workdir, sub.init.run)
      if 'ppo' in sub and sub.ppo.reward == 'rm':
        sub.ppo.rm_run = os.path.join(workdir, sub.ppo.rm_run)
    out[name] = sub
  return out


def run(config, *, workdir: str) -> None:
  if tuple(config.stages.keys()) != ORDER and set(config.stages.keys()) != set(ORDER):
    raise UserError(f'a pipeline needs the stages {ORDER}, not {tuple(config.stages.keys())}')
  config_lib.write_or_check(config, workdir)
  dirs = {name: os.path.join(workdir, name) for name in ORDER}
  for name, sub in stage_configs(config, workdir).items():
    if dispatch.finished(sub, dirs[name]):
      print(f'pipeline: {name} in {dirs[name]} (finished)', flush=True)
      continue
    print(f'pipeline: {name} in {dirs[name]}', flush=True)
    dispatch.run(sub, dirs[name])
    # Process 0 wrote the stage's metrics and config.json: every process reads them next.
    distributed.barrier(f'pipeline stage {name}')
  rows = summarize(dirs)
  if distributed.is_primary():
    with open(os.path.join(workdir, 'summary.json.tmp'), 'w') as f:
      json.dump(rows, f, indent=2)
    os.replace(os.path.join(workdir, 'summary.json.tmp'), os.path.join(workdir, 'summary.json'))
    print(table(rows), flush=True)
