r"""The preference-loss family (`dpo.loss`): pure per-pair losses on sequence log-probs.

Every loss reads one `PairLogps` and the `dpo.*` hyper-parameters its registry entry names,
and returns the per-pair loss [B]; the caller takes the weighted mean. Notation, per pair:
  r_w = log pi(y_w) - log ref(y_w),  r_l likewise  (summed over response tokens)
  h   = r_w - r_l                    (the DPO margin)
  a_w = log pi(y_w) / |y_w|,  a_l    (per-token average log-prob: length-normalised)

  dpo         -log sigmoid(beta h)                               Rafailov et al. 2023
  ipo         (h - 1/(2 tau))^2, h of SUMMED log-ratios          Azar et al. 2023
  ipo_mean    the same on per-token AVERAGED log-ratios           (TRL's form of IPO)
  cdpo        -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
              (label smoothing: each label flipped with prob. eps) Mitchell 2023
  robust_dpo  [-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
              (unbiased under flips with prob. eps)              Chowdhury et al. 2024
  hinge       max(0, 1 - beta h): SLiC's calibration hinge on h, margin 1/beta
                                                                 Zhao et al. 2023
  kto         w_D (1 - sigmoid(beta (r_w - z0))) + w_U (1 - sigmoid(beta (z0 - r_l)))
              with z0 = max(0, mean over the batch of the mismatched-pair log-ratio
              log pi(y'|x) - log ref(y'|x)), no gradient    Ethayarajh et al. 2024
  orpo        -a_w + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)),
              odds(y) = P / (1 - P), P = exp(a): the SFT term plus the odds ratio;
              reference-free                                     Hong et al. 2024
  simpo       -log sigmoid(beta (a_w - a_l) - gamma); reference-free
                                                                 Meng et al. 2024
  apo_zero    (1 - sigmoid(beta r_w)) + sigmoid(beta r_l): pushes the chosen likelihood
              up and the rejected down, each against the reference
                                                                 D'Oosterlinck et al. 2024

KTO from pairs: each pair is split into one desirable example (y_w) and one undesirable
(y_l) of the same prompt, so the two kinds are equally many and w_D = w_U = 1 sits inside
the paper's recommended band w_D n_D / (w_U n_U) in [1, 4/3]. Its KL reference point z0
uses each pair's mismatched partner: the prompt of pair n with the chosen response of
another pair (`kto_partners`), whose reference log-prob is data like the others'.
"""
import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class PairLogps:
  """Sequence log-probs of a batch of pairs, all [B] float32.

  policy_chosen / policy_rejected: sum over response tokens of log pi.
  ref_chosen / ref_rejected:       the same under the frozen reference (zeros, never
                                   computed, for reference-free losses).
  chosen_length / rejected_length: response tokens (>= 1 on real pairs).
  weight:                          1 on real pairs, 0 on padding.
  kl_policy / kl_ref:              KTO only: log pi and log ref of the mismatched
                                   (prompt, partner's response); None otherwise.
  """
  policy_chosen: jax.Array
  policy_rejected: jax.Array
  ref_chosen: jax.Array
  ref_rejected: jax.Array
  chosen_length: jax.Array
  rejected_length: jax.Array
  weight: jax.Array
  kl_policy: jax.Array = None
  kl_ref: jax.Array = None


def margin(lp: PairLogps) -> jax.Array:
  """h = r_w - r_l, summed log-ratios."""
  return (lp.policy_chosen - lp.ref_chosen) - (lp.policy_rejected - lp.ref_rejected)


def mean_margin(lp: PairLogps) -> jax.Array:
  """The per-token averaged margin (r_w / |y_w|) - (r_l / |y_l|)."""
  return ((lp.policy_chosen - lp.ref_chosen) / _length(lp.chosen_length)
          - (lp.policy_rejected - lp.ref_rejected) / _length(lp.rejected_length))


def _length(n):
  return jnp.maximum(n, 1.0)


def dpo(lp, *, beta):
  return -jax.nn.log_sigmoid(beta * margin(lp))


def ipo(lp, *, tau):
  return (margin(lp) - 1.0 / (2.0 * tau)) ** 2


def ipo_mean(lp, *, tau):
  return (mean_margin(lp) - 1.0 / (2.0 * tau)) ** 2


def cdpo(lp, *, beta, epsilon):
  z = beta * margin(lp)
  return -(1.0 - epsilon) * jax.nn.log_sigmoid(z) - epsilon * jax.nn.log_sigmoid(-z)


def robust_dpo(lp, *, beta, epsilon):
  z = beta * margin(lp)
  return (-(1.0 - epsilon) * jax.nn.log_sigmoid(z)
          + epsilon * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * epsilon)


def hinge(lp, *, beta):
  return jax.nn.relu(1.0 - beta * margin(lp))


def kto_reference_point(lp: PairLogps) -> jax.Array:
  """z0 = max(0, weighted batch mean of log pi(y'|x) - log ref(y'|x)), no gradient."""
  kl = ((lp.kl_policy - lp.kl_ref) * lp.weight).sum() / jnp.maximum(lp.weight.sum(), 1.0)
  return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto(lp, *, beta, desirable_weight, undesirable_weight):
  z0 = kto_reference_point(lp)
  r_w = lp.policy_chosen - lp.ref_chosen
  r_l = lp.policy_rejected - lp.ref_rejected
  return (desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r_w - z0)))
          + undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - r_l))))


def _log_odds(mean_logp):
  """log(P / (1 - P)) for P = exp(mean_logp) < 1."""
  a = jnp.minimum(mean_logp, -1e-6)
  return a - jnp.log(-jnp.expm1(a))


def orpo(lp, *, orpo_lambda):
  a_w = lp.policy_chosen / _length(lp.chosen_length)
  a_l = lp.policy_rejected / _length(lp.rejected_length)
  return -a_w - orpo_lambda * jax.nn.log_sigmoid(_log_odds(a_w) - _log_odds(a_l))


def simpo(lp, *, beta, gamma):
  a_w = lp.policy_chosen / _length(lp.chosen_length)
  a_l = lp.policy_rejected / _length(lp.rejected_length)
  return -jax.nn.log_sigmoid(beta * (a_w - a_l) - gamma)


def apo_zero(lp, *, beta):
  return ((1.0 - jax.nn.sigmoid(beta * (lp.policy_chosen - lp.ref_chosen)))
          + jax.nn.sigmoid(beta * (lp.policy_rejected - lp.ref_rejected)))


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
  """fn(lp, **{field: config.dpo[field] for field in params}) -> per-pair loss [B].

  strength: the field that sets how far the policy may move (what the frontier sweeps).
  reference_free: trains without reference log-probs (the stage never computes them).
  length_normalised: its implicit reward is per-token averaged (the reported rewards and
  held-out accuracy use the same normalisation).
  """
  fn: Callable
  params: tuple
  strength: str
  reference_free: bool = False
  length_normalised: bool = False
  mismatched_kl: bool = False


LOSSES = {
    'dpo': PreferenceLoss(dpo, ('beta',), 'beta'),
    'ipo': PreferenceLoss(ipo, ('tau',), 'tau'),
    'ipo_mean': PreferenceLoss(ipo_mean, ('tau',), 'tau', length_normalised=True),
    'cdpo': PreferenceLoss(cdpo, ('beta', 'epsilon'), 'beta'),
    'robust_dpo': PreferenceLoss(robust_dpo, ('beta', 'epsilon'), 'beta'),
    'hinge': PreferenceLoss(hinge, ('beta',), 'beta'),
    'kto': PreferenceLoss(kto, ('beta', 'desirable_weight', 'undesirable_weight'), 'beta',
                          mismatched_kl=True),
    'orpo': PreferenceLoss(orpo, ('orpo_lambda',), 'orpo_lambda', reference_free=True,
                           length_normalised=True),
    'simpo': PreferenceLoss(simpo, ('beta', 'gamma'), 'beta', reference_free=True,
                            length_normalised=True),
    'apo_zero': PreferenceLoss(apo_zero, ('beta',), 'beta'),
}


def per_pair_loss(name: str, lp: PairLogps, hparams) -> jax.Array:
  entry = LOSSES[name]
  return entry.fn(lp, **{k: hparams[k] for k in entry.params})


def implicit_rewards(name: str, lp: PairLogps, beta: float):
  """(chosen, rejected) implicit rewards beta * log-ratio, per-token averaged for the
  length-normalised losses (for reference-free ones the reference term is 0: SimPO's
  reward beta * a)."""
  rc, rr = lp.policy_chosen - lp.ref_chosen, lp.policy_rejected - lp.ref_rejected
  if LOSSES[name].length_normalised:
    rc, rr = rc / _length(lp.chosen_length), rr / _length(lp.rejected_length)
  return beta * rc, beta * rr


def kto_partners(prompt_id: np.ndarray, *, seed: int) -> np.ndarray:
  """partner[n]: a pair of another prompt whose chosen response pairs with n's prompt in
  KTO's KL estimate (a seeded shuffle; each pair still sharing a prompt with its
  partner is moved along until it does not, when there are two prompts or more)."""
  n = len(prompt_id)
  partner = np.random.default_rng(seed).permutation(n)
  if len(np.unique(prompt_id)) < 2:
    return partner
  for i in np.flatnonzero(prompt_id[partner] == prompt_id):
    j = partner[i]
    while prompt_id[j] == prompt_id[i]:
      j = (j + 1) % n
    partner[i] = j
  return partner
