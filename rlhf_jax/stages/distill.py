"""Distillation: a student learns a frozen teacher's distributions (`distill.loss`).

The teacher is any earlier run on the world (`distill.teacher_run`: a pretrained LM, an
SFT, DPO or PPO policy); the student is a fresh model of the config's model block, or an
earlier run (`distill.student_run`). Both speak the teacher's world, whose blocks the run
takes from the teacher. Each step draws fresh rows (train/distill_step.py): true sequences
of the world or the teacher's samples, and a fraction `distill.on_policy_fraction` sampled
by the student itself; the teacher scores every token. `distill.loss=ce` on world data is
the baseline: the same student trained on the same number of real tokens, no teacher.
Evaluation: stages/distill_eval.py (true KL, both KLs to the teacher, and for a teacher
trained from a reference, the gold reward it keeps).
"""
import functools

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, sharding
from rlhf_jax.data.row_source import RowSource
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.stages import distill_eval
from rlhf_jax.stages.policy_eval import PolicyEvaluator
from rlhf_jax.train import distill_step, loop, runs
from rlhf_jax.train.state import abstract_sharded, create_sharded, make_optimizer
from rlhf_jax.train.state import make_schedule, state_from_params
from rlhf_jax.world import setup as world_setup


def resolve(config) -> None:
  """The world (and gold reward, annotators) of the teacher; the student's model block
  from distill.student_run when there is one; both checkpoints pinned."""
  d = config.distill
  if not d.teacher_run:
    raise UserError('distill.teacher_run is empty: name the run directory of the teacher')
  teacher = runs.read_config(d.teacher_run, role='distill.teacher_run')
  if teacher.get('data', {}).get('source', 'world') != 'world' or 'world' not in teacher:
    raise UserError(f'distill.teacher_run {d.teacher_run} was not trained on the world; '
                    'the distill stage measures students against the world')
  vocab = teacher.model.vocab_size
  with config.unlocked():
    for block in ('world', 'reward', 'annotators'):
      if block in teacher:
        config[block] = type(config.world)(teacher[block].to_dict())
    d.teacher_step = runs.checkpoint_step(d.teacher_run, step=d.teacher_step,
                                          role='distill.teacher_run')
    if d.student_run:
      student = runs.read_config(d.student_run, role='distill.student_run')
      same_world = student.get('world') is not None and (
          student.world.to_dict() == teacher.world.to_dict())
      if student.model.vocab_size != vocab or not same_world:
        raise UserError(f'distill.student_run {d.student_run} has a vocabulary of '
                        f'{student.model.vocab_size} tokens on world '
                        f'{student.get("world", {}).get("seed")}, the teacher '
                        f'{vocab} on world {teacher.world.seed}: a student learns its '
                        "teacher's distributions over the same tokens of the same world")
      config.model = type(config.model)(student.model.to_dict())
      d.student_step = runs.checkpoint_step(d.student_run, step=d.student_step,
                                            role='distill.student_run')
    elif config.model.vocab_size not in (-1, vocab):
      raise UserError(f'model.vocab_size={config.model.vocab_size} differs from the '
                      f"teacher's vocabulary of {vocab} tokens ({d.teacher_run})")
    config.model.vocab_size = vocab
  if d.teacher_top_k > vocab:
    raise UserError(f'distill.teacher_top_k={d.teacher_top_k} exceeds the vocabulary of '
                    f'{vocab} tokens')


def _student_state(config, *, mesh, tx, rng):
  """(model, step-0 state, state shardings): a fresh init, or distill.student_run's params."""
  d = config.distill
  model = Transformer(ModelConfig.from_config(config.model))
  dummy = np.ones((1, 8), np.int32)
  init = lambda r: model.init(r, dummy, segment_ids=dummy, positions=dummy)['params']
  if not d.student_run:
    state, shardings = create_sharded(init_params=init, tx=tx, rng=rng, mesh=mesh,
                                      mesh_config=config.mesh)
    return model, state, shardings
  loaded = runs.load(d.student_run, mesh=mesh, mesh_config=config.mesh, step=d.student_step,
                     role='distill.student_run')
  _, shardings = abstract_sharded(init_params=init, tx=tx, rng=rng, mesh=mesh,
                                  mesh_config=config.mesh)
  with sharding.activate(mesh, config.mesh):
    state = state_from_params(loaded.params, tx=tx, rng=rng, shardings=shardings)
  return model, state, shardings


def run(config, *, workdir: str) -> None:
  d, t = config.distill, config.train
  mesh = sharding.make_mesh(config.mesh)
  dp = sharding.data_parallel_size(mesh, config.mesh)
  on_policy = int(round(d.on_policy_fraction * t.batch_size / dp)) * dp
  if t.batch_size % dp:
    raise UserError(f'train.batch_size={t.batch_size} is not divisible by the data-parallel '
                    f'size {dp} of the mesh')
  world = world_setup.from_config(config)
  teacher = runs.load(d.teacher_run, mesh=mesh, mesh_config=config.mesh, step=d.teacher_step,
                      role='distill.teacher_run')
  tx, schedule = make_optimizer(config.optim, t.steps), make_schedule(config.optim, t.steps)
  rng = jax.random.key_data(jax.random.key(config.seed))
  model, state, shardings = _student_state(config, mesh=mesh, tx=tx, rng=rng)
  config_lib.write_or_check(config, workdir)

  prompts, lengths = distill_eval.prompt_set(
      config, world.lang, key=jax.random.fold_in(jax.random.key(config.seed), 0xD15),
      num=-(-d.num_prompts // dp) * dp)
  make_batch = lambda rows, valid: {'prompts': prompts[rows], 'prompt_lengths': lengths[rows]}
  source = RowSource(train=np.arange(len(prompts)), held_out=None, batch_size=t.batch_size,
                     seed=config.seed, make_batch=make_batch, what='distillation prompts')
  batch_shardings = sharding.batch_tree_sharding(mesh, config.mesh, make_batch(
      np.zeros(t.batch_size, int), None))
  replicated = sharding.replicated(mesh)
  frozen = distill_step.Frozen(teacher_params=teacher.params, lang=world.lang)
  frozen_shardings = distill_step.Frozen(
      teacher_params=teacher.param_shardings,
      lang=jax.tree.map(lambda _: replicated, world.lang))
  frozen = distributed.put_global(frozen, frozen_shardings)
  step_config = distill_step.StepConfig(
      loss=d.loss, data=d.data, on_policy_rows=on_policy, max_new_tokens=d.max_new_tokens,
      temperature=d.temperature, alpha=d.alpha, beta=d.beta, top_k=d.teacher_top_k,
      sample_temperature=d.sample_temperature)
  step = jax.jit(functools.partial(distill_step.train_step, model=model, teacher=teacher.model,
                                   tx=tx, schedule=schedule, config=step_config),
                 in_shardings=(shardings, frozen_shardings, batch_shardings),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))

  policies = None
  reference = teacher.config.get('init', {}).get('run')
  if reference and 'policy_eval' in config:  # a teacher trained from a reference policy
    ref = runs.load(reference, mesh=mesh, mesh_config=config.mesh,
                    step=teacher.config.init.step, role='the teacher\'s init.run')
    kw = dict(config=config, world=world, mesh=mesh, mesh_config=config.mesh,
              ref_params=ref.params, dp=dp, ref_model=ref.model,
              ref_param_shardings=ref.param_shardings)
    policies = (PolicyEvaluator(model=model, param_shardings=shardings.params, **kw),
                PolicyEvaluator(model=teacher.model, param_shardings=teacher.param_shardings,
                                **kw))
  evaluate = distill_eval.DistillEvaluator(
      config=config, world=world, student=model, student_shardings=shardings.params,
      teacher=teacher, mesh=mesh, dp=dp, policies=policies)
  # The teacher's own figures (an eval with sampling) are logged at step 0 only.
  params = sum(x.size for x in jax.tree.leaves(state.params))
  static = lambda: {**evaluate.teacher_metrics(), 'distill/on_policy_rows': on_policy,
                    'distill/student_params': params}
  spec = loop.LoopSpec.from_config(config, workdir=workdir,
                                   tokens_per_step=t.batch_size * d.max_new_tokens)
  with sharding.activate(mesh, config.mesh):
    loop.run(spec=spec, state=state, state_shardings=shardings,
             step=lambda state, batch: step(state, frozen, batch), source=source,
             put_batch=lambda b: distributed.put_global(b, batch_shardings),
             evaluate=evaluate, static_metrics=static)
