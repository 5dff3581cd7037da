"""Judges: models that compare two responses under a principle (AI feedback). A judge is
always a trained model, never the gold function, so its mistakes are real and can be
measured against the truth (analysis/judge_metrics.py).

The registry (`judge.kind`):
  lm    a judge LM (a `judge` run, stages/judge.py) reads the pair as a document under the
        principle's tag, in both orders; each reading is P(first) from the log-probs of the
        two verdict tokens, and the verdict is their mean, which cancels position bias
        exactly: swapping the responses turns the verdict p into 1 - p (RLAIF, Lee et al.
        2023).
  rm    a reward model trained on a small human budget (a reward_model run), used as the
        labeller for the rest (semi-automated RLHF): P(first) = sigmoid of the members' mean
        reward gap. It knows no principle: it judges every pair by what its humans liked.

`Judge.readings(...)` returns (p_forward, p_backward) [N]: P(first better) read in the order
(first, second) and in the order (second, first).
"""
import functools

import jax
import numpy as np

from rlhf_jax import distributed, sharding
from rlhf_jax.data import judge_docs
from rlhf_jax.errors import UserError
from rlhf_jax.train import ppo_step, runs
from rlhf_jax.train.judge_reward import verdict_logprobs

KINDS = ('lm', 'rm')
CHUNK = 512  # rows per judge forward: one compiled shape


def _chunked(fn, arrays: tuple, *, mesh, mesh_config, dp: int) -> np.ndarray:
  """fn(*chunk) over rows of host `arrays`, CHUNK rows at a time laid out over the mesh's
  batch axes (the last chunk padded with its first row); host [N] float64."""
  n = len(arrays[0])
  chunk = -(-min(CHUNK, n) // dp) * dp
  out = []
  for lo in range(0, n, chunk):
    rows = np.arange(lo, lo + chunk)
    rows = np.where(rows < n, rows, lo)
    inputs = tuple(np.asarray(a)[rows] for a in arrays)
    inputs = distributed.put_global(inputs, sharding.batch_tree_sharding(mesh, mesh_config,
                                                                          inputs))
    with sharding.activate(mesh, mesh_config):
      out.append(np.asarray(distributed.to_host(fn(*inputs)), np.float64)[:n - lo])
  return np.concatenate(out)


class LMReader:
  """A judge LM's two readings of pairs, for any params of `model` (the judge stage
  evaluates its own params as they train; LMJudge reads a finished run's)."""

  def __init__(self, *, model, vocab: judge_docs.Vocabulary, mesh, mesh_config, dp: int):
    self.vocab, self.mesh, self.mesh_config, self.dp = vocab, mesh, mesh_config, dp
    self.fn = jax.jit(functools.partial(verdict_logprobs, model=model, first=vocab.first,
                                        second=vocab.second))

  def _read(self, params, docs, lengths) -> np.ndarray:
    logodds = _chunked(lambda d, l: self.fn(params, d, l), (docs, lengths),
                       mesh=self.mesh, mesh_config=self.mesh_config, dp=self.dp)
    return 1 / (1 + np.exp(-logodds))

  def readings(self, params, *, prompts, prompt_lengths, first, first_mask, second,
               second_mask, principle):
    kw = dict(prompts=prompts, prompt_lengths=prompt_lengths, principle=principle)
    fwd = judge_docs.documents(self.vocab, first=first, first_mask=first_mask, second=second,
                               second_mask=second_mask, **kw)
    bwd = judge_docs.documents(self.vocab, first=second, first_mask=second_mask, second=first,
                               second_mask=first_mask, **kw)
    return self._read(params, *fwd), 1 - self._read(params, *bwd)


class LMJudge:

  def __init__(self, run: str, *, gold, num_principles: int, mesh, mesh_config, dp: int,
               step=None):
    self.loaded = runs.load(run, mesh=mesh, mesh_config=mesh_config, step=step,
                            role='judge.run')
    if self.loaded.config.get('stage') != 'judge':
      raise UserError(f'judge.run {run} is a {self.loaded.config.get("stage")!r} run, not a '
                      'judge run (configs/judge.py)')
    trained = len(self.loaded.config.constitution)
    if trained != num_principles:
      raise UserError(f'judge.run {run} was trained on {trained} principles; this '
                      f'constitution has {num_principles}')
    self.reader = LMReader(model=self.loaded.model,
                           vocab=judge_docs.Vocabulary(gold, num_principles), mesh=mesh,
                           mesh_config=mesh_config, dp=dp)

  def readings(self, **pairs):
    return self.reader.readings(self.loaded.params, **pairs)


class RMJudge:

  def __init__(self, run: str, *, mesh, mesh_config, dp: int, step=None):
    self.loaded = runs.load_reward_model(run, mesh=mesh, mesh_config=mesh_config, step=step,
                                         role='judge.run')
    self.mesh, self.mesh_config, self.dp = mesh, mesh_config, dp
    members = functools.partial(ppo_step.member_rewards, rm_model=self.loaded.model)
    self.fn = jax.jit(lambda params, *rows: members(params, *rows).mean(axis=0))

  def readings(self, *, prompts, prompt_lengths, first, first_mask, second, second_mask,
               principle):
    del principle  # a reward model has one notion of better
    score = lambda y, m: _chunked(lambda *r: self.fn(self.loaded.params, *r),
                                  (prompts, prompt_lengths, y, m), mesh=self.mesh,
                                  mesh_config=self.mesh_config, dp=self.dp)
    p = 1 / (1 + np.exp(-(score(first, first_mask) - score(second, second_mask))))
    return p, p


def make(block, *, gold, num_principles: int, mesh, mesh_config, dp: int):
  """The judge a `judge` config block names (kind, run, step)."""
  if block.kind not in KINDS:
    raise UserError(f'judge.kind={block.kind!r} is not one of {KINDS}')
  step = None if block.get('step', -1) in (None, -1) else block.step
  if block.kind == 'lm':
    return LMJudge(block.run, gold=gold, num_principles=num_principles, mesh=mesh,
                   mesh_config=mesh_config, dp=dp, step=step)
  return RMJudge(block.run, mesh=mesh, mesh_config=mesh_config, dp=dp, step=step)
