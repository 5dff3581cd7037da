"""Every variant of every config file builds and validates, and its model's parameter count
by formula (`ModelConfig.num_params`, an input to the FLOP and MFU figures) equals the count
of the parameters the model actually initialises. The tiny variant runs end to end from the
CLI with its defaults (the session's pretraining run) and learns: the true KL at least
halves."""
import glob
import importlib.util
import json
import math
import os
import re

import jax
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax.data.batch import from_rows
from rlhf_jax.stages.dispatch import STAGES
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.world import language

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def load_module(path):
  spec = importlib.util.spec_from_file_location(
      'config_' + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def docstring_variants(module) -> list[str]:
  """Names listed under "Variants:" in the file's docstring, one per line at indent 2."""
  doc = module.__doc__ or ''
  assert 'Variants:' in doc, f'{module.__file__}: the docstring lists no variants'
  section = doc.split('Variants:', 1)[1].split('\n\n', 1)[0]
  return re.findall(r'^  (\w+)\s', section, flags=re.M)


VARIANTS = [(path, variant) for path in CONFIG_FILES
            for variant in docstring_variants(load_module(path))]


def test_docstrings_name_the_expected_variants():
  by_file = {os.path.basename(p): [] for p in CONFIG_FILES}
  for path, variant in VARIANTS:
    by_file[os.path.basename(path)].append(variant)
  assert by_file['pretrain.py'] == ['tiny', 'small', 'tpu_v4_32']
  # Self-play's variants are its games; tic_tac_toe is its CPU-sized one.
  assert by_file.pop('selfplay.py') == ['tic_tac_toe', 'connect_four', 'go_9x9']
  assert all('tiny' in variants for variants in by_file.values()), by_file


def counted_params(model_config: ModelConfig) -> int:
  """Parameters the model creates, from shapes alone (no memory, even for tpu sizes)."""
  batch = from_rows(np.ones((1, 9), np.int32), pad_id=0)
  model = Transformer(model_config)
  shapes = jax.eval_shape(
      lambda rng: model.init(rng, batch.inputs, segment_ids=batch.segment_ids,
                             positions=batch.positions)['params'], jax.random.key(0))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize('path, variant', VARIANTS,
                         ids=[f'{os.path.basename(p)}:{v}' for p, v in VARIANTS])
def test_variant_builds_validates_and_counts_its_params(path, variant):
  config = load_module(path).get_config(variant)
  assert config.stage in STAGES
  config_lib.validate(config)
  if config.stage == 'selfplay':  # no language model: its own checks (and no data.source)
    from rlhf_jax.loops import selfplay
    selfplay.resolve(config)
    for field in ('seed', 'train.steps', 'train.batch_size', 'mesh.data', 'mesh.fsdp',
                  'mesh.tensor'):
      node = config
      for part in field.split('.'):
        node = node[part]  # KeyError: the contract's field is missing
    return
  # A pipeline is checked stage by stage.
  for stage in (config.stages.values() if 'stages' in config else [config]):
    assert stage.stage in STAGES
    check_stage_config(stage, f'{path}:{variant}')


def check_stage_config(config, where: str):
  # The fields every stage has (DESIGN.md, "Contracts").
  for field in ('seed', 'train.steps', 'train.batch_size', 'mesh.data', 'mesh.fsdp',
                'mesh.tensor', 'data.source'):
    node = config
    for part in field.split('.'):
      assert part in node, f'{where} has no {field}'
      node = node[part]
  # The run fills in vocab_size from its data: the world's vocabulary, or the tokenizer's.
  world = config.data.source == 'world'
  with config.unlocked():
    config.model.vocab_size = config.world.vocab_size if world else config.data.vocab_size
  model_config = ModelConfig.from_config(config.model)
  assert model_config.num_params() == counted_params(model_config)


@pytest.mark.parametrize('overrides', [
    dict(mlp='gelu'), dict(tie_embeddings=True), dict(n_layers=3, d_model=48, n_heads=6)],
    ids=['gelu', 'tied', 'odd-sizes'])
def test_param_formula_beyond_the_defaults(overrides):
  config = load_module(os.path.join(REPO, 'configs', 'pretrain.py')).get_config('tiny')
  config.model.update(vocab_size=config.world.vocab_size, **overrides)
  model_config = ModelConfig.from_config(config.model)
  assert model_config.num_params() == counted_params(model_config)


@pytest.mark.slow
def test_tiny_runs_end_to_end_and_learns(chain):
  # The session's pretraining run is this very CLI run of configs/pretrain.py:tiny, with its
  # defaults but for --config.train.progress=False (the tqdm bar only): made once, shared.
  from pathlib import Path
  workdir = Path(chain['pretrain'])
  config = load_module(os.path.join(REPO, 'configs', 'pretrain.py')).get_config('tiny')
  config.train.progress = False
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert records[0]['step'] == 0 and records[-1]['step'] == config.train.steps
  evals = [r for r in records if 'eval/true_kl' in r]
  assert evals[0]['step'] == 0 and evals[-1]['step'] == config.train.steps
  assert evals[-1]['eval/true_kl'] <= 0.5 * evals[0]['eval/true_kl']
  assert all(math.isfinite(r['train/loss']) for r in records if 'train/loss' in r)

  w = config.world
  lang = language.make_language(seed=w.seed, vocab_size=w.vocab_size, branching=w.branching,
                                zipf_a=w.zipf_a, eos_prob=w.eos_prob)
  assert abs(records[0]['world/entropy_rate'] - language.entropy_rate(lang)) <= 1e-9

  # config.json is the resolved config: the file's, with the vocabulary the world set.
  expected = json.loads(config.to_json_best_effort(sort_keys=True))
  assert expected['model']['vocab_size'] == -1
  expected['model']['vocab_size'] = 64
  assert json.loads((workdir / 'config.json').read_text()) == expected
