"""PPO's prompts from a user's `{"prompt": ...}` JSONL (ppo.data='jsonl:PATH').

The rows are tokenized by the init run's tokenizer as every JSONL source is
(stages/jsonl_data.py, data/jsonl.py kind 'prompts': BOS and the prompt's tokens,
left-padded to the widest kept row, at most ppo.prompt_len) and kept in DIR/jsonl with the
file's sha256 and row counts. A seeded ppo.eval_fraction of the distinct prompts is held
out (row_source.split_by_prompt, seed config.seed):

  pool        the other rows: the rollout prompts (rl/prompt_pool of them), and the
              reward-normalisation prompts, ppo.reward_norm_prompts rows (rounded up to
              the data-parallel size) taken in a seeded order of the pool, cycling it
              when the pool is smaller (a prompt then gets several reference samples).
  held_out    where policy/* is measured (stages/policy_eval.py with no world): the
              reward model's score and the KL to the reference, rows cycled up to a
              multiple of the data-parallel size (a repeated row counts twice).

There is no gold reward for text: ppo.reward must be 'rm' (config._validate_ppo), and the
reward model's run must tokenize as the init run does (`check_rm_run`).
"""
import dataclasses
import os

import numpy as np

from rlhf_jax.data import jsonl
from rlhf_jax.data.row_source import split_by_prompt
from rlhf_jax.errors import UserError
from rlhf_jax.stages import jsonl_data


@dataclasses.dataclass(frozen=True)
class Prompts:
  """pool_prompts [N, P] int32 (left-padded), pool_lengths [N] int32; held_prompts [H, P],
  held_lengths [H]; lineage: DIR/jsonl's record."""
  pool_prompts: np.ndarray
  pool_lengths: np.ndarray
  held_prompts: np.ndarray
  held_lengths: np.ndarray
  lineage: dict


def _same_tokenizer(a: str, b: str) -> bool:
  if os.path.isdir(a) or os.path.isdir(b):
    return os.path.realpath(a) == os.path.realpath(b)
  return jsonl.sha256(a) == jsonl.sha256(b)


def check_rm_run(config) -> None:
  """The reward model of ppo.rm_run reads the tokens of the init run's tokenizer."""
  src = jsonl_data.source(config)
  ours = jsonl_data.check_init_run(src, config.init.run)
  try:
    theirs = jsonl_data.check_init_run(src, config.ppo.rm_run)
  except UserError:
    theirs = None
  if theirs is None or not _same_tokenizer(ours, theirs):
    raise UserError(f'ppo.data names a JSONL file, but ppo.rm_run {config.ppo.rm_run} does '
                    f'not use the tokenizer of init.run {config.init.run}: the reward model '
                    'must score the same tokens (train it on prefs.data=jsonl:PATH from a '
                    'run of the same text chain)')


def _cycle(prompts, lengths, n: int, order=None):
  order = np.arange(len(prompts)) if order is None else order
  rows = order[np.arange(n) % len(order)]
  return prompts[rows], lengths[rows]


def load(config, given, setup, *, workdir: str) -> Prompts:
  """The pool and held-out prompts of DIR/jsonl (written from `given` on first use)."""
  arrays, lineage = jsonl_data.load_or_make(config, given, workdir=workdir,
                                            lineage=setup.lineage())
  train, held = split_by_prompt(np.asarray(arrays['prompt_id']),
                                eval_fraction=config.ppo.eval_fraction, seed=config.seed)
  if len(train) == 0:
    raise UserError(f'{lineage["path"]}: {lineage["prompts"]} distinct prompts leave none '
                    f'for rollouts after ppo.eval_fraction={config.ppo.eval_fraction}')
  prompts, lengths = np.asarray(arrays['prompts']), np.asarray(arrays['prompt_lengths'])
  held_p, held_l = _cycle(prompts[held], lengths[held], setup.round_rows(len(held)))
  return Prompts(pool_prompts=prompts[train], pool_lengths=lengths[train],
                 held_prompts=held_p, held_lengths=held_l, lineage=lineage)


def reward_norm_prompts(config, prompts: Prompts, setup):
  """(prompts [M, P], lengths [M]): the pool's rows the reward statistics sample on."""
  order = np.random.default_rng((config.seed, 0x4E0)).permutation(len(prompts.pool_prompts))
  return _cycle(prompts.pool_prompts, prompts.pool_lengths,
                setup.round_rows(config.ppo.reward_norm_prompts), order)


def static_metrics(prompts: Prompts) -> dict:
  return {**jsonl_data.static_metrics(prompts.lineage, 'ppo'),
          'ppo/held_out_prompts': len(np.unique(prompts.held_prompts, axis=0))}
