"""Supervised fine-tuning on expert demonstrations, from a pretraining run.

The demonstrations are best-of-k samples of the pretrained policy under the gold reward
(`rlhf_jax/data/demos.py`), made once into DIR/demos with their lineage. The loss is the
next-token cross-entropy on response tokens only (the prompt is context). Evaluation
reports the held-out demonstration loss and, by sampling, the policy's gold reward and
KL to the pretrained policy (`policy/*`, see stages/policy_eval.py).

With sft.data='jsonl:PATH' the demonstrations are a user's file instead, tokenized by the
init run's tokenizer (a run on text; stages/jsonl_data.py), the loss on completion or
assistant tokens only; with no world, the held-out loss is the evaluation.
"""
import functools
import os

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, sampling, sharding, tasks
from rlhf_jax.data import array_store, demos
from rlhf_jax.data.batch import prompt_response_batch
from rlhf_jax.data.row_source import RowSource, split_by_prompt
from rlhf_jax.stages import from_run, grpo, jsonl_data, task_eval
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.stages.policy_eval import PolicyEvaluator
from rlhf_jax.stages.task_eval import TaskEvaluator
from rlhf_jax.train import lm_step, loop


def resolve(config) -> None:
  """As from_run.resolve; with a task block (a warm start for RL against a verifier), its
  sizes are then checked against the init run's world."""
  from_run.resolve(config)
  if 'task' in config:
    tasks.validate(config.task, world_vocab_size=config.world.vocab_size)


def make_demos(setup: FromRun, config, *, workdir: str):
  s = config.sft
  sampler = sampling.Sampler(
      model=setup.init.model,
      config=sampling.SampleConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature),
      mesh=setup.mesh, mesh_config=config.mesh, param_shardings=setup.init.param_shardings)

  def make():
    arrays = demos.best_of_k(sampler, setup.init.params, world=setup.world,
                             key=jax.random.fold_in(jax.random.key(config.seed), 0xDE30),
                             num_prompts=s.num_prompts, k=s.samples_per_prompt,
                             prompt_len=s.prompt_len)
    return arrays, {**setup.lineage(), 'scheme': 'best-of-k under the gold reward',
                    'k': s.samples_per_prompt, 'temperature': s.temperature,
                    'demos': s.num_prompts}
  return array_store.read_or_make(os.path.join(workdir, 'demos'), demos.FIELDS, make)


TASK_FIELDS = ('prompts', 'prompt_lengths', 'response', 'mask', 'answers', 'answer_lengths',
               'prompt_id')


def make_task_demos(setup: FromRun, config, task, *, workdir: str):
  """The warm start for RL against a verifier: solved traces of the task's problems
  (Task.solutions), every one checked by the task's own verifier before it is kept."""
  s = config.sft

  def make():
    key = jax.random.fold_in(jax.random.key(config.seed), 0x7A5D)
    batch = task_eval.without_held_out(
        task.make_prompts(key=jax.random.fold_in(key, 0), num=s.num_prompts),
        task_eval.held_out_problems(task, seed=config.world.seed, num_prompts=s.eval_prompts,
                                    dp=setup.dp))
    response, mask = task.solutions(batch, key=jax.random.fold_in(key, 1),
                                    response_len=s.max_new_tokens)
    solved = np.asarray(task.verify(batch.answers, batch.answer_lengths, response, mask))
    if not (solved == 1.0).all():
      raise AssertionError(f'task {task.name}: {int((solved != 1.0).sum())} of its own '
                           'solutions fail its verifier')
    arrays = dict(prompts=np.asarray(batch.prompts), prompt_lengths=np.asarray(
        batch.prompt_lengths), response=np.asarray(response), mask=np.asarray(mask),
                  answers=np.asarray(batch.answers),
                  answer_lengths=np.asarray(batch.answer_lengths),
                  prompt_id=np.arange(len(response), dtype=np.int32))
    return arrays, {**setup.lineage(), 'scheme': f'solved traces of task {task.name}',
                    'demos': len(response), 'held_out_for_eval': s.num_prompts - len(response)}
  return array_store.read_or_make(os.path.join(workdir, 'demos'), TASK_FIELDS, make)


class HeldOutLoss:
  """Mean response-token cross-entropy on the held-out demonstrations."""

  def __init__(self, batches, eval_logprobs, put_batch):
    self.batches, self.eval_logprobs, self.put_batch = batches, eval_logprobs, put_batch
    self.weight = sum(float(b.weights.sum()) for b in batches)

  def __call__(self, params) -> dict:
    total = sum(float(np.asarray(distributed.to_host(
        self.eval_logprobs(params, self.put_batch(b))), np.float64).sum())
        for b in self.batches)
    return {'eval/loss': -total / self.weight}


def run(config, *, workdir: str) -> None:
  s = config.sft
  # A JSONL file's bad rows are refused before DIR is written or the init run is loaded.
  given = jsonl_data.read_given(config, workdir=workdir)
  setup = FromRun(config, rows_per_step=config.train.batch_size // config.optim.grad_accum)
  task = None
  if 'task' in config:  # a warm start for RL against the task's verifier
    task = grpo.make_task(config, setup, max_new_tokens=config.sft.max_new_tokens)
  config_lib.write_or_check(config, workdir)
  if given is not None:
    data, lineage = jsonl_data.load_or_make(config, given, workdir=workdir,
                                            lineage=setup.lineage())
  elif task is not None:
    data, lineage = make_task_demos(setup, config, task, workdir=workdir)
  else:
    data, lineage = make_demos(setup, config, workdir=workdir)

  def make_batch(rows, valid):
    batch = prompt_response_batch(data['prompts'][rows], data['prompt_lengths'][rows],
                                  data['response'][rows], data['mask'][rows])
    return batch.replace(weights=batch.weights * valid[:, None])

  train_rows, held_rows = split_by_prompt(np.asarray(data['prompt_id']),
                                          eval_fraction=config.sft.eval_fraction,
                                          seed=config.seed)
  source = RowSource(train=train_rows, held_out=held_rows, batch_size=config.train.batch_size,
                     seed=config.seed, make_batch=make_batch, what='SFT demonstrations')
  model = setup.model  # the init run's, with adapters under LoRA
  state, shardings = setup.lm_state(setup.init.params)
  step = setup.lm_train_step(shardings)
  param_shardings = setup.full_shardings(shardings.params)
  eval_logprobs = jax.jit(functools.partial(lm_step.eval_logprobs, model=model),
                          in_shardings=(param_shardings, setup.batch_sharding),
                          out_shardings=setup.batch_sharding)
  put = lambda b: distributed.put_global(b, setup.batch_sharding)
  held_out = HeldOutLoss(source.eval_batches(), eval_logprobs, put)
  if given is not None:  # no world to sample against: the held-out loss alone
    policy = lambda params: {}
    static = jsonl_data.static_metrics(lineage, 'sft')
  elif task is None:
    policy = PolicyEvaluator(config=config, world=setup.world, model=model, mesh=setup.mesh,
                             mesh_config=config.mesh, param_shardings=param_shardings,
                             ref_params=setup.init.params, dp=setup.dp,
                             ref_model=setup.ref_model(),
                             ref_param_shardings=setup.init.param_shardings)
    static = {'sft/demo_gold_reward': float(np.mean(data['gold'])),
              'sft/sample_gold_reward': float(np.mean(data['sample_gold']))}
  else:  # the problems and numbers GRPO's eval/* reports, so its step 0 continues these
    policy = TaskEvaluator(task=task, seed=config.world.seed, num_prompts=s.eval_prompts,
                           samples=s.eval_samples, max_new_tokens=s.max_new_tokens,
                           model=model, mesh=setup.mesh, mesh_config=config.mesh,
                           param_shardings=shardings.params, ref_params=setup.init.params,
                           dp=setup.dp)
    static = {'sft/demo_response_length': float(np.mean(data['mask'].sum(axis=1)))}
  evaluate = lambda state: {**held_out(setup.full(state.params)),
                            **policy(setup.full(state.params))}
  static.update({'sft/demos': len(train_rows), 'sft/held_out_demos': len(held_rows),
                 **setup.static_metrics()})
  spec = loop.LoopSpec.from_config(
      config, workdir=workdir,
      tokens_per_step=config.train.batch_size * (data['prompts'].shape[1] +
                                                  data['response'].shape[1] - 1))
  with sharding.activate(setup.mesh, config.mesh):
    loop.run(spec=spec, state=state, state_shardings=shardings, step=step, source=source,
             put_batch=put, evaluate=evaluate, static_metrics=static)
