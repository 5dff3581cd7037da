"""A judge LM: a world language model fine-tuned to give a principle's verdict on two
responses (data/judge_docs.py), so that AI feedback comes from a model whose accuracy
depends on its size and training, as a real judge's does.

The init run (`init.run`, an SFT or pretraining run: the judge is that model, fine-tuned),
or judge_data.policy_run when it names another (the policy the judge will judge, when the
judge is a model of another size), samples every pair of
judge_data.responses_per_prompt responses to world prompts; each
pair gets a principle of the constitution, drawn by weight, and the verdict of the
principle's noisy annotator (judge_data.teacher_temperature). The pairs are made once
into DIR/judge_pairs; the loss is the cross-entropy of the verdict token alone, the pair
shown in the order it was sampled.

Evaluation on the held-out prompts' pairs (and, with judge_data.other_run, on pairs of
another policy's samples: the judge's self-preference), through the order-averaged
verdict the judges registry uses (rlhf_jax/judges.py), graded against the truth by
analysis/judge_metrics.py: judge/agreement (with the principle's own truth) and
judge/gold_agreement, per principle; judge/position_flip_rate, judge/first_shown_rate,
judge/length_bias; judge/agreement_own, _other and judge/self_preference.
judge/teacher_agreement is the teacher's own agreement with the truth: the ceiling.
"""
import os

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, judges, sampling, sharding
from rlhf_jax.analysis import judge_metrics
from rlhf_jax.data import array_store, judge_docs
from rlhf_jax.data.batch import prompt_response_batch
from rlhf_jax.data.row_source import RowSource, split_by_prompt
from rlhf_jax.errors import UserError
from rlhf_jax.stages import from_run
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.train import loop, runs
from rlhf_jax.world import constitution


def resolve(config) -> None:
  constitution.from_block(config.constitution)
  d = config.judge_data
  if d.responses_per_prompt < 2 or d.num_prompts < 2 or d.teacher_temperature < 0:
    raise UserError('judge_data: responses_per_prompt and num_prompts must be >= 2, '
                    'teacher_temperature >= 0')
  for role in ('policy_run', 'other_run'):
    if d.get(role):
      runs.read_config(os.path.abspath(d[role]), role=f'judge_data.{role}')
  from_run.resolve(config)


def make_pairs(setup: FromRun, config, principles, *, path: str, policy_run: str, tag: int):
  """The judge set of `policy_run`'s samples at `path` (made once)."""
  d = config.judge_data

  def make():
    loaded = setup.init if policy_run == setup.init.workdir else runs.load(
        policy_run, mesh=setup.mesh, mesh_config=config.mesh, role='a judge_data run')
    sampler = sampling.Sampler(
        model=loaded.model,
        config=sampling.SampleConfig(max_new_tokens=d.max_new_tokens, temperature=d.temperature),
        mesh=setup.mesh, mesh_config=config.mesh, param_shardings=loaded.param_shardings)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x1D6E), tag)
    with sharding.activate(setup.mesh, config.mesh):
      arrays, figures = judge_docs.make(
          world=setup.world, principles=principles, sampler=sampler, params=loaded.params,
          key=key, num_prompts=d.num_prompts, prompt_len=d.prompt_len,
          responses_per_prompt=d.responses_per_prompt, temperature=d.teacher_temperature)
    return arrays, {'policy_run': loaded.workdir, 'policy_step': loaded.step, **figures,
                    'constitution': config.constitution.to_dict()}
  return array_store.read_or_make(path, judge_docs.FIELDS, make)


class JudgeEvaluator:
  """judge_metrics of the current params on fixed held-out pairs (own and other)."""

  def __init__(self, *, reader: judges.LMReader, sets: list[tuple[dict, int]], names):
    self.reader, self.names = reader, names
    self.data = {k: np.concatenate([np.asarray(s[k]) for s, _ in sets]) for k in
                 judge_docs.FIELDS}
    self.source = np.concatenate([np.full(len(s['label']), src) for s, src in sets])

  def __call__(self, params) -> dict:
    d = self.data
    fwd, bwd = self.reader.readings(params, prompts=d['prompts'],
                                    prompt_lengths=d['prompt_lengths'], first=d['first'],
                                    first_mask=d['first_mask'], second=d['second'],
                                    second_mask=d['second_mask'], principle=d['principle'])
    return judge_metrics.metrics(
        p_forward=fwd, p_backward=bwd, principle=d['principle'], principle_names=self.names,
        truth_gap=d['truth_gap'], gold_gap=d['gold_gap'],
        first_length=d['first_mask'].sum(axis=1), second_length=d['second_mask'].sum(axis=1),
        source=self.source if (self.source == 1).any() else None)


def held_out_rows(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
  """At most `limit` of the held-out rows (a fixed draw), so evaluation stays cheap."""
  if len(rows) <= limit:
    return rows
  return np.sort(np.random.default_rng((seed, 0xE7A1)).choice(rows, limit, replace=False))


def run(config, *, workdir: str) -> None:
  d = config.judge_data
  principles = constitution.from_block(config.constitution)
  setup = FromRun(config, rows_per_step=config.train.batch_size // config.optim.grad_accum)
  config_lib.write_or_check(config, workdir)
  policy_run = os.path.abspath(d.policy_run) if d.get('policy_run') else setup.init.workdir
  data, _ = make_pairs(setup, config, principles, path=os.path.join(workdir, 'judge_pairs'),
                       policy_run=policy_run, tag=0)
  vocab = judge_docs.Vocabulary(setup.world.gold, len(principles))
  docs, lengths = judge_docs.documents(
      vocab, prompts=data['prompts'], prompt_lengths=data['prompt_lengths'],
      first=data['first'], first_mask=data['first_mask'], second=data['second'],
      second_mask=data['second_mask'], principle=data['principle'])
  verdict = np.where(np.asarray(data['label']) == 1, vocab.first, vocab.second)[:, None]

  def make_batch(rows, valid):
    return prompt_response_batch(docs[rows], lengths[rows], verdict[rows],
                                 valid[:, None].astype(np.float32))

  train_rows, held_rows = split_by_prompt(np.asarray(data['prompt_id']),
                                          eval_fraction=d.eval_fraction, seed=config.seed)
  source = RowSource(train=train_rows, held_out=held_rows, batch_size=config.train.batch_size,
                     seed=config.seed, make_batch=make_batch, what='judge documents')
  model = setup.init.model
  state, shardings = setup.lm_state(setup.init.params)
  step = setup.lm_train_step(shardings)
  held = held_out_rows(held_rows, d.eval_pairs, config.seed)
  sets = [({k: np.asarray(v)[held] for k, v in data.items()}, 0)]
  if d.other_run:
    other, _ = make_pairs(setup, config, principles,
                          path=os.path.join(workdir, 'judge_pairs_other'),
                          policy_run=os.path.abspath(d.other_run), tag=1)
    rows = held_out_rows(np.arange(len(other['label'])), d.eval_pairs, config.seed)
    sets.append(({k: np.asarray(v)[rows] for k, v in other.items()}, 1))
  reader = judges.LMReader(model=model, vocab=vocab, mesh=setup.mesh, mesh_config=config.mesh,
                           dp=setup.dp)
  evaluate = JudgeEvaluator(reader=reader, sets=sets, names=[p.name for p in principles])
  label, gap = np.asarray(data['label'])[held], np.asarray(data['truth_gap'])[held]
  untied = gap != 0
  static = {'judge/teacher_agreement': float(((label == 1) == (gap > 0))[untied].mean()),
            'judge/train_pairs': len(train_rows), 'judge/held_out_pairs': len(held)}
  spec = loop.LoopSpec.from_config(config, workdir=workdir,
                                   tokens_per_step=config.train.batch_size * docs.shape[1])
  put = lambda b: distributed.put_global(b, setup.batch_sharding)
  with sharding.activate(setup.mesh, config.mesh):
    loop.run(spec=spec, state=state, state_shardings=shardings, step=step, source=source,
             put_batch=put, evaluate=lambda s: evaluate(s.params), static_metrics=static)
