"""Preference pairs from a policy's own samples, labelled by simulated annotators, stored
with their lineage in a run directory and read back with random access.

A preference set is a folder with one sub-folder per shard (`shard_00000/`, ...), each
holding one `.npy` file per field of `PreferencePairs` (loaded memory-mapped) and a
`lineage.json` (producing checkpoint, round, sampling and annotator settings). A shard is
written to a temporary folder and renamed, so a killed writer leaves no partial shard.

Each pair may carry several labels, by distinct annotators (`labels_per_pair`). Every raw
label is stored (who, which response they preferred, and the Bradley-Terry probability
behind it), with their aggregate (`AGGREGATES`): the pair is oriented so that `chosen` is
the aggregate's preferred response, and `soft_label` is the aggregate's estimate that
chosen is preferred, which the reward model trains on. `aggregate` recomputes it from the
raw labels (e.g. of fewer labels per pair). A shard written before the raw labels existed
reads as one label per pair, hard (soft_label 1).
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import array_store
from rlhf_jax.errors import UserError
from rlhf_jax.sampling import left_pad
from rlhf_jax.world import annotators, language
from rlhf_jax.world import reward as reward_lib


@dataclasses.dataclass(frozen=True)
class PreferencePairs:
  """N labelled pairs (host numpy arrays).

  prompts:        [N, P] int32 left-padded prompt, BOS first.
  prompt_lengths: [N] int32.
  chosen:         [N, R] int32 preferred response, PAD after its EOS.
  rejected:       [N, R] int32 the other response.
  chosen_mask:    [N, R] float32, 1 on response tokens (EOS included).
  rejected_mask:  [N, R] float32.
  annotator:      [N] int32 who labelled the pair (the first labeller when there are
                  several); group: [N] int32 their group.
  gold_chosen:    [N] float32 gold reward of chosen; gold_rejected: [N] float32.
  annotator_prob: [N] float32 the probability that the labeller prefers chosen (the truth
                  behind the label: for the noise ceiling, never for training); with
                  several labellers their mean.
  prompt_id:      [N] int32 which prompt (pairs of one prompt share it; held-out splits
                  are by prompt).
  round:          [N] int32 the loop round that produced the pair.
  raw_annotator:  [N, K] int32 who gave each raw label, distinct within a row (-1: no
                  label; sets of different K joined pad with it).
  raw_label:      [N, K] int32 1 where that annotator preferred chosen (0 where none).
  raw_prob:       [N, K] float32 that annotator's Bradley-Terry probability of preferring
                  chosen (0 where none): the truth behind the label, never for training.
  soft_label:     [N] float32 the aggregate's estimate that chosen is preferred, >= 1/2
                  (1/2: a tie); 1 for a single hard label.
  labeller:       [N] int32 who gave the label: HUMAN (the annotators, whose raw labels
                  are above) or JUDGE (AI feedback, data/ai_feedback.py: no raw label,
                  annotator and group -1, soft_label and annotator_prob the judge's
                  order-averaged P(chosen better)).
  principle:      [N] int32 the constitution's principle a judge judged under (-1: none).

  raw_* and soft_label may be left out (None): then the pair has the one label its
  annotator gave, hard, as in a set written before they existed; labeller and principle
  likewise (None: every label human, no principle).
  """
  prompts: np.ndarray
  prompt_lengths: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray
  chosen_mask: np.ndarray
  rejected_mask: np.ndarray
  annotator: np.ndarray
  group: np.ndarray
  gold_chosen: np.ndarray
  gold_rejected: np.ndarray
  annotator_prob: np.ndarray
  prompt_id: np.ndarray
  round: np.ndarray
  raw_annotator: np.ndarray = None
  raw_label: np.ndarray = None
  raw_prob: np.ndarray = None
  soft_label: np.ndarray = None
  labeller: np.ndarray = None
  principle: np.ndarray = None

  def __post_init__(self):
    if self.labeller is None:
      object.__setattr__(self, 'labeller', np.full(len(self.annotator), HUMAN, np.int32))
    if self.principle is None:
      object.__setattr__(self, 'principle', np.full(len(self.annotator), -1, np.int32))
    if self.soft_label is None:  # one label per pair, given by `annotator`, for chosen
      n = len(self.annotator)
      one = dict(raw_annotator=np.asarray(self.annotator, np.int32).reshape(n, 1),
                 raw_label=np.ones((n, 1), np.int32),
                 raw_prob=np.asarray(self.annotator_prob, np.float32).reshape(n, 1),
                 soft_label=np.ones(n, np.float32))
      for name, value in one.items():
        object.__setattr__(self, name, value)

  def __len__(self) -> int:
    return self.prompts.shape[0]

  def take(self, index) -> 'PreferencePairs':
    return PreferencePairs(**{f.name: np.asarray(getattr(self, f.name)[index])
                              for f in dataclasses.fields(self)})


HUMAN, JUDGE = 0, 1  # PreferencePairs.labeller

# FIELDS every shard holds; LABEL_FIELDS those of shards with raw labels (all or none);
# FEEDBACK_FIELDS those of shards written since AI feedback (all or none).
LABEL_FIELDS = ('raw_annotator', 'raw_label', 'raw_prob', 'soft_label')
FEEDBACK_FIELDS = ('labeller', 'principle')
ALL_FIELDS = tuple(f.name for f in dataclasses.fields(PreferencePairs))
FIELDS = tuple(n for n in ALL_FIELDS if n not in LABEL_FIELDS + FEEDBACK_FIELDS)


def _first_label(labels, observed, who):
  """The first labeller's label, hard: the set made with one label per pair."""
  del observed, who
  return labels[:, 0]


def _majority(labels, observed, who):
  """The share of votes for chosen (above 1/2 exactly where annotators.majority_vote
  says chosen)."""
  del who
  return (labels * observed).sum(axis=1) / observed.sum(axis=1)


def _by_annotator(labels, observed, who):
  """[N, K] labels and their annotators -> [N, A] label and observed matrices."""
  num = int(who.max()) + 1
  rows = np.nonzero(observed)[0]
  matrix, seen = np.zeros((len(labels), num)), np.zeros((len(labels), num))
  matrix[rows, who[observed > 0]] = labels[observed > 0]
  seen[rows, who[observed > 0]] = 1.0
  return matrix, seen


def _consistency(labels, observed, who):
  """The posterior of one-coin Dawid-Skene EM over all the pairs' labels together
  (annotators.consistency_weights): agreeing with the others earns an annotator weight."""
  _, consensus = annotators.consistency_weights(*_by_annotator(labels, observed, who))
  return consensus


# name -> (labels [N, K], observed [N, K], who [N, K]) -> [N] P(chosen is preferred).
AGGREGATES = {'single': _first_label, 'majority': _majority, 'consistency': _consistency}


def aggregate(pairs: PreferencePairs, *, method: str, labels_per_pair=None) -> PreferencePairs:
  """`pairs` with their raw labels (the first `labels_per_pair` of each row, default all)
  aggregated by AGGREGATES[method]: rows the aggregate prefers the other way round are
  turned round (responses, masks, gold, raw labels and probabilities), soft_label is the
  aggregate's P(chosen preferred) and annotator_prob the labellers' mean probability. A
  tie (P = 1/2) keeps its orientation. 'single' is the first label, hard."""
  if method not in AGGREGATES:
    raise UserError(f'aggregate {method!r} is not one of {tuple(AGGREGATES)}')
  k = pairs.raw_annotator.shape[1] if labels_per_pair is None else labels_per_pair
  who = np.asarray(pairs.raw_annotator[:, :k], np.int32)
  observed = (who >= 0).astype(np.float64)
  if not (observed.sum(axis=1) > 0).all():
    raise UserError(f'aggregate: a pair has none of the first {k} labels')
  labels = np.asarray(pairs.raw_label[:, :k], np.float64) * observed
  p_chosen = AGGREGATES[method](labels, observed, np.maximum(who, 0))
  turn = p_chosen < 0.5
  swap = lambda a, b: np.where(turn.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)
  raw_prob = np.asarray(pairs.raw_prob[:, :k], np.float64) * observed
  raw_prob = np.where(turn[:, None], 1 - raw_prob, raw_prob) * observed
  raw_label = np.where(turn[:, None], 1 - labels, labels) * observed
  return dataclasses.replace(
      pairs, chosen=swap(pairs.chosen, pairs.rejected), rejected=swap(pairs.rejected, pairs.chosen),
      chosen_mask=swap(pairs.chosen_mask, pairs.rejected_mask),
      rejected_mask=swap(pairs.rejected_mask, pairs.chosen_mask),
      gold_chosen=swap(pairs.gold_chosen, pairs.gold_rejected),
      gold_rejected=swap(pairs.gold_rejected, pairs.gold_chosen),
      annotator_prob=(raw_prob.sum(axis=1) / observed.sum(axis=1)).astype(np.float32),
      raw_annotator=who, raw_label=raw_label.astype(np.int32),
      raw_prob=raw_prob.astype(np.float32),
      soft_label=np.where(turn, 1 - p_chosen, p_chosen).astype(np.float32))


def world_prompts(lang, *, key, num: int, max_len: int):
  """`num` prompts: BOS and 1..max_len-1 content tokens of true sequences, left-padded."""
  k_seq, k_len = jax.random.split(key)
  seqs = np.asarray(language.sample(lang, key=k_seq, batch_size=num, seq_len=max_len))
  wanted = np.asarray(jax.random.randint(k_len, (num,), 1, max_len))
  prompts = []
  for row, keep in zip(seqs, wanted):
    content = [int(t) for t in row[1:] if t > 2]
    prompts.append([language.BOS_ID] + content[:max(int(keep), 1)])
  return left_pad(prompts, length=max_len)


def sample_pairs(sampler, params, *, prompts, prompt_lengths, key, k: int):
  """k responses to each prompt from the policy, paired every way (k*(k-1)/2 pairs per
  prompt). Returns keyword arguments for `label_pairs`."""
  if k < 2:
    raise UserError(f'k={k}: at least two responses per prompt make a pair')
  out = sampler.sample_in_chunks(params, np.repeat(prompts, k, axis=0),
                                 np.repeat(prompt_lengths, k), key)
  n = prompts.shape[0]
  i, j = np.triu_indices(k, 1)
  rows = np.arange(n)[:, None] * k
  a, b = (rows + i[None]).reshape(-1), (rows + j[None]).reshape(-1)
  return dict(prompts=np.repeat(prompts, len(i), axis=0),
              prompt_lengths=np.repeat(prompt_lengths, len(i)),
              prompt_ids=np.repeat(np.arange(n, dtype=np.int32), len(i)),
              first=out.response[a], first_mask=out.mask[a],
              second=out.response[b], second_mask=out.mask[b])


def label_pairs(*, prompts, prompt_lengths, prompt_ids, first, first_mask, second,
                second_mask, gold: reward_lib.GoldReward, pool: annotators.AnnotatorPool, key,
                round_: int, labels_per_pair: int = 1,
                method: str = 'single') -> PreferencePairs:
  """Has `labels_per_pair` distinct annotators (drawn uniformly at random) label each pair,
  each by their own Bradley-Terry probability, and orders it into chosen/rejected by the
  aggregate `method` of their labels (`aggregate`; over the whole batch at once, as
  consistency weighting needs overlap). Pairs whose two responses are identical are
  dropped."""
  n, k = prompts.shape[0], labels_per_pair
  if not 1 <= k <= pool.size:
    raise UserError(f'labels_per_pair={k}: the pool has {pool.size} annotators')
  k_who, k_label = jax.random.split(key)
  if k == 1:  # the draws of before, so that a one-label set is the set it always was
    who = np.asarray(jax.random.randint(k_who, (n,), 0, pool.size), np.int32)[:, None]
    draw = np.asarray(jax.random.uniform(k_label, (n,)))[:, None]
  else:  # the first k of a uniformly random order of the pool: k distinct annotators
    order = np.argsort(np.asarray(jax.random.uniform(k_who, (n, pool.size))), axis=1)
    who = order[:, :k].astype(np.int32)
    draw = np.asarray(jax.random.uniform(k_label, (n, k)))
  prompt_mask = prompts > 0
  pair = dict(prompts=prompts, prompt_mask=prompt_mask, first=first, first_mask=first_mask,
              second=second, second_mask=second_mask)
  p_first = np.stack([np.asarray(annotators.preference_prob(
      pool, gold, annotator=jnp.asarray(who[:, j]), **pair)) for j in range(k)], axis=1)
  first_wins = draw < p_first
  gold_of = lambda y, m: np.asarray(reward_lib.gold_reward(
      gold, prompts=prompts, prompt_mask=prompt_mask, responses=y, response_mask=m))
  pairs = PreferencePairs(  # first as chosen, until the aggregate says otherwise
      prompts=np.asarray(prompts, np.int32), prompt_lengths=np.asarray(prompt_lengths, np.int32),
      chosen=np.asarray(first, np.int32), rejected=np.asarray(second, np.int32),
      chosen_mask=np.asarray(first_mask, np.float32),
      rejected_mask=np.asarray(second_mask, np.float32),
      annotator=who[:, 0], group=np.asarray(pool.group)[who[:, 0]].astype(np.int32),
      gold_chosen=gold_of(first, first_mask).astype(np.float32),
      gold_rejected=gold_of(second, second_mask).astype(np.float32),
      annotator_prob=p_first.mean(axis=1).astype(np.float32),
      prompt_id=np.asarray(prompt_ids, np.int32), round=np.full(n, round_, np.int32),
      raw_annotator=who, raw_label=first_wins.astype(np.int32),
      raw_prob=p_first.astype(np.float32), soft_label=np.ones(n, np.float32))
  same = ((first * first_mask) == (second * second_mask)).all(axis=1)
  return aggregate(pairs.take(np.nonzero(~same)[0]), method=method)


def write_shard(directory: str, pairs: PreferencePairs, *, lineage: dict) -> str:
  """Adds `pairs` as the next shard of the set in `directory`; returns the shard path."""
  if len(pairs) == 0:
    raise UserError(f'no preference pairs to write to {directory}')
  os.makedirs(directory, exist_ok=True)
  final = os.path.join(directory, f'shard_{len(shard_paths(directory)):05d}')
  return array_store.write(final, {n: getattr(pairs, n) for n in ALL_FIELDS},
                           lineage={**lineage, 'pairs': len(pairs)})


def shard_paths(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  names = sorted(n for n in os.listdir(directory)
                 if n.startswith('shard_') and not n.endswith('.tmp'))
  return [os.path.join(directory, n) for n in names]


def _concatenate(arrays, *, left: bool, fill=0):
  """Joins shards along rows, padding [N, T] arrays with `fill` to the widest (prompts on
  the left, as they are left-padded; responses and raw labels on the right)."""
  if arrays[0].ndim == 1:
    return np.concatenate(arrays)
  width = max(a.shape[1] for a in arrays)
  pad = lambda a: ((0, 0), (width - a.shape[1], 0) if left else (0, width - a.shape[1]))
  return np.concatenate([np.pad(a, pad(a), constant_values=fill) for a in arrays])


def read(directory: str, *, rounds=None) -> tuple[PreferencePairs, list[dict]]:
  """All shards (or those of `rounds`) of `directory` (or of several directories joined
  with commas), concatenated; and each shard's lineage."""
  paths = [p for d in directory.split(',') for p in shard_paths(d)]
  if not paths:
    raise UserError(f'{directory} holds no preference pairs')
  parts, lineages = [], []
  for path in paths:
    # A shard written before raw labels were stored reads as one hard label per pair.
    labelled = os.path.exists(os.path.join(path, 'soft_label.npy'))
    judged = os.path.exists(os.path.join(path, 'labeller.npy'))
    arrays, lineage = array_store.read(path, FIELDS + LABEL_FIELDS * labelled +
                                       FEEDBACK_FIELDS * judged)
    if rounds is None or lineage.get('round') in rounds:
      parts.append(PreferencePairs(**arrays))
      lineages.append(lineage)
  if not parts:
    raise UserError(f'{directory} holds no preference pairs of rounds {rounds}')
  # Prompt ids count within a shard; offset them so that they stay distinct in the set.
  offsets = np.cumsum([0] + [int(np.max(p.prompt_id)) + 1 for p in parts[:-1]])
  columns = {n: [np.asarray(getattr(p, n)) for p in parts] for n in ALL_FIELDS}
  columns['prompt_id'] = [ids + off for ids, off in zip(columns['prompt_id'], offsets)]
  pairs = PreferencePairs(**{n: _concatenate(columns[n], left=(n == 'prompts'),
                                             fill=-1 if n == 'raw_annotator' else 0)
                             for n in ALL_FIELDS})
  check(pairs, directory)
  return pairs, lineages


def check(pairs: PreferencePairs, where: str) -> None:
  """A set a stage can learn from: some pairs, no empty response, chosen != rejected,
  every pair labelled (by an annotator, or by a judge), soft labels in [0, 1]."""
  if len(pairs) == 0:
    raise UserError(f'{where} holds no preference pairs')
  human = np.asarray(pairs.labeller) == HUMAN
  if not (np.asarray(pairs.raw_annotator)[human] >= 0).any(axis=1).all():
    raise UserError(f'{where} has a pair without a label')
  soft = np.asarray(pairs.soft_label)
  if not ((soft >= 0) & (soft <= 1)).all():
    raise UserError(f'{where} has a soft label outside [0, 1]')
  if (pairs.chosen_mask.sum(axis=1) == 0).any() or (pairs.rejected_mask.sum(axis=1) == 0).any():
    raise UserError(f'{where} has a pair with an empty response')
  same = ((pairs.chosen * pairs.chosen_mask) == (pairs.rejected * pairs.rejected_mask)).all(1)
  if same.any():
    raise UserError(f'{where} has {int(same.sum())} pairs whose chosen response equals the '
                    f'rejected one (the first is pair {int(np.argmax(same))})')
