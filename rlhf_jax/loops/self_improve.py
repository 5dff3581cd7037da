"""The self-improvement loop: round r's policy samples self_improve.samples solutions to
each of self_improve.prompts fresh problems of the task, a filter keeps some, and policy
r+1 is fine-tuned on the kept ones (expert iteration; STaR with self_improve.init='base',
ReST with 'previous'). Which samples the filter keeps decides whether the loop climbs or
collapses; every number below is measured against the task's exact verifier whatever the
filter.

Filters (self_improve.filter):
  exact             the task's verifier: a sample is kept when it is right
  learned           an outcome reward model (stages/outcome_data.py), refit each round from
                    policy r on self_improve.label_budget exact labels of round r's samples
                    plus every earlier round's (the labelled rows bought so far). A
                    labelled sample is kept by its label; of the others the ORM keeps the
                    highest-scored share p, p the pass rate of this round's labelled rows
                    (the operating point at the estimated base rate: at P > 1/2 a weak ORM
                    keeps nothing)
  self_consistency  the samples whose stated answer is their problem's majority answer
                    (maj@k's vote, analysis/self_improve_metrics.py); no external check
  none              every sample (plain synthetic-data recursion, the collapse baseline)
Schedules: replace (policy r+1 trains on round r's kept samples) | accumulate (on the kept
samples of rounds 0..r). A round whose training data covers fewer than two problems
trains nothing: policy r+1 is policy r (round_<r>/no_update.json says why).

With self_improve.trainer='grpo' policy r+1 is instead a GRPO run from policy r
(stages.grpo) on fresh problems (its seed round_seed(seed, r)), each rollout scored online
by the filter's verdict: the verifier (exact), ORM r's P(correct) (learned), agreement
with its group's majority answer (self_consistency, as TTRL); the schedule does not apply
(GRPO samples its own data), and filter 'none' is refused (every score alike). Round r's
samples are still drawn and judged, so the filter's precision and recall are measured.

Layout of DIR (configs/self_improve.py):
  round_<r>/samples/     policy r's samples of round r's problems, graded (array store;
                         lineage: round, policy run and checkpoint, temperature)
  round_<r>/labels/      learned: the rows given exact labels this round
  round_<r>/orm/         learned: the outcome reward model r (a reward_model run)
  round_<r>/kept/        the filter's verdict per sample (and the ORM's score)
  round_<r>/policy/      policy r+1: an SFT run from policy r (or the warm start) whose
                         demos/ are the training data the schedule gives (or a GRPO run)
  round_<r>/summary.json, metrics.jsonl: one line per policy r = 0..rounds (step r)

Per policy r: eval/* on the fixed held-out problems (stages/task_eval.py: pass@k, maj@k,
eval/kl_ref to the warm start), self_improve/true_kl (world: the mean KL of the true
language's next-token distribution to the policy's on true rows, as collapse/true_kl),
and on its round's samples self_improve/sample_pass_rate, distinct_traces and
answer_entropy. For r < rounds also the filter against the verifier: precision, recall,
kept_fraction (analysis/self_improve_metrics.py; NaN where undefined), kept_rows,
train_rows, and self_improve/labels: the exact labels the filter has used so far (exact:
every sample it graded; learned: the rows it bought; the others: 0). Every step resumes:
stores are made once, runs continue from their checkpoints, a finished round is read back
from its summary.

Several processes (one GSPMD program, stages/dispatch.MULTI_PROCESS): every process samples,
judges, trains and measures alike on the global mesh; process 0 alone writes the stores,
no_update.json, the summaries and metrics.jsonl, and the others wait at a barrier before
they read them.
"""
import dataclasses
import json
import os

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, sampling, sharding, tasks
from rlhf_jax.analysis import self_improve_metrics as sim
from rlhf_jax.data import array_store, collapse_data
from rlhf_jax.errors import UserError
from rlhf_jax.loops import collapse, records
from rlhf_jax.stages import dispatch, grpo, outcome_data, sft, task_eval
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.stages.task_eval import TaskEvaluator
from rlhf_jax.train import runs
from rlhf_jax.world import language

FILTERS = ('exact', 'learned', 'self_consistency', 'none')
SCHEDULES = ('replace', 'accumulate')
INITS = ('previous', 'base')
TRAINERS = ('sft', 'grpo')
# trainer='grpo': the GRPO stage's training score (grpo.reward) that is each filter's verdict
GRPO_REWARDS = {'exact': 'verifier', 'learned': 'orm', 'self_consistency': 'majority'}
SAMPLE_FIELDS = sft.TASK_FIELDS + ('correct', 'stated', 'found')


def last_logged_step(flat: dict) -> int | None:
  """Policies 0..rounds log one line each (step r)."""
  n = flat.get('self_improve.rounds')
  return n if isinstance(n, int) else None


def resolve(config) -> None:
  s = config.self_improve
  for name, choices in (('filter', FILTERS), ('schedule', SCHEDULES), ('init', INITS),
                        ('trainer', TRAINERS)):
    if s[name] not in choices:
      raise UserError(f'self_improve.{name}={s[name]!r} is not one of {choices}')
  if s.trainer == 'grpo' and s.filter not in GRPO_REWARDS:
    raise UserError(f"self_improve.trainer='grpo' with filter={s.filter!r} scores every "
                    'response alike: no advantage, nothing to learn; use trainer=sft or a '
                    f'filter of {tuple(GRPO_REWARDS)}')
  for name in ('rounds', 'prompts', 'samples', 'eval_prompts', 'eval_samples', 'kl_rows'):
    if s[name] < 1:
      raise UserError(f'self_improve.{name}={s[name]} must be >= 1')
  if s.filter == 'learned' and not 1 <= s.label_budget <= s.prompts * s.samples:
    raise UserError(f'self_improve.label_budget={s.label_budget} must be in [1, '
                    f'{s.prompts * s.samples}] (the samples of a round)')
  if not s.temperature > 0:
    raise UserError(f'self_improve.temperature={s.temperature} must be > 0')
  batch = config.stages.sft.train.batch_size
  if s.kl_rows < batch:
    raise UserError(f'self_improve.kl_rows={s.kl_rows} is less than one batch '
                    f'(stages.sft.train.batch_size={batch})')
  base = runs.read_config(os.path.abspath(s.init_run), role='self_improve.init_run')
  if 'task' not in base or base.get('stage') != 'sft':
    raise UserError(f'self_improve.init_run {s.init_run} is a {base.get("stage")!r} run '
                    'without a task: name a warm start, an sft run of configs/sft.py:task_tiny')
  runs.checkpoint_step(s.init_run, step=None, role='self_improve.init_run')


class Paths:

  def __init__(self, workdir: str, base: str):
    self.workdir, self.base = workdir, os.path.abspath(base)

  def round(self, r: int, *names: str) -> str:
    return os.path.join(self.workdir, f'round_{r}', *names)

  def policy(self, r: int) -> str:
    """Policy r: the warm start for r = 0; else round r-1's SFT run, or policy r-1 when
    round r-1 trained nothing."""
    if r == 0:
      return self.base
    if os.path.exists(self.round(r - 1, 'no_update.json')):
      return self.policy(r - 1)
    return self.round(r - 1, 'policy')


def _stage(config, name: str, **fields):
  """stages.<name> with the loop's seed (unless `fields` sets one) and the given dotted
  fields, its init run adopted."""
  sub = config_lib.with_fields(config.stages[name], **{'seed': config.seed, **fields})
  runs.adopt(sub)
  return sub


class Round:
  """What every round shares: the task, the warm start's setup and mesh, the sampler and
  the measures, built once per loop."""

  def __init__(self, config, paths: Paths):
    self.config, self.paths = config, paths
    s = config.self_improve
    self.sub = _stage(config, 'sft', **{'init.run': paths.base})
    self.setup = FromRun(self.sub, rows_per_step=self.sub.train.batch_size)
    self.task = grpo.make_task(self.sub, self.setup, max_new_tokens=self.sub.sft.max_new_tokens)
    setup = self.setup
    self.evaluator = TaskEvaluator(
        task=self.task, seed=self.sub.world.seed, num_prompts=s.eval_prompts,
        samples=s.eval_samples, max_new_tokens=self.sub.sft.max_new_tokens,
        model=setup.init.model, mesh=setup.mesh, mesh_config=self.sub.mesh,
        param_shardings=setup.init.param_shardings, ref_params=setup.init.params, dp=setup.dp)
    self.sampler = sampling.Sampler(
        model=setup.init.model,
        config=sampling.SampleConfig(max_new_tokens=self.sub.sft.max_new_tokens,
                                     temperature=s.temperature),
        mesh=setup.mesh, mesh_config=self.sub.mesh, param_shardings=setup.init.param_shardings)
    self.verify, self.extract = jax.jit(self.task.verify), jax.jit(self.task.extract)
    self.true_kl = None
    if self.sub.data.source == 'world':
      lang = language.from_block(self.sub.world)
      real = collapse_data.world_real_data(lang, world_seed=self.sub.world.seed,
                                           seed=config.seed, train_rows=1,
                                           heldout_rows=s.kl_rows,
                                           width=self.sub.train.seq_len + 1)
      self.true_kl = collapse.Measure(self.sub, dataclasses.replace(real, train=real.heldout))

  def load(self, r: int):
    if r == 0:
      return self.setup.init
    return runs.load(self.paths.policy(r), mesh=self.setup.mesh, mesh_config=self.sub.mesh)

  def samples(self, r: int, policy) -> dict:
    """Round r's problems (fresh: drawn by round, the held-out ones removed) and policy r's
    samples of them, graded by the verifier (made once)."""
    s = self.config.self_improve

    def make():
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), 0x51F0), r)
      problems = task_eval.without_held_out(
          self.task.make_prompts(key=jax.random.fold_in(key, 0), num=s.prompts),
          self.evaluator.batch)
      n = problems.prompts.shape[0]
      rep = lambda x: np.repeat(np.asarray(x), s.samples, axis=0)
      with sharding.activate(self.setup.mesh, self.sub.mesh):
        out = self.sampler.sample_in_chunks(policy.params, rep(problems.prompts),
                                            rep(problems.prompt_lengths),
                                            jax.random.fold_in(key, 1))
      answers, answer_lengths = rep(problems.answers), rep(problems.answer_lengths)
      correct = np.asarray(self.verify(answers, answer_lengths, out.response, out.mask))
      stated, found = self.extract(out.response, out.mask)
      arrays = dict(prompts=rep(problems.prompts), prompt_lengths=rep(problems.prompt_lengths),
                    response=np.asarray(out.response), mask=np.asarray(out.mask, np.float32),
                    answers=answers, answer_lengths=answer_lengths,
                    prompt_id=(r * s.prompts + np.repeat(np.arange(n), s.samples)).astype(
                        np.int32),
                    correct=correct.astype(np.float32), stated=np.asarray(stated),
                    found=np.asarray(found))
      return arrays, {'round': r, 'policy_run': self.paths.policy(r),
                      'checkpoint': int(policy.step), 'temperature': s.temperature,
                      'problems': n, 'samples_per_problem': s.samples}
    arrays, _ = array_store.read_or_make(self.paths.round(r, 'samples'), SAMPLE_FIELDS, make)
    return {k: np.asarray(v) for k, v in arrays.items()}

  def measure(self, policy, data: dict) -> dict:
    """policy r on the held-out problems and true rows, and its round's samples."""
    k = self.config.self_improve.samples
    with sharding.activate(self.setup.mesh, self.sub.mesh):
      row = self.evaluator(policy.params)
      if self.true_kl is not None:
        row['self_improve/true_kl'] = self.true_kl.model(policy)['collapse/true_kl']
    shape = lambda x: x.reshape(-1, k, *x.shape[1:])
    div = sim.diversity(shape(data['response']), shape(data['mask']), shape(data['stated']),
                        shape(data['found']))
    row.update({f'self_improve/{name}': float(v) for name, v in div.items()})
    row['self_improve/sample_pass_rate'] = float(np.mean(data['correct']))
    return row

  def filter(self, r: int, data: dict) -> tuple[np.ndarray, int, dict]:
    """(kept [N] bool, labels this round, extra metrics), made once into round_<r>/kept."""
    f, k = self.config.self_improve.filter, self.config.self_improve.samples
    correct = data['correct'] > 0.5
    path = self.paths.round(r, 'kept')
    extra = {}
    if f == 'learned':
      labelled, score, extra = self._learned(r, data)

    def make():
      if f == 'exact':
        kept = correct
      elif f == 'none':
        kept = np.ones_like(correct)
      elif f == 'self_consistency':
        kept = sim.self_consistency_keep(data['stated'].reshape(-1, k, data['stated'].shape[1]),
                                         data['found'].reshape(-1, k)).reshape(-1)
      else:
        kept = learned_keep(labelled, score, correct)
      arrays = {'kept': kept, **({'score': score} if f == 'learned' else {})}
      if distributed.is_primary():
        array_store.write(path, arrays, lineage={'round': r, 'filter': f})
    distributed.make_once(path, exists=os.path.isdir(path), make=make)
    kept = np.asarray(array_store.read(path, ['kept'])[0]['kept'], bool)
    # The exact labels spent: every graded sample, the bought ones, or none.
    labels = int(labelled.sum()) if f == 'learned' else len(correct) if f == 'exact' else 0
    return kept, labels, extra

  def _learned(self, r: int, data: dict):
    """Buys round r's labels, refits the outcome reward model on all labels so far, and
    scores round r's samples with it. Returns (labelled [N] bool, score [N], metrics)."""
    s = self.config.self_improve
    n = len(data['correct'])
    path = self.paths.round(r, 'labels')

    def make():
      rng = np.random.default_rng((self.config.seed, 0x1ABE, r))
      # All of them if the round has fewer samples (held-out problems were drawn).
      rows = np.sort(rng.choice(n, size=min(s.label_budget, n), replace=False))
      arrays = {name: data[name][rows] for name in ('prompts', 'prompt_lengths', 'response',
                                                    'mask')}
      arrays.update(label=data['correct'][rows].astype(np.float32), row=rows)
      if distributed.is_primary():
        array_store.write(path, arrays, lineage={'round': r, 'labels': len(rows),
                                                 'from': self.paths.round(r, 'samples')})
    distributed.make_once(path, exists=os.path.isdir(path), make=make)
    rows = np.asarray(array_store.read(path, ['row'])[0]['row'])
    orm_dir = self.paths.round(r, 'orm')
    sub = _stage(self.config, 'reward_model', **{
        'init.run': self.paths.policy(r),
        'outcome.labels_from': ','.join(self.paths.round(q, 'labels') for q in range(r + 1))})
    dispatch.run(sub, orm_dir)
    distributed.barrier(f'self_improve: outcome reward model {r}')  # its metrics, read below
    rm = runs.load_reward_model(orm_dir, mesh=self.setup.mesh, mesh_config=self.sub.mesh)
    scorer = outcome_data.OutcomeScorer(model=rm.model, params=rm.params, mesh=self.setup.mesh,
                                        mesh_config=self.sub.mesh, dp=self.setup.dp)
    with sharding.activate(self.setup.mesh, self.sub.mesh):
      score = scorer(data['prompts'], data['prompt_lengths'], data['response'], data['mask'])
    labelled = np.zeros(n, bool)
    labelled[rows] = True
    last = _last_metrics(orm_dir)
    return labelled, score, {f'self_improve/{k.replace("/", "_")}': last[k]
                             for k in ('orm/auc', 'orm/accuracy') if k in last}

  def train(self, r: int) -> None:
    """Policy r+1: SFT on the schedule's kept samples, unless they cover < 2 problems; or
    GRPO scored by the filter's verdict."""
    s = self.config.self_improve
    policy_dir = self.paths.round(r, 'policy')
    init = self.paths.policy(r) if s.init == 'previous' else self.paths.base
    if s.trainer == 'grpo':
      fields = {'init.run': init, 'grpo.reward': GRPO_REWARDS[s.filter],
                'seed': round_seed(self.config.seed, r)}
      if s.filter == 'learned':
        fields['grpo.rm_run'] = self.paths.round(r, 'orm')
      dispatch.run(_stage(self.config, 'grpo', **fields), policy_dir)
      distributed.barrier(f'self_improve: policy {r + 1}')  # its metrics, read next
      return
    no_update = os.path.exists(self.paths.round(r, 'no_update.json'))
    has_demos = os.path.isdir(os.path.join(policy_dir, 'demos'))
    distributed.barrier(f'self_improve: looked for the demos of policy {r + 1}')
    if no_update:
      return
    if not has_demos:  # every process makes the same demos; process 0 writes them
      rounds = range(r + 1) if s.schedule == 'accumulate' else [r]
      parts = []
      for q in rounds:
        data, _ = array_store.read(self.paths.round(q, 'samples'), sft.TASK_FIELDS)
        kept = np.asarray(array_store.read(self.paths.round(q, 'kept'), ['kept'])[0]['kept'])
        parts.append({name: np.asarray(data[name])[kept] for name in sft.TASK_FIELDS})
      demos = {name: np.concatenate([p[name] for p in parts]) for name in sft.TASK_FIELDS}
      if len(np.unique(demos['prompt_id'])) < 2:
        records.write_json(self.paths.round(r, 'no_update.json'), {
            'round': r, 'train_rows': int(len(demos['prompt_id'])),
            'why': 'the kept samples cover fewer than two problems: policy r+1 = policy r'})
        distributed.barrier(f'self_improve: no update of policy {r + 1}')
        return
      if distributed.is_primary():
        os.makedirs(policy_dir, exist_ok=True)
        array_store.write(os.path.join(policy_dir, 'demos'), demos, lineage={
            'round': r, 'filter': s.filter, 'schedule': s.schedule,
            'scheme': f'samples of policies {list(rounds)} kept by the {s.filter} filter',
            'rounds': [self.paths.round(q, 'samples') for q in rounds],
            'demos': int(len(demos['prompt_id']))})
      distributed.barrier(f'self_improve: the demos of policy {r + 1}')
    dispatch.run(_stage(self.config, 'sft', **{'init.run': init}), policy_dir)
    distributed.barrier(f'self_improve: policy {r + 1}')  # its metrics, read next

  def train_rows(self, r: int) -> int:
    """The rows policy r+1 trained on: its demonstrations, or GRPO's rollouts."""
    if self.config.self_improve.trainer == 'grpo':
      g = self.config.stages.grpo
      return g.train.steps * g.train.batch_size * g.grpo.group_size
    if os.path.exists(self.paths.round(r, 'no_update.json')):
      return json.load(open(self.paths.round(r, 'no_update.json')))['train_rows']
    _, lineage = array_store.read(os.path.join(self.paths.round(r, 'policy'), 'demos'), [])
    return int(lineage['demos'])


def round_seed(seed: int, r: int) -> int:
  """trainer='grpo': round r's GRPO seed (its problem pool, order and sampling), fresh
  problems each round and distinct across the loop's seeds below 1000."""
  return seed * 1000 + r + 1


def learned_keep(labelled: np.ndarray, score: np.ndarray, correct: np.ndarray) -> np.ndarray:
  """The learned filter's verdict: a labelled row by its label; of the unlabelled rows the
  round(p x count) with the highest scores (the first on ties), p the labelled rows' pass
  rate."""
  kept = labelled & correct
  rest = np.nonzero(~labelled)[0]
  take = int(round(float(correct[labelled].mean()) * len(rest))) if labelled.any() else 0
  order = rest[np.argsort(-score[rest], kind='stable')]
  kept[order[:take]] = True
  return kept


def _last_metrics(workdir: str) -> dict:
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      out.update(json.loads(line))
  return out


def run(config, *, workdir: str) -> None:
  config_lib.write_or_check(config, workdir)
  s = config.self_improve
  paths = Paths(workdir, s.init_run)
  state = None
  rows, labels = [], 0
  for r in range(s.rounds + 1):
    summary = paths.round(r, 'summary.json')
    distributed.barrier(f'self_improve: looked for round {r}')  # no process decides after
    if not os.path.exists(summary):                            # another has written
      print(f'self_improve: round {r}', flush=True)
      state = state or Round(config, paths)
      policy = state.load(r)
      data = state.samples(r, policy)
      row = {'step': r, **state.measure(policy, data)}
      if r < s.rounds:
        kept, spent, extra = state.filter(r, data)
        stats = sim.filter_stats(kept, data['correct'] > 0.5)
        row.update({f'self_improve/{k}': stats[k] for k in ('precision', 'recall',
                                                            'kept_fraction')})
        row.update(extra)
        row['self_improve/kept_rows'] = int(kept.sum())
        row['self_improve/labels'] = labels + spent
        state.train(r)
        row['self_improve/train_rows'] = state.train_rows(r)
      row['lineage'] = {'round': r, 'policy_run': paths.policy(r), 'filter': s.filter,
                        'schedule': s.schedule}
      records.write_json(summary, row)
      distributed.barrier(f'self_improve: summary of round {r}')
    rows.append(json.load(open(summary)))
    labels = rows[-1].get('self_improve/labels', labels)
    records.write_metrics(workdir, rows)
  if distributed.is_primary():
    print(table(rows, k=task_eval.powers_of_two(s.eval_samples)[-1]), flush=True)


def table(rows: list[dict], *, k: int) -> str:
  cols = (('pass@1', 'eval/pass@1', '{:.3f}'), (f'pass@{k}', f'eval/pass@{k}', '{:.3f}'),
          ('true KL', 'self_improve/true_kl', '{:.3f}'),
          ('distinct', 'self_improve/distinct_traces', '{:.3f}'),
          ('ans. H', 'self_improve/answer_entropy', '{:.3f}'),
          ('kept', 'self_improve/kept_fraction', '{:.3f}'),
          ('precision', 'self_improve/precision', '{:.3f}'),
          ('labels', 'self_improve/labels', '{:d}'))
  return records.table(rows, label='policy', cols=cols, width=11)
