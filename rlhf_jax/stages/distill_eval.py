"""A distilled student measured against the truth and against its teacher.

  eval/loss, eval/true_kl     (stages/pretrain.Evaluator) on the fixed fresh true sequences
                              every run on the world is scored on: the student's per-token
                              KL from the true language
  distill/kl_to_teacher       KL(student || teacher) per response token, exact over the
                              vocabulary at each position, on the student's own samples
  distill/kl_from_teacher     KL(teacher || student) per response token, on the teacher's
                              samples (drawn once: the same rows at every eval)
  policy/*                    for a teacher that was trained from a reference (SFT, DPO,
                              PPO): the student's gold reward, harm and KL to that
                              reference (stages/policy_eval.py)

Both KLs sample after the distillation's own kind of prompt (BOS for world data, the
world's prompts for teacher data), fixed by the world seed, at temperature 1.
"""
import functools

import jax
import numpy as np

from rlhf_jax import distributed, sampling, sharding
from rlhf_jax.data.preferences import world_prompts
from rlhf_jax.data.world_source import WorldSource
from rlhf_jax.stages import pretrain
from rlhf_jax.train import distill_losses, lm_step
from rlhf_jax.world import language


def prompt_set(config, lang, *, key, num: int):
  """(prompts [num, P], lengths [num]) of the distillation's kind: BOS alone for world
  data and for teacher data with prompt_len 1, else the world's prompts (world_prompts)."""
  d = config.distill
  if d.data == 'world' or d.prompt_len == 1:
    return np.full((num, 1), language.BOS_ID, np.int32), np.ones(num, np.int32)
  return world_prompts(lang, key=key, num=num, max_len=d.prompt_len)


def _kl_sums(student_params, teacher_params, prompts, lengths, response, mask, *, student,
             teacher):
  """(sum over masked tokens of KL(q || p), of KL(p || q), the tokens), q the student."""
  q = sampling.response_logits(student_params, prompts, lengths, response, model=student)
  p = sampling.response_logits(teacher_params, prompts, lengths, response, model=teacher)
  reverse = distill_losses.per_token('reverse_kl', q, p)
  forward = distill_losses.per_token('kd', q, p, alpha=1.0)
  return (reverse * mask).sum(), (forward * mask).sum(), mask.sum()


class DistillEvaluator:

  def __init__(self, *, config, world, student, student_shardings, teacher, mesh, dp: int,
               policies=None):
    """student: its model; teacher: the runs.LoadedRun; policies: (the student's, the
    teacher's) PolicyEvaluator against the teacher's reference, or None."""
    s_model, s_shardings = student, student_shardings
    self.teacher_model, self.teacher_params = teacher.model, teacher.params
    t_shardings = teacher.param_shardings
    self.policy, self.teacher_policy = policies or (None, None)
    mc = config.mesh
    batch_sharding = sharding.batch_sharding(mesh, mc)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_sharding.spec[0]))
    put = lambda b: distributed.put_global(b, batch_sharding)
    source = WorldSource(world=config.world, seed=config.seed,
                         batch_size=config.train.batch_size, seq_len=config.train.seq_len)

    def true_kl_of(model, shardings):
      fn = jax.jit(lambda params, batch: lm_step.eval_logprobs(params, batch,
                                                               model=model).sum(),
                   in_shardings=(shardings, batch_sharding),
                   out_shardings=sharding.replicated(mesh))
      return pretrain.Evaluator(source=source, logprob_sum=fn, put_batch=put,
                                num_batches=config.train.eval_batches)
    self.true_kl = true_kl_of(s_model, s_shardings)
    self.teacher_true_kl = true_kl_of(self.teacher_model, t_shardings)
    self.prompts, self.lengths = distributed.put_global(prompt_set(
        config, world.lang, key=jax.random.fold_in(jax.random.key(config.world.seed), 0xD157),
        num=-(-config.distill.eval_prompts // dp) * dp), (batch_sharding, rows))
    sample_config = sampling.SampleConfig(max_new_tokens=config.distill.max_new_tokens)
    self.student_sampler = sampling.Sampler(model=s_model, config=sample_config, mesh=mesh,
                                            mesh_config=mc, param_shardings=s_shardings)
    base = jax.random.fold_in(jax.random.key(config.world.seed), 0xD158)
    self.key = jax.random.fold_in(base, 0)
    teacher_sampler = sampling.Sampler(model=self.teacher_model, config=sample_config,
                                       mesh=mesh, mesh_config=mc, param_shardings=t_shardings)
    self.teacher_rows = teacher_sampler.sample(self.teacher_params, self.prompts, self.lengths,
                                               jax.random.fold_in(base, 1))
    self.kl_sums = jax.jit(
        functools.partial(_kl_sums, student=s_model, teacher=self.teacher_model),
        in_shardings=(s_shardings, t_shardings, batch_sharding, rows, batch_sharding,
                      batch_sharding), out_shardings=sharding.replicated(mesh))
    self.mesh, self.mesh_config = mesh, mc

  def _kl(self, params, response, mask) -> tuple[float, float]:
    with sharding.activate(self.mesh, self.mesh_config):
      rev, fwd, n = distributed.to_host(self.kl_sums(params, self.teacher_params, self.prompts,
                                                self.lengths, response, mask))
    n = max(float(n), 1.0)
    return float(rev) / n, float(fwd) / n

  def teacher_metrics(self) -> dict:
    """The teacher's own figures, logged once (the targets the student is measured by)."""
    out = {f'distill/teacher_{k.split("/")[1]}': v
           for k, v in self.teacher_true_kl.of_params(self.teacher_params).items()}
    if self.policy is not None:
      out.update({f'distill/teacher_{k.split("/")[1]}': v
                  for k, v in self.teacher_policy(self.teacher_params).items()})
    return out

  def __call__(self, state) -> dict:
    params = state.params
    out = self.true_kl.of_params(params)
    own = self.student_sampler.sample(params, self.prompts, self.lengths, self.key)
    out['distill/kl_to_teacher'], _ = self._kl(params, own.response, own.mask)
    _, out['distill/kl_from_teacher'] = self._kl(params, self.teacher_rows.response,
                                                 self.teacher_rows.mask)
    if self.policy is not None:
      out.update(self.policy(params))
    return out
