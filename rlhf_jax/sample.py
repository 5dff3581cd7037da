"""Print samples from the newest checkpoint of a run.

  python -m rlhf_jax.sample --workdir=DIR [--num=16] [--prompt=...] [--max_new_tokens=64]
      [--temperature=1.0] [--top_k=0] [--top_p=1.0] [--greedy] [--seed=0] [--step=N]

World runs show token ids (`--prompt='5 17'`: ids after BOS) with each sample's log-prob
under the model and under the true language; text runs decode with the run's
sentencepiece model (`--prompt='Once upon'`). Samples are drawn with the KV-cached sampler
on all local devices (batch over `data`). Bad input: one `error:` line, exit status 2.
"""
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import flags

from rlhf_jax import sampling, sharding
from rlhf_jax.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory to sample from.')
_NUM = flags.DEFINE_integer('num', 16, 'Number of samples.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Prompt text (text runs) or token ids (world).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus mass to keep (1.0: all).')
_GREEDY = flags.DEFINE_boolean('greedy', False, 'Argmax decoding.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')


def load_run(workdir: str):
  """The run in `workdir` at --step (default: its newest checkpoint), on a mesh of all
  local devices on `data`. Returns (LoadedRun, mesh, mesh_config)."""
  from rlhf_jax.train import runs
  config = runs.read_config(workdir, role='--workdir')
  mesh_config = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                               rules=config.mesh.rules))
  mesh = sharding.make_mesh(mesh_config)
  return runs.load(workdir, mesh=mesh, mesh_config=mesh_config, step=_STEP.value,
                   role='--workdir'), mesh, \
      mesh_config


def make_prompt(config, workdir: str, text: str):
  """(prompt ids with BOS, tokenizer or None)."""
  if config.data.source == 'world':
    try:
      ids = [int(t) for t in text.replace(',', ' ').split()]
    except ValueError:
      raise UserError(f'--prompt={text!r}: a world run takes token ids, e.g. "5 17"') from None
    if ids and ids[0] == 1:
      ids = ids[1:]
    bad = [i for i in ids if not 3 <= i < config.model.vocab_size]
    if bad:
      raise UserError(f'--prompt ids {bad} are not content tokens of the world '
                      f'(3..{config.model.vocab_size - 1})')
    return [1] + ids, None
  from rlhf_jax.data.tokenizer import load_tokenizer
  tokenizer = load_tokenizer(model_path=os.path.join(workdir, 'tokenizer.model'))
  return [tokenizer.bos_id] + tokenizer.encode(text), tokenizer


def show(ids, tokenizer) -> str:
  if tokenizer is not None:
    return repr(tokenizer.decode([int(i) for i in ids if i > 3]))
  names = {0: '<pad>', 1: '<bos>', 2: '<eos>'}
  return ' '.join(names.get(int(i), str(int(i))) for i in ids)


def main(argv=None) -> None:
  argv = sys.argv if argv is None else argv
  try:
    try:
      flags.FLAGS(argv)
    except flags.Error as e:
      raise UserError(str(e)) from None
    if not _WORKDIR.value:
      raise UserError('--workdir is required')
    if _NUM.value <= 0:
      raise UserError(f'--num={_NUM.value} must be positive')
    workdir = os.path.abspath(_WORKDIR.value)
    run, mesh, mesh_config = load_run(workdir)
    config = run.config
    prompt, tokenizer = make_prompt(config, workdir, _PROMPT.value)
    sample_config = sampling.SampleConfig(
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, greedy=_GREEDY.value)
    sampler = sampling.Sampler(model=run.model, config=sample_config, mesh=mesh,
                               mesh_config=mesh_config, param_shardings=run.param_shardings)
    rows = -(-_NUM.value // sampler.dp) * sampler.dp  # a whole number of rows per device
    prompts, lengths = sampling.left_pad([prompt] * rows)
    out = jax.device_get(sampler.sample(run.params, prompts, lengths,
                                        jax.random.key(_SEED.value)))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  true_logp = None
  if config.data.source == 'world':
    from rlhf_jax.world import language
    w = config.world
    lang = language.from_block(w)
    # The chain is order 1: the last prompt token and the response give every term.
    last_and_response = out.tokens[:, -1 - out.response.shape[1]:]
    true_logp = np.asarray(language.token_logprobs(lang, tokens=last_and_response))
  print(f'# {workdir}, checkpoint {run.step}; prompt: {show(prompt, tokenizer)}')
  for i in range(_NUM.value):
    n = int(out.lengths[i])
    logp = float(out.raw_logprobs[i].sum())
    extra = '' if true_logp is None else f', log p_true {float(true_logp[i, :n].sum()):.2f}'
    print(f'[{i}] ({n} tokens, log p_model {logp:.2f}{extra}) '
          f'{show(out.response[i, :n], tokenizer)}')


if __name__ == '__main__':
  main()
