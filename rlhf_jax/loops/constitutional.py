"""Constitutional AI on the world: a judge LM is trained (or named), then SL-CAI fine-tunes
the policy on its own responses revised under the judge's critiques, then RL-CAI learns
from comparisons the judge labels (all, or all but judge.human_fraction, which go to the
annotators): a reward model on them and PPO against it, or DPO on them directly; or PPO
with the judge's verdict on each rollout as the reward itself (direct RLAIF, Lee et al.
2023) (configs/cai.py; Bai et al. 2022).

Layout of DIR:
  judge/   the judge run, unless cai.judge_run names one. judge.kind='lm': a judge LM
           (stages/judge.py) made from cai.judge_init (default: cai.init_run), learning
           on cai.init_run's samples; 'rm': a reward model (stages.reward_model) on
           about judge.human_budget human comparisons of cai.init_run's samples
  sl/      SL-CAI: an SFT run from cai.init_run whose demos/ are the revised responses
           (data/revisions.py; made by this loop before the run starts)
  rm/      RL-CAI's reward model, on AI-labelled comparisons of the SL policy's samples
  rl/      RL-CAI's policy: PPO against rm/ (cai.rl='ppo'), DPO on the comparisons
           (cai.rl='dpo') or PPO against the judge (cai.rl='direct'; no rm/), from the SL
           policy
  summary.json, metrics.jsonl (step 0: the init policy; 1: after SL; 2: after RL)

Each row: cai/gold_reward (and _se), cai/harm_rate, cai/kl_init (sequence KL to the init
policy, on the same fixed eval prompts as every stage), cai/response_length; the SL row
adds the revisions' figures, the RL row the labels spent by people and by the judge (for
'direct': the rollouts the judge scored, each against one reference response); the
summary also holds the judge's own figures (judge/* of its last evaluation).

Every step resumes: a finished stage is passed over (dispatch.finished), a stopped one goes
on from its checkpoint, and the demos and comparisons are made once. One process only
(stages/dispatch.MULTI_PROCESS does not list it yet).
"""
import copy
import json
import os

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, judges, sampling, sharding
from rlhf_jax.data import array_store, preferences, revisions
from rlhf_jax.config import with_fields
from rlhf_jax.errors import UserError
from rlhf_jax.loops import records
from rlhf_jax.stages import dispatch
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.stages.policy_eval import PolicyEvaluator
from rlhf_jax.train import runs
from rlhf_jax.world import constitution

PLANS = ('sl_rl', 'sl', 'rl')
RL = ('ppo', 'dpo', 'direct')


def last_logged_step(flat: dict) -> int | None:
  plan = flat.get('cai.plan')
  return {'sl_rl': 2, 'sl': 1, 'rl': 1}.get(plan)


def resolve(config) -> None:
  c = config.cai
  if c.plan not in PLANS:
    raise UserError(f'cai.plan={c.plan!r} is not one of {PLANS}')
  if c.rl not in RL:
    raise UserError(f'cai.rl={c.rl!r} is not one of {RL}')
  if c.revisions < 1 or c.num_prompts < 1:
    raise UserError(f'cai.revisions={c.revisions} and cai.num_prompts={c.num_prompts} '
                    'must be >= 1')
  if not 0 <= config.judge.human_fraction <= 1:
    raise UserError(f'judge.human_fraction={config.judge.human_fraction} must be in [0, 1]')
  if config.judge.kind not in judges.KINDS:
    raise UserError(f'judge.kind={config.judge.kind!r} is not one of {judges.KINDS}')
  if c.rl == 'direct' and config.judge.kind != 'lm':
    raise UserError("cai.rl='direct' scores rollouts with a judge LM (judge.kind='lm'); "
                    "a reward-model judge is cai.rl='ppo'")
  if c.rl == 'direct' and config.judge.human_fraction > 0 and c.plan != 'sl':
    raise UserError("cai.rl='direct' asks no annotator (the judge scores every rollout); "
                    f'judge.human_fraction={config.judge.human_fraction} must be 0')
  constitution.from_block(config.constitution)
  if c.judge_run:
    judge = runs.read_config(os.path.abspath(c.judge_run), role='cai.judge_run')
    want = 'judge' if config.judge.kind == 'lm' else 'reward_model'
    if judge.get('stage') != want:
      raise UserError(f'cai.judge_run {c.judge_run} is a {judge.get("stage")!r} run; '
                      f'judge.kind={config.judge.kind!r} needs a {want} run')
  elif config.judge.kind == 'rm' and config.judge.human_budget < 1:
    raise UserError(f'judge.human_budget={config.judge.human_budget} must be >= 1: the '
                    'human comparisons the reward-model judge learns from')
  runs.read_config(os.path.abspath(c.init_run), role='cai.init_run')
  runs.checkpoint_step(c.init_run, step=None, role='cai.init_run')


def _run(sub, workdir: str) -> None:
  if not dispatch.finished(sub, workdir):
    dispatch.run(sub, workdir)


def _feedback(config, judge_run: str) -> dict:
  """The judge and constitution blocks a stage that labels comparisons carries."""
  judge = copy.deepcopy(config.judge)
  with judge.unlocked():
    judge.run = judge_run
  return {'judge': judge, 'constitution': copy.deepcopy(config.constitution)}


def rm_judge_config(config, init: str):
  """The reward-model judge of semi-automated RLHF: stages.reward_model from the init
  policy on about judge.human_budget human comparisons of its samples (every pair of
  prefs.responses_per_prompt responses to ceil(budget / pairs per prompt) prompts)."""
  sub = config.stages.reward_model
  k = sub.prefs.responses_per_prompt
  prompts = -(-config.judge.human_budget // (k * (k - 1) // 2))
  return with_fields(sub, **{'init.run': init, 'prefs.num_prompts': max(prompts, 2)})


def make_revisions(config, sft_config, judge_run: str, path: str) -> None:
  """SL-CAI's demonstrations (made once) where the SFT run in sl/ reads them."""
  c = config.cai

  def make():
    sub = copy.deepcopy(sft_config)
    runs.adopt(sub)
    setup = FromRun(sub, rows_per_step=sub.train.batch_size)
    principles = constitution.from_block(config.constitution)
    judge = judges.make(_feedback(config, judge_run)['judge'], gold=setup.world.gold,
                        num_principles=len(principles), mesh=setup.mesh,
                        mesh_config=sub.mesh, dp=setup.dp)
    sampler = sampling.Sampler(
        model=setup.init.model,
        config=sampling.SampleConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature),
        mesh=setup.mesh, mesh_config=sub.mesh, param_shardings=setup.init.param_shardings)
    key = jax.random.fold_in(jax.random.key(config.seed), 0xCA1)
    with sharding.activate(setup.mesh, sub.mesh):
      arrays, figures = revisions.critique_and_revise(
          sampler, setup.init.params, judge=judge, principles=principles, world=setup.world,
          key=key, num_prompts=c.num_prompts, prompt_len=c.prompt_len, revisions=c.revisions)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array_store.write(path, arrays, lineage={
        **setup.lineage(), **figures, 'judge_run': judge_run, 'revisions': c.revisions,
        'scheme': 'SL-CAI: drafts the judge prefers under a drawn principle replace the '
                  'response', 'constitution': config.constitution.to_dict()})
  distributed.make_once(path, exists=os.path.isdir(path), make=make)


class Measure:
  """Policies on the fixed eval prompts against the init policy."""

  def __init__(self, sft_config):
    self.config = copy.deepcopy(sft_config)
    runs.adopt(self.config)
    s = self.setup = FromRun(self.config, rows_per_step=self.config.train.batch_size)
    self.evaluate = PolicyEvaluator(config=self.config, world=s.world, model=s.init.model,
                                    mesh=s.mesh, mesh_config=self.config.mesh,
                                    param_shardings=s.init.param_shardings,
                                    ref_params=s.init.params, dp=s.dp)

  def __call__(self, step: int, run_dir: str | None) -> dict:
    s = self.setup
    params = s.init.params if run_dir is None else runs.load(
        run_dir, mesh=s.mesh, mesh_config=self.config.mesh).params
    with sharding.activate(s.mesh, self.config.mesh):
      m = self.evaluate(params)
    return {'step': step, 'cai/gold_reward': m['policy/gold_reward'],
            'cai/gold_reward_se': m['policy/gold_reward_se'],
            'cai/harm_rate': m['policy/harm_rate'], 'cai/kl_init': m['policy/kl_ref'],
            'cai/response_length': m['policy/response_length']}


def _last(workdir: str, key: str) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if key in r][-1]


def run(config, *, workdir: str) -> None:
  config_lib.write_or_check(config, workdir)
  c, st = config.cai, config.stages
  dirs = {n: os.path.join(workdir, n) for n in ('judge', 'sl', 'rm', 'rl')}
  judge_run = os.path.abspath(c.judge_run) if c.judge_run else dirs['judge']
  if not c.judge_run:
    print(f'cai: judge in {judge_run}', flush=True)
  init = os.path.abspath(c.init_run)
  if not c.judge_run and config.judge.kind == 'rm':
    _run(rm_judge_config(config, init), judge_run)
  elif not c.judge_run:
    judge_init = os.path.abspath(c.judge_init) if c.get('judge_init') else init
    _run(with_fields(st.judge, **{'init.run': judge_init, 'judge_data.policy_run': init,
                                  'constitution': copy.deepcopy(config.constitution)}),
         judge_run)
  sft = with_fields(st.sft, **{'init.run': init})
  measure = Measure(sft)
  rows = [measure(0, None)]
  start = init
  if c.plan in ('sl_rl', 'sl'):
    demos_path = os.path.join(dirs['sl'], 'demos')
    print(f'cai: SL-CAI in {dirs["sl"]}', flush=True)
    make_revisions(config, sft, judge_run, demos_path)
    _run(sft, dirs['sl'])
    _, lineage = array_store.read(demos_path, ())
    rows.append({**measure(1, dirs['sl']),
                 'cai/demo_first_harm_rate': lineage['first_harm_rate'],
                 'cai/demo_revised_harm_rate': lineage['revised_harm_rate'],
                 'cai/demo_first_gold': lineage['first_gold'],
                 'cai/demo_revised_gold': lineage['revised_gold']})
    start = dirs['sl']
  if c.plan in ('sl_rl', 'rl'):
    print(f'cai: RL-CAI ({c.rl}) in {dirs["rl"]}', flush=True)
    feedback = _feedback(config, judge_run)
    if c.rl == 'direct':
      ppo = with_fields(st.ppo, **{'init.run': start, 'ppo.reward': 'judge'}, **feedback)
      _run(ppo, dirs['rl'])
      spent = {'cai/human_labels': 0,
               'cai/judge_labels': ppo.train.steps * ppo.train.batch_size}
    else:
      if c.rl == 'ppo':
        _run(with_fields(st.reward_model, **{'init.run': start}, **feedback), dirs['rm'])
        _run(with_fields(st.ppo, **{'init.run': start, 'ppo.rm_run': dirs['rm']}),
             dirs['rl'])
        labelled = os.path.join(dirs['rm'], 'preferences')
      else:
        _run(with_fields(st.dpo, **{'init.run': start}, **feedback), dirs['rl'])
        labelled = os.path.join(dirs['rl'], 'preferences')
      pairs, _ = preferences.read(labelled)
      spent = {'cai/human_labels': int((pairs.labeller == preferences.HUMAN).sum()),
               'cai/judge_labels': int((pairs.labeller == preferences.JUDGE).sum()),
               'cai/label_gold_agreement': float(np.mean(
                   pairs.gold_chosen > pairs.gold_rejected))}
    rows.append({**measure(len(rows), dirs['rl']), **spent,
                 **({'cai/judge_human_labels': _last(judge_run, 'rm/train_pairs')[
                     'rm/train_pairs']} if config.judge.kind == 'rm' else {})})
  if config.judge.kind == 'lm':
    judge_row = {k: v for k, v in _last(judge_run, 'judge/agreement').items()
                 if k.startswith('judge/')}
  else:  # a reward model's own held-out figures, and the human labels it cost
    last = _last(judge_run, 'rm/gold_accuracy')
    judge_row = {'judge/gold_agreement': last['rm/gold_accuracy'],
                 'judge/human_labels': _last(judge_run, 'rm/train_pairs')['rm/train_pairs']}
  records.write_json(os.path.join(workdir, 'summary.json'),
                     {'rows': rows, 'judge': judge_row, 'lineage': {
                         'init_run': init, 'judge_run': judge_run, **{
                             k: v for k, v in dirs.items() if os.path.isdir(v)}}})
  records.write_metrics(workdir, rows)
  print(table(rows), flush=True)


def table(rows: list[dict]) -> str:
  cols = (('gold', 'cai/gold_reward', '{:.3f}'), ('± se', 'cai/gold_reward_se', '{:.3f}'),
          ('harm rate', 'cai/harm_rate', '{:.3f}'), ('KL to init', 'cai/kl_init', '{:.2f}'),
          ('length', 'cai/response_length', '{:.1f}'),
          ('human lab.', 'cai/human_labels', '{}'), ('judge lab.', 'cai/judge_labels', '{}'))
  return records.table(rows, label='stage', cols=cols, width=12)
