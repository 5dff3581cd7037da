"""The preference set a stage learns from: `prefs.dir` if the config names one (or several,
joined with commas), else the set in DIR/preferences, made on first use from the init run's policy (k samples per world
prompt, every pair labelled by prefs.labels_per_pair distinct random annotators of the pool
and their labels aggregated by prefs.aggregate) with its lineage. With a `judge` block
(AI feedback) only judge.human_fraction of the pairs go to the annotators and the rest to
the judge, under the config's constitution (data/ai_feedback.py)."""
import os

import jax
import numpy as np

from rlhf_jax import distributed, judges, sampling
from rlhf_jax.data import ai_feedback, jsonl, preferences
from rlhf_jax.data.batch import PairBatch
from rlhf_jax.stages import jsonl_data
from rlhf_jax.stages.from_run import FromRun
from rlhf_jax.world import constitution


def read_given(config, *, workdir: str | None = None):
  """(PreferencePairs, lineages, directory) of the set(s) prefs.dir names, checked as
  `load_or_make` checks them; jsonl_data.Given of a prefs.data file; None when the stage
  makes its own. A stage calls it before it writes anything to its DIR, so that a wrong
  prefs.dir or a bad row leaves DIR untouched."""
  if jsonl_data.source(config) is not None:
    return jsonl_data.read_given(config, workdir=workdir)
  if not config.prefs.dir:
    return None
  directory = ','.join(os.path.abspath(d) for d in config.prefs.dir.split(','))
  return _read_checked(directory)


def load_or_make(config, setup: FromRun, *, workdir: str, given=None):
  """(PreferencePairs, lineages, directory), checked: pairs exist, none with an empty
  response, none whose chosen equals rejected. `given`: what read_given returned.
  With prefs.data, the pairs are a user's file: data/jsonl.JsonlPairs, the lineage of
  DIR/jsonl, and that directory."""
  if jsonl_data.source(config) is not None:
    given = given if given is not None else jsonl_data.read_given(config, workdir=workdir)
    arrays, lineage = jsonl_data.load_or_make(config, given, workdir=workdir,
                                              lineage=setup.lineage())
    return (jsonl.JsonlPairs.from_arrays(arrays), [lineage],
            os.path.join(workdir, jsonl_data.DIRNAME))
  if config.prefs.dir:  # one set, or several joined with commas
    return given if given is not None else read_given(config)
  directory = os.path.join(workdir, 'preferences')
  distributed.make_once(directory, exists=bool(preferences.shard_paths(directory)),
                        make=lambda: make_shard(config, setup, directory=directory))
  return _read_checked(directory)


def _read_checked(directory: str):
  pairs, lineages = preferences.read(directory)
  preferences.check(pairs, directory)
  return pairs, lineages, directory


def make_shard(config, setup: FromRun, *, directory: str) -> None:
  """Samples prefs.responses_per_prompt responses of the init run's policy to
  prefs.num_prompts world prompts, has the annotators label every pair, and adds them to
  `directory` as a shard with lineage (round prefs.round, producing run and checkpoint),
  written by process 0 alone (every process makes the same pairs)."""
  p = config.prefs
  sampler = sampling.Sampler(
      model=setup.init.model,
      config=sampling.SampleConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature),
      mesh=setup.mesh, mesh_config=config.mesh, param_shardings=setup.init.param_shardings,
      continuous_slots=p.get('continuous_slots', 0))
  key = jax.random.fold_in(jax.random.key(config.seed), 0x9F3)
  if p.round > 0:  # fresh prompts and labels each round (round 0 keeps the original set)
    key = jax.random.fold_in(key, p.round)
  prompts, lengths = preferences.world_prompts(setup.world.lang, key=jax.random.fold_in(key, 0),
                                               num=p.num_prompts, max_len=p.prompt_len)
  raw = preferences.sample_pairs(sampler, setup.init.params, prompts=prompts,
                                 prompt_lengths=lengths, key=jax.random.fold_in(key, 1),
                                 k=p.responses_per_prompt)
  label = dict(key=jax.random.fold_in(key, 2), round_=p.round,
               labels_per_pair=p.labels_per_pair, method=p.aggregate)
  feedback = {}
  if 'judge' in config and config.judge.human_fraction < 1:  # AI feedback for the rest
    principles = constitution.from_block(config.constitution)
    judge = judges.make(config.judge, gold=setup.world.gold, num_principles=len(principles),
                        mesh=setup.mesh, mesh_config=config.mesh, dp=setup.dp)
    pairs = ai_feedback.label_mixed(raw, gold=setup.world.gold, pool=setup.world.pool,
                                    judge=judge, principles=principles,
                                    human_fraction=config.judge.human_fraction, **label)
    feedback = {'judge': config.judge.to_dict(), 'constitution': config.constitution.to_dict(),
                'human_labelled_pairs': int((pairs.labeller == preferences.HUMAN).sum()),
                'judge_labelled_pairs': int((pairs.labeller == preferences.JUDGE).sum())}
  else:
    pairs = preferences.label_pairs(**raw, gold=setup.world.gold, pool=setup.world.pool,
                                    **label)
  who = pairs.raw_annotator[pairs.raw_annotator >= 0]
  if not distributed.is_primary():
    return
  if p.get('continuous_slots', 0):  # row keys: other samples than the static sampler's
    feedback['continuous_slots'] = p.continuous_slots
  preferences.write_shard(directory, pairs, lineage={**feedback,
      **setup.lineage(), 'round': p.round, 'responses_per_prompt': p.responses_per_prompt,
      'temperature': p.temperature, 'annotators': config.annotators.to_dict(),
      'reward': config.reward.to_dict(), 'labels_per_pair': p.labels_per_pair,
      'aggregate': p.aggregate, 'labels': len(who),
      'labelling_annotators': len(np.unique(who))})


def pair_rows(pairs: preferences.PreferencePairs | jsonl.JsonlPairs, rows, valid, *,
              ref_chosen=None, ref_rejected=None, partner=None, ref_kl=None):
  """PairBatch of the given rows (valid: [B] bool, 0 weight where False), with the
  aggregate's soft labels; with `partner` (KTO), each row's mismatched response: the
  chosen response of pair partner[row], and its reference log-prob `ref_kl[row]`."""
  zeros = np.zeros(len(rows), np.float32)
  kl = {}
  if partner is not None:
    other = partner[rows]
    kl = dict(kl_response=np.asarray(pairs.chosen[other]),
              kl_mask=np.asarray(pairs.chosen_mask[other]),
              ref_kl=zeros if ref_kl is None else np.asarray(ref_kl[rows], np.float32))
  return PairBatch(
      prompts=np.asarray(pairs.prompts[rows]), prompt_lengths=np.asarray(pairs.prompt_lengths[rows]),
      chosen=np.asarray(pairs.chosen[rows]), rejected=np.asarray(pairs.rejected[rows]),
      chosen_mask=np.asarray(pairs.chosen_mask[rows]),
      rejected_mask=np.asarray(pairs.rejected_mask[rows]),
      weight=valid.astype(np.float32),
      ref_chosen=zeros if ref_chosen is None else np.asarray(ref_chosen[rows], np.float32),
      ref_rejected=zeros if ref_rejected is None else np.asarray(ref_rejected[rows], np.float32),
      label=np.asarray(pairs.soft_label[rows], np.float32), **kl)
