"""Preference pairs from a policy's own samples, labelled by simulated annotators, stored
with their lineage in a run directory and read back with random access.

A preference set is a folder with one sub-folder per shard (`shard_00000/`, ...), each
holding one `.npy` file per field of `PreferencePairs` (loaded memory-mapped) and a
`lineage.json` (producing checkpoint, round, sampling and annotator settings). A shard is
written to a temporary folder and renamed, so a killed writer leaves no partial shard.
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
  annotator:      [N] int32 who labelled the pair; group: [N] int32 their group.
  gold_chosen:    [N] float32 gold reward of chosen; gold_rejected: [N] float32.
  annotator_prob: [N] float32 the probability that the labeller prefers chosen (the truth
                  behind the label: for the noise ceiling, never for training).
  prompt_id:      [N] int32 which prompt (pairs of one prompt share it; held-out splits
                  are by prompt).
  round:          [N] int32 the loop round that produced the pair.
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

  def __len__(self) -> int:
    return self.prompts.shape[0]

  def take(self, index) -> 'PreferencePairs':
    return PreferencePairs(**{f.name: np.asarray(getattr(self, f.name)[index])
                              for f in dataclasses.fields(self)})


FIELDS = tuple(f.name for f in dataclasses.fields(PreferencePairs))


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
                round_: int) -> PreferencePairs:
  """Assigns each pair an annotator (uniformly at random), draws the label, and orders it
  into chosen/rejected. Pairs whose two responses are identical are dropped."""
  n = prompts.shape[0]
  k_who, k_label = jax.random.split(key)
  who = np.asarray(jax.random.randint(k_who, (n,), 0, pool.size), np.int32)
  prompt_mask = prompts > 0
  pair = dict(prompts=prompts, prompt_mask=prompt_mask, first=first, first_mask=first_mask,
              second=second, second_mask=second_mask)
  p_first = np.asarray(annotators.preference_prob(pool, gold, annotator=jnp.asarray(who),
                                                  **pair))
  first_wins = np.asarray(jax.random.uniform(k_label, (n,)) < p_first)
  gold_of = lambda y, m: np.asarray(reward_lib.gold_reward(
      gold, prompts=prompts, prompt_mask=prompt_mask, responses=y, response_mask=m))
  g1, g2 = gold_of(first, first_mask), gold_of(second, second_mask)
  pick = lambda a, b: np.where(first_wins.reshape((n,) + (1,) * (a.ndim - 1)), a, b)
  pairs = PreferencePairs(
      prompts=np.asarray(prompts, np.int32), prompt_lengths=np.asarray(prompt_lengths, np.int32),
      chosen=pick(first, second).astype(np.int32), rejected=pick(second, first).astype(np.int32),
      chosen_mask=pick(first_mask, second_mask).astype(np.float32),
      rejected_mask=pick(second_mask, first_mask).astype(np.float32),
      annotator=who, group=np.asarray(pool.group)[who].astype(np.int32),
      gold_chosen=pick(g1, g2).astype(np.float32), gold_rejected=pick(g2, g1).astype(np.float32),
      annotator_prob=np.where(first_wins, p_first, 1 - p_first).astype(np.float32),
      prompt_id=np.asarray(prompt_ids, np.int32),
      round=np.full(n, round_, np.int32))
  same = ((first * first_mask) == (second * second_mask)).all(axis=1)
  return pairs.take(np.nonzero(~same)[0])


def write_shard(directory: str, pairs: PreferencePairs, *, lineage: dict) -> str:
  """Adds `pairs` as the next shard of the set in `directory`; returns the shard path."""
  if len(pairs) == 0:
    raise UserError(f'no preference pairs to write to {directory}')
  os.makedirs(directory, exist_ok=True)
  final = os.path.join(directory, f'shard_{len(shard_paths(directory)):05d}')
  return array_store.write(final, {n: getattr(pairs, n) for n in FIELDS},
                           lineage={**lineage, 'pairs': len(pairs)})


def shard_paths(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  names = sorted(n for n in os.listdir(directory)
                 if n.startswith('shard_') and not n.endswith('.tmp'))
  return [os.path.join(directory, n) for n in names]


def _concatenate(arrays, *, left: bool):
  """Joins shards along rows, padding [N, T] arrays with 0 to the widest (prompts on the
  left, as they are left-padded; responses on the right)."""
  if arrays[0].ndim == 1:
    return np.concatenate(arrays)
  width = max(a.shape[1] for a in arrays)
  pad = lambda a: ((0, 0), (width - a.shape[1], 0) if left else (0, width - a.shape[1]))
  return np.concatenate([np.pad(a, pad(a)) for a in arrays])


def read(directory: str, *, rounds=None) -> tuple[PreferencePairs, list[dict]]:
  """All shards (or those of `rounds`) of `directory` (or of several directories joined
  with commas), concatenated; and each shard's lineage."""
  paths = [p for d in directory.split(',') for p in shard_paths(d)]
  if not paths:
    raise UserError(f'{directory} holds no preference pairs')
  parts, lineages = [], []
  for path in paths:
    arrays, lineage = array_store.read(path, FIELDS)
    if rounds is None or lineage.get('round') in rounds:
      parts.append(PreferencePairs(**arrays))
      lineages.append(lineage)
  if not parts:
    raise UserError(f'{directory} holds no preference pairs of rounds {rounds}')
  # Prompt ids count within a shard; offset them so that they stay distinct in the set.
  offsets = np.cumsum([0] + [int(np.max(p.prompt_id)) + 1 for p in parts[:-1]])
  columns = {n: [np.asarray(getattr(p, n)) for p in parts] for n in FIELDS}
  columns['prompt_id'] = [ids + off for ids, off in zip(columns['prompt_id'], offsets)]
  pairs = PreferencePairs(**{n: _concatenate(columns[n], left=(n == 'prompts'))
                             for n in FIELDS})
  check(pairs, directory)
  return pairs, lineages


def check(pairs: PreferencePairs, where: str) -> None:
  """A set a stage can learn from: some pairs, no empty response, chosen != rejected."""
  if len(pairs) == 0:
    raise UserError(f'{where} holds no preference pairs')
  if (pairs.chosen_mask.sum(axis=1) == 0).any() or (pairs.rejected_mask.sum(axis=1) == 0).any():
    raise UserError(f'{where} has a pair with an empty response')
  same = ((pairs.chosen * pairs.chosen_mask) == (pairs.rejected * pairs.rejected_mask)).all(1)
  if same.any():
    raise UserError(f'{where} has {int(same.sum())} pairs whose chosen response equals the '
                    f'rejected one (the first is pair {int(np.argmax(same))})')
