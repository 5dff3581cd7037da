"""What reasoning researchers report about samples a verifier graded: pass@k, maj@k
(self-consistency) and the sampler-vs-trainer log-prob mismatch.

pass@k (Chen et al. 2021): of n samples of a problem, c correct, the chance that k drawn
without replacement hold a correct one, 1 - C(n-c, k) / C(n, k): unbiased for the pass@k
of k fresh samples, unlike 1 - (1 - c/n)^k. Computed as 1 - prod_{i=n-c+1..n} (1 - k/i),
Chen et al.'s stable form, since C(n, k) overflows float64 for n of a few thousand.

maj@k (Wang et al. 2023, self-consistency): the first k samples of a problem vote with their
final answers; samples whose answer was not found abstain; the most frequent answer wins,
a tie going to the answer seen first; the problem scores the winner's correctness, 0 when
none of the k found an answer. The budget is k samples, as for pass@k: the first k
*samples*, not the first k found answers (that would spend more than k samples where
answers go missing). The winner's correctness is that of its first occurrence: a verifier
that reads only the final answer grades every sample stating it alike.

The mismatch (as verl and TRL report it): our sampler and trainer share one forward, so in
float32 they agree to rounding; bf16 sampling does not, and truncated importance sampling
(train/grpo_update.py, tis_cap) corrects for it.

pass_at_k and maj_at_k are host-side NumPy (float64) over arrays of graded samples;
logprob_mismatch also runs inside a jitted step, in jnp, when handed jax arrays.
"""
import numpy as np
import jax
import jax.numpy as jnp

from rlhf_jax.errors import UserError


def _ints(x, what):
  a = np.asarray(x)
  if a.dtype.kind not in 'iub' and not np.all(a == np.round(a)):
    raise UserError(f'pass_at_k: {what} must be integers, got {x!r}')
  return a.astype(np.int64)


def pass_at_k(n, c, k) -> np.ndarray:
  """Unbiased pass@k per problem, float64 of the broadcast shape of n, c (and k): n samples,
  c of them correct, 1 <= k <= n, 0 <= c <= n."""
  n, c, k = _ints(n, 'n'), _ints(c, 'c'), _ints(k, 'k')
  n, c, k = np.broadcast_arrays(n, c, k)
  if np.any(k < 1) or np.any(k > n) or np.any(c < 0) or np.any(c > n):
    raise UserError('pass_at_k needs 1 <= k <= n and 0 <= c <= n for every problem')
  if n.size == 0:
    return np.zeros(n.shape)
  i = np.arange(1, n.max() + 1)  # the product's factors, masked to (n-c, n] per problem
  factors = np.where((i > (n - c)[..., None]) & (i <= n[..., None]),
                     1.0 - k[..., None] / i, 1.0)
  # Fewer than k wrong samples: every k-subset holds a correct one (a factor would be <= 0).
  return np.where(n - c < k, 1.0, 1.0 - np.prod(factors, axis=-1))


def maj_at_k(answers, found, correct, k: int) -> np.ndarray:
  """[P] float64 maj@k per problem (module docstring).

  answers [P, n, A] int answer tokens (compared whole), found [P, n] bool, correct [P, n]
  (1/0, or partial credit), 1 <= k <= n.
  """
  answers, found = np.asarray(answers), np.asarray(found, bool)
  correct = np.asarray(correct, np.float64)
  if answers.ndim != 3 or found.shape != answers.shape[:2] or correct.shape != found.shape:
    raise UserError(f'maj_at_k needs answers [P, n, A] and found, correct [P, n]; got '
                    f'{answers.shape}, {found.shape}, {correct.shape}')
  if not 1 <= k <= answers.shape[1]:
    raise UserError(f'maj_at_k needs 1 <= k <= n={answers.shape[1]}, got k={k}')
  answers, found, correct = answers[:, :k], found[:, :k], correct[:, :k]
  _, winner = majority_vote(answers, found)
  score = np.take_along_axis(correct, winner[:, None], axis=1)[:, 0]
  return np.where(found.any(1), score, 0.0)


def majority_vote(answers, found):
  """The self-consistency vote (module docstring) over all k samples of each problem:
  answers [P, k, A], found [P, k] bool -> (same [P, k, k] bool: both samples found the
  same answer, winner [P] int: the first sample stating the winning answer; 0, and
  meaningless, for a problem with no found answer). Shapes are the caller's to check.
  NumPy for host arrays, jnp (traceable) when handed jax arrays."""
  xp = jnp if isinstance(answers, jax.Array) or isinstance(found, jax.Array) else np
  same = (answers[:, :, None] == answers[:, None]).all(-1)  # [P, k, k]
  same = same & found[:, :, None] & found[:, None]
  votes = xp.where(found, same.sum(-1), -1)  # [P, k]
  # A sample's answer first appears at the first sample equal to it; votes are constant
  # over an answer's samples, so the first sample of maximal votes is the first occurrence
  # of the earliest-seen answer among those tied.
  return same, xp.argmax(votes, axis=1)


def majority_agreement(answers, found):
  """[P, k] bool: the samples stating their problem's majority answer (majority_vote's);
  none of a problem with no found answer (`same` is False wherever a side found none).
  The self-consistency filter's verdict, and GRPO's reward='majority' (as TTRL rewards
  agreement with the group's vote)."""
  xp = jnp if isinstance(answers, jax.Array) or isinstance(found, jax.Array) else np
  same, winner = majority_vote(answers, found)
  return xp.take_along_axis(same, winner[:, None, None], axis=2)[:, :, 0]


def logprob_mismatch(sample_logp, train_logp, mask) -> dict:
  """Sampler-vs-trainer log-prob agreement over the masked tokens [B, N]:
  'abs_diff_mean' and 'abs_diff_max' of |train - sample|, and 'kl_k3', the k3 estimate of
  KL(sampler || trainer) on the sampler's tokens: mean of exp(d) - d - 1, d = train -
  sample (>= 0 for every token). NumPy float64 floats for host arrays; 0-d jnp arrays
  (traceable) when any input is a jax array."""
  xp = jnp if any(isinstance(x, jax.Array) for x in (sample_logp, train_logp, mask)) else np
  dtype = jnp.float32 if xp is jnp else np.float64
  sample_logp, train_logp = xp.asarray(sample_logp, dtype), xp.asarray(train_logp, dtype)
  mask = xp.asarray(mask, dtype)
  d = train_logp - sample_logp
  count = xp.maximum(mask.sum(), 1.0)
  on = mask > 0
  gap = xp.where(on, xp.abs(d), 0.0)
  out = {'abs_diff_mean': gap.sum() / count, 'abs_diff_max': xp.max(gap, initial=0.0),
         'kl_k3': xp.where(on, xp.expm1(d) - d, 0.0).sum() / count}
  return {k: float(v) for k, v in out.items()} if xp is np else out
