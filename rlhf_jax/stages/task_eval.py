"""A policy measured by the task's verifier on fixed held-out problems, n samples each at
temperature 1:

  eval/pass@k            for k = 1, 2, 4, ..., n: the unbiased estimator 1 - C(n-c, k)/C(n, k)
                         from the c correct of n samples, averaged over problems
                         (eval/pass@1_se: the standard error of pass@1 over problems)
  eval/maj@k             for the same k: majority vote over the first k samples' final
                         answers (self-consistency), the share of problems it gets right
  eval/greedy_pass       the greedy response's pass rate
  eval/answer_rate       the share of samples that state an answer at all
  eval/response_length   mean response tokens (EOS included)
  eval/kl_ref            mean sequence log pi - log ref of the samples (KL to the reference)

Given an outcome reward model (`orm`: a learned verifier, configs/reward_model.py:
task_tiny), also test-time best-of-n under it:

  eval/orm_bon@k         for the same k: the true correctness of the sample the ORM scores
                         highest among each problem's first k (the first on ties), beside
                         pass@k (best-of-k under the true verifier) and maj@k
  eval/orm_score         the ORM's mean P(correct) of the samples

The problems and the sampling key depend on the task config and the world seed only, so
every run on the same task is scored on the same problems.
"""
import jax
import numpy as np

from rlhf_jax import distributed, sampling
from rlhf_jax.analysis import orm_metrics, verifier_metrics


def powers_of_two(n: int) -> list[int]:
  ks, k = [], 1
  while k <= n:
    ks.append(k)
    k *= 2
  return ks


def _base_key(seed: int):
  return jax.random.fold_in(jax.random.key(seed), 0x7A5C)


def eval_key(seed: int):
  """The key the eval samples are drawn with (also the ORM stage's held-out responses',
  so that they are the very samples a warm start's eval grades)."""
  return jax.random.fold_in(_base_key(seed), 1)


def held_out_problems(task, *, seed: int, num_prompts: int, dp: int):
  """The eval problems (a TaskBatch of num_prompts rounded up to a multiple of dp)."""
  num = -(-num_prompts // dp) * dp
  return task.make_prompts(key=jax.random.fold_in(_base_key(seed), 0), num=num)


def without_held_out(batch, held_out):
  """The rows of `batch` (a TaskBatch) whose prompt is none of `held_out`'s."""
  seen = {row.tobytes() for row in np.asarray(held_out.prompts)}
  rows = np.array([i for i, row in enumerate(np.asarray(batch.prompts))
                   if row.tobytes() not in seen], np.int64)
  return jax.tree.map(lambda x: np.asarray(x)[rows], batch)


class TaskEvaluator:

  def __init__(self, *, task, seed: int, num_prompts: int, samples: int, max_new_tokens: int,
               model, mesh, mesh_config, param_shardings, ref_params, dp: int, orm=None):
    """orm: None, or (responses' prompts, prompt_lengths, response, mask) -> [N] host
    P(correct) of a learned verifier (stages/outcome_data.py OutcomeScorer)."""
    self.batch = held_out_problems(task, seed=seed, num_prompts=num_prompts, dp=dp)
    self.key = eval_key(seed)
    self.task, self.samples, self.ref_params, self.orm = task, samples, ref_params, orm
    make = lambda greedy: sampling.Sampler(
        model=model, config=sampling.SampleConfig(max_new_tokens=max_new_tokens,
                                                  greedy=greedy),
        mesh=mesh, mesh_config=mesh_config, param_shardings=param_shardings)
    self.sampler, self.greedy = make(False), make(True)
    self._verify = jax.jit(task.verify)
    self._extract = jax.jit(task.extract)

  def _judge(self, answers, answer_lengths, out):
    correct = np.asarray(self._verify(answers, answer_lengths, out.response, out.mask))
    stated, found = self._extract(out.response, out.mask)
    return correct, np.asarray(stated), np.asarray(found)

  def __call__(self, params) -> dict:
    b, n = self.batch, self.samples
    rep = lambda x: np.repeat(np.asarray(x), n, axis=0)
    out = self.sampler.sample_in_chunks(params, rep(b.prompts), rep(b.prompt_lengths),
                                        self.key)
    correct, stated, found = self._judge(rep(b.answers), rep(b.answer_lengths), out)
    ref_logp = self._score_in_chunks(rep(b.prompts), rep(b.prompt_lengths), out.response)
    mask = np.asarray(out.mask, np.float64)
    kl = ((np.asarray(out.raw_logprobs, np.float64) - ref_logp) * mask).sum(axis=1)
    num = b.prompts.shape[0]
    per_problem = correct.reshape(num, n)
    c = (per_problem > 0.5).sum(axis=1)
    metrics = {}
    for k in powers_of_two(n):
      metrics[f'eval/pass@{k}'] = float(np.mean(verifier_metrics.pass_at_k(n, c, k)))
      metrics[f'eval/maj@{k}'] = float(np.mean(verifier_metrics.maj_at_k(
          stated.reshape(num, n, -1), found.reshape(num, n), per_problem > 0.5, k)))
    if self.orm is not None:
      scores = self.orm(rep(b.prompts), rep(b.prompt_lengths), out.response, out.mask)
      for k in powers_of_two(n):
        metrics[f'eval/orm_bon@{k}'] = float(np.mean(orm_metrics.best_of_k(
            scores.reshape(num, n), per_problem > 0.5, k)))
      metrics['eval/orm_score'] = float(np.mean(scores))
    pass1 = per_problem.mean(axis=1)
    metrics['eval/pass@1_se'] = float(pass1.std(ddof=1) / np.sqrt(num)) if num > 1 else 0.0
    greedy = self.greedy.sample_in_chunks(params, np.asarray(b.prompts),
                                          np.asarray(b.prompt_lengths), self.key)
    metrics['eval/greedy_pass'] = float(np.mean(self._judge(b.answers, b.answer_lengths,
                                                            greedy)[0]))
    metrics.update({'eval/answer_rate': float(found.mean()),
                    'eval/response_length': float(mask.sum(axis=1).mean()),
                    'eval/kl_ref': float(kl.mean())})
    return metrics

  def _score_in_chunks(self, prompts, lengths, responses, chunk: int = 1024):
    parts = []
    for lo in range(0, prompts.shape[0], chunk):
      hi = min(lo + chunk, prompts.shape[0])
      parts.append(np.asarray(distributed.to_host(self.sampler.score(
          self.ref_params, prompts[lo:hi], lengths[lo:hi], responses[lo:hi])), np.float64))
    return np.concatenate(parts)
