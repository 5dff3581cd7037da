"""The outcome reward model's data and evaluation (rm.objective='outcome' in the
reward-model stage, configs/reward_model.py:task_tiny): responses of the init run's policy
labelled 1/0 by the task's verifier.

  training   outcome.samples_per_problem responses to each of the first
             outcome.num_problems problems of GRPO's training pool (stages/grpo.py
             prompt_pool with outcome.pool_prompts: the held-out eval problems removed);
             or, where the config has outcome.labels_from (the self-improvement loop's
             reward model), the labelled rows of the array stores it names
  held-out   outcome.eval_samples responses to each of the TaskEvaluator's outcome.
             eval_prompts held-out problems, drawn with the eval's own key: with GRPO's
             eval sizes they are the very samples a warm start's eval grades

Both are made once and kept in DIR/outcomes.npz (never replaced), so a resumed run trains
on the same rows. Rows are problem-major: the samples of one problem are consecutive.
"""
import os

import flax.struct
import jax
import numpy as np

from rlhf_jax import distributed, sampling, sharding
from rlhf_jax.analysis import orm_metrics
from rlhf_jax.data import array_store
from rlhf_jax.errors import UserError
from rlhf_jax.stages import task_eval
from rlhf_jax.stages.task_eval import powers_of_two
from rlhf_jax.train import reward_step

FILE = 'outcomes.npz'
FIELDS = ('prompts', 'prompt_lengths', 'response', 'mask', 'label')


@flax.struct.dataclass
class Outcomes:
  """Host numpy, N = problems x samples rows: prompts [N, P], prompt_lengths [N],
  response [N, R], mask [N, R], label [N] float32 (task.verify)."""
  prompts: np.ndarray
  prompt_lengths: np.ndarray
  response: np.ndarray
  mask: np.ndarray
  label: np.ndarray

  def batch(self, rows, valid) -> reward_step.OutcomeBatch:
    return reward_step.OutcomeBatch(
        prompts=self.prompts[rows], prompt_lengths=self.prompt_lengths[rows],
        response=self.response[rows], mask=self.mask[rows], label=self.label[rows],
        weight=np.asarray(valid, np.float32))


def validate(config) -> None:
  """The outcome objective's checks, before any compute."""
  if 'task' not in config or 'outcome' not in config:
    raise UserError("rm.objective='outcome' needs a task block and an outcome block, which "
                    'this config lacks; configs/reward_model.py:task_tiny has them')
  o = config.outcome
  for name in ('pool_prompts', 'num_problems', 'samples_per_problem', 'max_new_tokens',
               'eval_prompts', 'eval_samples'):
    if o[name] <= 0:
      raise UserError(f'outcome.{name}={o[name]} must be positive')
  if o.num_problems > o.pool_prompts:
    raise UserError(f'outcome.num_problems={o.num_problems} is more than the pool of '
                    f'outcome.pool_prompts={o.pool_prompts}')
  if not o.temperature > 0:
    raise UserError(f'outcome.temperature={o.temperature} must be > 0')


def sample_and_label(sampler, params, problems, *, samples: int, key, verify) -> Outcomes:
  """`samples` responses to each problem of `problems` (a TaskBatch), graded by `verify`."""
  rep = lambda x: np.repeat(np.asarray(x), samples, axis=0)
  prompts, lengths = rep(problems.prompts), rep(problems.prompt_lengths)
  out = sampler.sample_in_chunks(params, prompts, lengths, key)
  label = np.asarray(verify(rep(problems.answers), rep(problems.answer_lengths),
                            out.response, out.mask), np.float32)
  return Outcomes(prompts=prompts, prompt_lengths=lengths, response=np.asarray(out.response),
                  mask=np.asarray(out.mask, np.float32), label=label)


def load_or_make(config, setup, task, *, workdir: str) -> tuple[Outcomes, Outcomes]:
  """(training, held-out) outcomes of DIR/outcomes.npz, made there on first use."""
  path = os.path.join(workdir, FILE)
  distributed.make_once(path, exists=os.path.exists(path),
                        make=lambda: _make(config, setup, task, path))
  try:
    with np.load(path) as z:
      return tuple(Outcomes(**{k: z[f'{split}_{k}'] for k in FIELDS})
                   for split in ('train', 'held'))
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'{path} is unreadable ({e}); use a fresh --workdir') from None


def _make(config, setup, task, path: str) -> None:
  """Samples and labels the outcomes in every process alike; process 0 writes them."""
  from rlhf_jax.stages import grpo  # late: grpo loads ORMs through this module
  o = config.outcome
  held_out = task_eval.held_out_problems(task, seed=config.world.seed,
                                         num_prompts=o.eval_prompts, dp=setup.dp)
  given = read_labelled(o.get('labels_from', ''))
  if given is None:
    pool = grpo.prompt_pool(config, task, held_out=held_out, dp=setup.dp,
                            field='outcome.pool_prompts')
    if pool.prompts.shape[0] < o.num_problems:
      raise UserError(f'outcome.num_problems={o.num_problems}: the pool holds only '
                      f'{pool.prompts.shape[0]} problems that are not held out')
    train_problems = jax.tree.map(lambda x: x[:o.num_problems], pool)
  make = lambda temperature: sampling.Sampler(
      model=setup.init.model,
      config=sampling.SampleConfig(max_new_tokens=o.max_new_tokens,
                                   temperature=temperature),
      mesh=setup.mesh, mesh_config=config.mesh, param_shardings=setup.init.param_shardings)
  verify = jax.jit(task.verify)
  key = jax.random.fold_in(jax.random.key(config.seed), 0x0A11)
  with sharding.activate(setup.mesh, config.mesh):
    train = given if given is not None else sample_and_label(
        make(o.temperature), setup.init.params, train_problems,
        samples=o.samples_per_problem, key=key, verify=verify)
    # At temperature 1, as the TaskEvaluator samples.
    held = sample_and_label(make(1.0), setup.init.params, held_out, samples=o.eval_samples,
                            key=task_eval.eval_key(config.world.seed), verify=verify)
  if distributed.is_primary():
    arrays = {**{f'train_{k}': getattr(train, k) for k in FIELDS},
              **{f'held_{k}': getattr(held, k) for k in FIELDS}}
    with open(path + '.tmp', 'wb') as f:
      np.savez(f, **arrays)
    os.replace(path + '.tmp', path)


def read_labelled(labels_from: str) -> Outcomes | None:
  """The labelled responses of the array stores named (comma-separated) by
  outcome.labels_from, in order (a loop that bought the labels, loops/self_improve.py);
  None when it names none, and the stage samples and labels its own."""
  if not labels_from:
    return None
  parts = [array_store.read(path, FIELDS)[0] for path in labels_from.split(',')]
  return Outcomes(**{k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in FIELDS})


class OutcomeScorer:
  """P(correct) of an outcome reward model's params, host numpy, `chunk` rows per call
  (one compiled shape, a multiple of the dp data-parallel devices; the last chunk padded
  with copies of a row), the rows laid over the mesh's batch axes."""

  def __init__(self, *, model, params, mesh, mesh_config, dp: int, chunk: int = 1024):
    self.params, self.chunk, self.dp = params, chunk, dp
    self.mesh, self.mesh_config = mesh, mesh_config
    self._prob = jax.jit(lambda params, *rows: reward_step.outcome_probability(
        params, *rows, model=model))

  def __call__(self, prompts, prompt_lengths, response, mask, *, params=None):
    params = self.params if params is None else params
    n, parts = prompts.shape[0], []
    chunk = -(-min(self.chunk, n) // self.dp) * self.dp
    for lo in range(0, n, chunk):
      rows = np.arange(lo, lo + chunk)
      rows = np.where(rows < n, rows, lo)
      inputs = tuple(np.asarray(x)[rows] for x in (prompts, prompt_lengths, response, mask))
      inputs = distributed.put_global(inputs, sharding.batch_tree_sharding(
          self.mesh, self.mesh_config, inputs))
      p = distributed.to_host(self._prob(params, *inputs))
      parts.append(np.asarray(p, np.float64)[:min(chunk, n - lo)])
    return np.concatenate(parts)


class OutcomeEvaluator:
  """The ORM against the verifier on the held-out responses (analysis/orm_metrics.py):
  orm/accuracy, false-positive and false-negative rates, AUC, base rate, loss; and
  orm/bon@k, best-of-k of the init policy's held-out samples under the ORM (beside
  orm/pass@k_oracle, the share of problems with a right one among the first k)."""

  def __init__(self, *, held: Outcomes, model, samples: int, mesh, mesh_config, dp: int):
    self.held, self.samples = held, samples
    self.scorer = OutcomeScorer(model=model, params=None, mesh=mesh, mesh_config=mesh_config,
                                dp=dp)

  def __call__(self, state) -> dict:
    h = self.held
    prob = self.scorer(h.prompts, h.prompt_lengths, h.response, h.mask, params=state.params)
    out = orm_metrics.classification(prob, h.label)
    correct = (h.label > 0.5).reshape(-1, self.samples)
    scores = prob.reshape(-1, self.samples)
    for k in powers_of_two(self.samples):
      out[f'orm/bon@{k}'] = float(orm_metrics.best_of_k(scores, correct, k).mean())
      out[f'orm/pass@{k}_oracle'] = float(correct[:, :k].any(axis=1).mean())
    return out
