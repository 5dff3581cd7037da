"""Reward-model metrics on held-out preference pairs, against the annotators' labels and
against the truth the world knows (all host-side float64).

  rm/label_accuracy     fraction of held-out labels the model predicts (ensemble mean
                        reward; a tie counts half)
  rm/noise_ceiling      the same for a perfect model of the annotators: it predicts the
                        label each annotator gives with probability > 1/2
  rm/gold_accuracy      agreement with the gold preference (pairs with a gold tie left out)
  rm/label_gold_accuracy  the labels' own agreement with gold, for comparison
  rm/calibration_error  expected calibration error (10 equal-width bins of confidence) of
                        P(chosen) = mean over members of sigmoid(r_chosen - r_rejected)
  rm/gold_correlation   Pearson correlation of reward and gold reward over held-out
                        responses
  rm/ensemble_std       mean over pairs of the members' standard deviation of the margin
  rm/group{g}/...       label_accuracy, noise_ceiling and gold_accuracy over the pairs
                        labelled by group g (their first labeller's group), and
                        agreement: with the preference of a noise-free group-g annotator
                        (group weights, mean group length bias), over all held-out pairs

and, of the labels a reward model trains on (`label_metrics`, once per run):

  prefs/aggregate_gold_agreement  share of the pairs (gold ties left out) where the labels'
                        aggregate prefers the gold-better response (an aggregate tie,
                        soft label 1/2, counts half)
  prefs/labels_per_pair, prefs/labels, prefs/labelling_annotators  mean raw labels per
                        pair, their number, and how many annotators gave them
  prefs/judge_labels    pairs labelled by a judge (AI feedback) instead; with any,
                        prefs/judge_gold_agreement is their agreement with gold alone
"""
import numpy as np

from rlhf_jax.data.preferences import JUDGE
from rlhf_jax.world import reward as reward_lib


def _agreement(margin, truth) -> float:
  """Mean agreement of sign(margin) with sign(truth) where truth is not a tie."""
  keep = truth != 0
  if not keep.any():
    return float('nan')
  hit = np.where(margin[keep] == 0, 0.5, (np.sign(margin[keep]) == np.sign(truth[keep])))
  return float(np.mean(hit))


def calibration_error(p_chosen, *, bins: int = 10) -> float:
  """ECE of predictions whose realised outcome is always "chosen": confidence is
  max(p, 1-p), correct when p > 1/2."""
  p = np.asarray(p_chosen, np.float64)
  confidence = np.maximum(p, 1 - p)
  correct = (p > 0.5).astype(np.float64) + 0.5 * (p == 0.5)
  which = np.minimum(((confidence - 0.5) * 2 * bins).astype(int), bins - 1)
  ece = 0.0
  for b in range(bins):
    sel = which == b
    if sel.any():
      ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
  return float(ece)


def label_metrics(pairs) -> dict:
  """The figures of the docstring's prefs/ part for PreferencePairs `pairs`."""
  gold_gap = np.asarray(pairs.gold_chosen, np.float64) - pairs.gold_rejected
  tie = np.asarray(pairs.soft_label) == 0.5
  who = np.asarray(pairs.raw_annotator)
  out = {
      'prefs/aggregate_gold_agreement': _agreement(np.where(tie, 0.0, 1.0), gold_gap),
      'prefs/labels_per_pair': float((who >= 0).sum(axis=1).mean()),
      'prefs/labels': int((who >= 0).sum()),
      'prefs/labelling_annotators': int(len(np.unique(who[who >= 0]))),
  }
  judged = np.asarray(pairs.labeller) == JUDGE
  if judged.any():
    out['prefs/judge_labels'] = int(judged.sum())
    out['prefs/judge_gold_agreement'] = _agreement(np.where(tie, 0.0, 1.0)[judged],
                                                   gold_gap[judged])
  return out


def group_utilities(world, pairs) -> np.ndarray:
  """[G, N, 2] utility of (chosen, rejected) to a noise-free typical member of each group."""
  pool, gold = world.pool, world.gold
  groups = np.asarray(pool.group)
  out = []
  for g in range(2):
    if not (groups == g).any():
      out.append(None)
      continue
    bias = float(np.asarray(pool.length_bias)[groups == g].mean())
    weights = np.asarray(pool.group_helpfulness)[g]
    util = []
    for y, m in ((pairs.chosen, pairs.chosen_mask), (pairs.rejected, pairs.rejected_mask)):
      terms = reward_lib.reward_terms(gold, prompts=pairs.prompts,
                                      prompt_mask=pairs.prompts > 0, responses=y,
                                      response_mask=m, token_weights=weights[np.asarray(y)])
      util.append(np.asarray(reward_lib.combine(gold, terms, length_bias=bias), np.float64))
    out.append(np.stack(util, axis=-1))
  return out


def label_only_metrics(chosen, rejected) -> dict:
  """The metrics above that need no world, for pairs whose label is all there is (a
  user's file, stages/jsonl_data.py: chosen is preferred): rm/label_accuracy,
  rm/calibration_error, rm/ensemble_std, rm/held_out_pairs, and rm/margin, the mean
  ensemble margin r_chosen - r_rejected."""
  chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
  margin = (chosen - rejected).mean(axis=0)
  p_chosen = (1 / (1 + np.exp(-(chosen - rejected)))).mean(axis=0)
  return {'rm/label_accuracy': float(np.where(margin == 0, 0.5, margin > 0).mean()),
          'rm/calibration_error': calibration_error(p_chosen),
          'rm/ensemble_std': float((chosen - rejected).std(axis=0).mean()),
          'rm/held_out_pairs': len(margin), 'rm/margin': float(margin.mean())}


def metrics(chosen, rejected, pairs, *, group_utility) -> dict:
  """chosen, rejected: [K, N] member rewards of the held-out pairs; pairs: their
  PreferencePairs; group_utility: `group_utilities` of them."""
  chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
  margin = (chosen - rejected).mean(axis=0)
  p_chosen = (1 / (1 + np.exp(-(chosen - rejected)))).mean(axis=0)
  gold_gap = np.asarray(pairs.gold_chosen, np.float64) - pairs.gold_rejected
  prob = np.asarray(pairs.annotator_prob, np.float64)
  label_hit = np.where(margin == 0, 0.5, margin > 0)
  ceiling_hit = np.where(prob == 0.5, 0.5, prob > 0.5)
  rewards = np.concatenate([chosen.mean(axis=0), rejected.mean(axis=0)])
  golds = np.concatenate([pairs.gold_chosen, pairs.gold_rejected]).astype(np.float64)
  out = {
      'rm/label_accuracy': float(label_hit.mean()),
      'rm/noise_ceiling': float(ceiling_hit.mean()),
      'rm/gold_accuracy': _agreement(margin, gold_gap),
      'rm/label_gold_accuracy': _agreement(np.ones_like(gold_gap), gold_gap),
      'rm/calibration_error': calibration_error(p_chosen),
      'rm/gold_correlation': float(np.corrcoef(rewards, golds)[0, 1]),
      'rm/ensemble_std': float((chosen - rejected).std(axis=0).mean()),
      'rm/held_out_pairs': len(margin),
  }
  group = np.asarray(pairs.group)
  for g, util in enumerate(group_utility):
    if util is None:
      continue
    out[f'rm/group{g}/agreement'] = _agreement(margin, util[:, 0] - util[:, 1])
    sel = group == g
    if sel.any():
      out[f'rm/group{g}/label_accuracy'] = float(label_hit[sel].mean())
      out[f'rm/group{g}/noise_ceiling'] = float(ceiling_hit[sel].mean())
      out[f'rm/group{g}/gold_accuracy'] = _agreement(margin[sel], gold_gap[sel])
  return out
