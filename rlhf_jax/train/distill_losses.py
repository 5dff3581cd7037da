r"""The distillation-loss family (`distill.loss`): pure token-level losses of a student
learning from a frozen teacher.

Every loss reads student logits [B, T, V], a teacher (dense logits [B, T, V] or a `TopK`)
and the hyper-parameters its registry entry names, and returns the per-token loss [B, T],
neither masked nor averaged: the caller multiplies by its [B, T] mask and divides by the
mask's sum (`masked_mean`), as `losses.xent_sum`'s callers do. The teacher gets no gradient.
Notation, per token: P = teacher, Q = student, p^tau = softmax(logits / tau).

  kd          alpha tau^2 KL(P^tau || Q^tau) + (1 - alpha) CE(targets; Q at tau = 1)
              The tau^2 keeps the soft term's gradient scale independent of tau.
                                                                 Hinton et al. 2015
  reverse_kl  tau^2 KL(Q^tau || P^tau): mode-seeking, the student need not cover every
              mode of the teacher                    Gu et al. 2024 (MiniLLM), Agarwal
                                                     et al. 2024
  gkd         tau^2 JSD_beta(P^tau, Q^tau), the generalised Jensen-Shannon divergence
              JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
                                                     Agarwal et al. 2024 ("On-policy
                                                     distillation of language models")
  seq_kd      CE(targets; Q at tau = 1) on the teacher's sampled tokens; the teacher's
              logits and tau are not read                        Kim and Rush 2016
  ce          the same CE on the world's own tokens, no teacher: the student trained
              from scratch on real data, the baseline of the gap a distillation closes

gkd's limits: JSD_beta / beta -> KL(P || Q) as beta -> 0 and JSD_beta / (1 - beta) ->
KL(Q || P) as beta -> 1, each with an error of about -beta chi^2(P || Q) / 2 (resp.
-(1 - beta) chi^2(Q || P) / 2). JSD_beta itself vanishes at both ends, so beta exactly 0
returns tau^2 KL(P || Q) and beta exactly 1 returns tau^2 KL(Q || P): the limits, not 0.
log M enters only through log(M / P) = logaddexp(log beta, log(1 - beta) + log Q - log P)
and log(M / Q) likewise, which stay accurate in float32 where they are O(beta) small (log M
- log Q from a separately rounded log M would lose them near the limits).

Top-k teacher. `top_k` keeps a teacher's k largest logits per token and its full logsumexp.
The distributions compared are then the coarse-grained ones over k + 1 outcomes: the k kept
tokens and one "rest" bucket. The teacher's rest mass is 1 - sum_kept exp(value - logz);
the student's is 1 - its own mass on the same k indices (its log-probs gathered there, no
dense [B, T, V] teacher is built). Both are computed as -expm1(logsumexp(kept log-probs)),
floored at MIN_REST (float32's epsilon: below it 1 - kept mass is rounding, not signal).
Coarse-graining is a channel applied to both distributions, and KL, reverse KL and JSD_beta
are f-divergences, so by the data-processing inequality each top-k loss is a lower bound of
the full one; it equals the full loss when k = V, where there is no rest bucket at all.
Temperature applies before truncation (the top k of logits / tau are the same tokens).
`top_k` takes the temperature and stores tempered values and the tempered logsumexp (the
rest mass at tau cannot be recovered from an untempered logz); the TopK records it and a
loss called at another temperature raises ValueError.

Registry fields: `on_policy_ok` says the loss is defined on sequences the student sampled
itself (GKD's on-policy fraction lambda); seq_kd is not, its targets are the teacher's
samples. kd's (1 - alpha) term is a cross-entropy on `targets`, which on student samples
would be the student's own tokens: on-policy kd wants alpha = 1. `needs_targets` says the
loss always reads `targets`; kd reads them only when alpha < 1.

Bad hyper-parameters (tau <= 0, alpha or beta outside [0, 1], missing targets, a TopK
made at another temperature) are programming errors here and raise ValueError; an unknown
loss name is a config value and raises UserError.
"""
import dataclasses
import numbers
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax import losses
from rlhf_jax.errors import UserError

MIN_REST = float(jnp.finfo(jnp.float32).eps)


@flax.struct.dataclass
class TopK:
  """A teacher truncated to its k largest logits per token (at a temperature).

  values:      [B, T, k] float32, teacher logits / temperature, largest first.
  indices:     [B, T, k] int32 vocabulary ids of values.
  logz:        [B, T] float32, logsumexp over the whole vocabulary of logits / temperature.
  temperature: the tau they were tempered at (static).
  """
  values: jax.Array
  indices: jax.Array
  logz: jax.Array
  temperature: float = flax.struct.field(pytree_node=False, default=1.0)


def top_k(teacher_logits, k: int, *, temperature: float = 1.0) -> TopK:
  """The teacher's k largest logits / temperature per token and its full tempered logz."""
  vocab = teacher_logits.shape[-1]
  if not 1 <= k <= vocab:
    raise ValueError(f'top_k: k={k} must be in [1, {vocab}]')
  _check_range('temperature', temperature, 0.0, None)
  scaled = jax.lax.stop_gradient(_f32(teacher_logits)) / temperature
  values, indices = jax.lax.top_k(scaled, k)
  return TopK(values=values, indices=indices.astype(jnp.int32),
              logz=jax.nn.logsumexp(scaled, axis=-1), temperature=float(temperature))


def masked_mean(per_token, mask) -> jax.Array:
  """sum(per_token * mask) / max(sum(mask), 1): the mean over real tokens."""
  return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _f32(x):
  """At least float32 (bf16 logits are promoted; float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _static(x) -> bool:
  return isinstance(x, numbers.Real)


def _check_range(name, value, lo, hi, *, lo_open=True):
  """ValueError when a Python-number hyper-parameter is out of range (traced ones pass)."""
  if not _static(value):
    return
  below = value <= lo if lo_open else value < lo
  if below or (hi is not None and value > hi):
    bounds = f'({lo}, inf)' if hi is None else f'[{lo}, {hi}]'
    raise ValueError(f'distill {name}={value} must be in {bounds}')


def _log_rest(log_kept):
  """log(1 - sum exp(log_kept)) over the last axis, the mass floored at MIN_REST."""
  kept = jnp.minimum(jax.nn.logsumexp(log_kept, axis=-1), 0.0)
  return jnp.log(jnp.maximum(-jnp.expm1(kept), MIN_REST))


def _log_probs(student_logits, teacher, temperature):
  """(log P, log Q) at temperature over a common outcome axis: [B, T, V] for a dense
  teacher, [B, T, k + 1] (kept tokens, then the rest) for a TopK with k < V."""
  _check_range('temperature', temperature, 0.0, None)
  logq = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
  if not isinstance(teacher, TopK):
    logp = jax.nn.log_softmax(jax.lax.stop_gradient(_f32(teacher)) / temperature, axis=-1)
    return logp, logq
  if _static(temperature) and float(temperature) != teacher.temperature:
    raise ValueError(f'TopK teacher made at temperature {teacher.temperature}, loss called '
                     f'at {temperature}: call top_k(..., temperature={temperature})')
  logp = jax.lax.stop_gradient(_f32(teacher.values) - _f32(teacher.logz)[..., None])
  logq = jnp.take_along_axis(logq, teacher.indices, axis=-1)
  if teacher.indices.shape[-1] == student_logits.shape[-1]:
    return logp, logq
  return (jnp.concatenate([logp, _log_rest(logp)[..., None]], axis=-1),
          jnp.concatenate([logq, _log_rest(logq)[..., None]], axis=-1))


def _support(logp):
  """(p > 0, log p with -inf replaced by 0): the double-where that keeps a -inf teacher
  logit from turning 0 * inf into NaN, forward or backward."""
  ok = logp > -jnp.inf
  return ok, jnp.where(ok, logp, 0.0)


def _kl(logp, logq):
  """KL(P || Q) over the last axis; outcomes with p = 0 contribute 0."""
  ok, safe = _support(logp)
  return jnp.where(ok, jnp.exp(safe) * (safe - logq), 0.0).sum(axis=-1)


def _jsd(logp, logq, beta):
  """beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, for 0 < beta < 1."""
  ok, safe = _support(logp)
  log_b, log_1mb = jnp.log(beta), jnp.log1p(-beta)
  m_over_p = jnp.logaddexp(log_b, log_1mb + logq - safe)
  m_over_q = jnp.logaddexp(log_1mb, log_b + logp - logq)
  kl_p = -jnp.where(ok, jnp.exp(safe) * m_over_p, 0.0).sum(axis=-1)
  kl_q = -(jnp.exp(logq) * m_over_q).sum(axis=-1)
  return beta * kl_p + (1.0 - beta) * kl_q


def _xent(student_logits, targets, name):
  if targets is None:
    raise ValueError(f'distill loss {name} needs targets [B, T] int32')
  return -losses.token_logprobs(_f32(student_logits), targets)


def kd(student_logits, teacher_logits, *, temperature, alpha, targets=None):
  _check_range('alpha', alpha, 0.0, 1.0, lo_open=False)
  logp, logq = _log_probs(student_logits, teacher_logits, temperature)
  soft = alpha * temperature ** 2 * _kl(logp, logq)
  if _static(alpha) and alpha == 1:
    return soft
  return soft + (1.0 - alpha) * _xent(student_logits, targets, 'kd with alpha < 1')


def reverse_kl(student_logits, teacher_logits, *, temperature, targets=None):
  del targets
  logp, logq = _log_probs(student_logits, teacher_logits, temperature)
  return temperature ** 2 * _kl(logq, logp)


def gkd(student_logits, teacher_logits, *, temperature, beta, targets=None):
  del targets
  _check_range('beta', beta, 0.0, 1.0, lo_open=False)
  logp, logq = _log_probs(student_logits, teacher_logits, temperature)
  if _static(beta) and beta == 0:
    div = _kl(logp, logq)
  elif _static(beta) and beta == 1:
    div = _kl(logq, logp)
  else:
    div = _jsd(logp, logq, beta)
  return temperature ** 2 * div


def seq_kd(student_logits, teacher_logits, *, targets=None):
  del teacher_logits
  return _xent(student_logits, targets, 'seq_kd')


def ce(student_logits, teacher_logits, *, targets=None):
  """No teacher: CE on the rows' own tokens. On the world's true sequences this is the
  student trained from scratch on real data, the baseline a distillation is measured by."""
  del teacher_logits
  return _xent(student_logits, targets, 'ce')


@dataclasses.dataclass(frozen=True)
class DistillLoss:
  """fn(student_logits, teacher_logits, targets=..., **{name: value for name in params})
  -> per-token loss [B, T].

  params: the hyper-parameters (of temperature, alpha, beta) it reads.
  on_policy_ok: defined on the student's own samples (see the module docstring).
  needs_targets: reads `targets` whatever its hyper-parameters (kd: only if alpha < 1).
  needs_teacher: reads the teacher's logits (the step skips the teacher's forward
  otherwise).
  """
  fn: Callable
  params: tuple
  on_policy_ok: bool
  needs_targets: bool
  needs_teacher: bool = True


LOSSES = {
    'kd': DistillLoss(kd, ('temperature', 'alpha'), on_policy_ok=True, needs_targets=False),
    'reverse_kl': DistillLoss(reverse_kl, ('temperature',), on_policy_ok=True,
                              needs_targets=False),
    'gkd': DistillLoss(gkd, ('temperature', 'beta'), on_policy_ok=True, needs_targets=False),
    'seq_kd': DistillLoss(seq_kd, (), on_policy_ok=False, needs_targets=True,
                          needs_teacher=False),
    'ce': DistillLoss(ce, (), on_policy_ok=False, needs_targets=True, needs_teacher=False),
}


def per_token(loss: str, student_logits, teacher_logits, *, temperature: float = 1.0,
              alpha: float = 1.0, beta: float = 0.5, targets=None) -> jax.Array:
  """The per-token loss [B, T] of `loss` (a LOSSES name): student logits [B, T, V] float32,
  teacher logits [B, T, V] or a TopK (None for seq_kd), targets [B, T] int32 or None. Not
  masked or averaged: see masked_mean."""
  if loss not in LOSSES:
    raise UserError(f'distill.loss={loss!r} is not one of {tuple(LOSSES)}')
  entry = LOSSES[loss]
  hparams = dict(temperature=temperature, alpha=alpha, beta=beta)
  return entry.fn(student_logits, teacher_logits, targets=targets,
                  **{name: hparams[name] for name in entry.params})
