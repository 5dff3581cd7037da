"""Ragged rollouts: continuous batching against static batches, in the same run.

  python -m rlhf_jax.bench_ragged [--config=configs/pretrain.py:small] [--prompts=512]
      [--slots=64] [--refill=8] [--prompt_len=32] [--new_tokens=128] [--mean_fraction=0.25]

Both samplers decode the same `prompts` world prompts with the same params, `slots` rows
at a time: the static one in batches of `slots` (each batch runs until its longest row
ends: sampling.Sampler.sample_in_chunks, length buckets on), the continuous one through
`slots` cache rows, refilling `refill` at a time (sampling_continuous.py). Rate = response
tokens emitted (EOS included) per second of one call, after a separate compile (and, for
the static sampler, a warm-up on its first batch). With N prompts, the static sampler
pays about N / slots x new_tokens steps; the continuous one about N x mean / slots plus
one tail, the steps its last prompts take once no prompt is left to refill with.

The workload. A freshly initialised model almost never emits EOS, so the bench gives the
model a known stopping rate: one residual dimension c is held at a large constant by the
embeddings, so after the final norm h_c is about sqrt(d_model) at every position, and the
output kernel's row c is zero except b / sqrt(d_model) in the EOS column. The EOS logit is
then about b and the others stay near 0, so each step ends a row with probability about
p = e^b / (e^b + V - 1): lengths are geometric, capped at new_tokens, as the world's are
(its eos_prob), and p is solved so that the capped mean is mean_fraction x new_tokens.
The table reports the lengths the samplers actually drew. Prints a table, then one JSON
line.
"""
import json
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from rlhf_jax import sampling, sharding
from rlhf_jax.bench_common import measure, stop_probability, with_stopping_rate, world_prompts
from rlhf_jax.cli import config_name, parse_flags_or_exit
from rlhf_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/pretrain.py:small',
                                          'Config file[:variant].', lock_config=True)
_PROMPTS = flags.DEFINE_integer('prompts', 512, 'Prompts in the workload.')
_SLOTS = flags.DEFINE_integer('slots', 64, 'Rows decoded together (both samplers).')
_REFILL = flags.DEFINE_integer('refill', 8, 'Rows the continuous sampler refills at once.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt length (tokens, BOS included).')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'Most new tokens per row.')
_FRACTION = flags.DEFINE_float('mean_fraction', 0.25, 'Mean response length / new_tokens.')


def main():
  parse_flags_or_exit(sys.argv)
  from rlhf_jax.stages.pretrain import Setup
  config = _CONFIG.value
  try:
    if min(_PROMPTS.value, _SLOTS.value, _REFILL.value, _PROMPT_LEN.value, _NEW.value) <= 0:
      raise UserError('--prompts, --slots, --refill, --prompt_len and --new_tokens must be '
                      'positive')
    if not 0 < _FRACTION.value < 1 or _REFILL.value > _SLOTS.value:
      raise UserError('--mean_fraction must be in (0, 1) and --refill <= --slots')
    if config.data.source != 'world':
      raise UserError('the ragged bench draws its prompts from the world (data.source=world)')
    with tempfile.TemporaryDirectory() as workdir:
      setup = Setup(config, workdir=workdir)
    sample_config = sampling.SampleConfig(max_new_tokens=_NEW.value, temperature=1.0,
                                          row_keys=True)
    sampler = sampling.Sampler(model=setup.model, config=sample_config, mesh=setup.mesh,
                               mesh_config=config.mesh,
                               param_shardings=setup.state_shardings.params)
    if _SLOTS.value % sampler.dp or _PROMPTS.value % sampler.dp:
      raise UserError(f'--slots and --prompts must be divisible by the data-parallel size '
                      f'{sampler.dp}')
    p = stop_probability(_FRACTION.value, _NEW.value)
    params = with_stopping_rate(setup.state.params, setup.model.cfg, p=p,
                                eos_id=sample_config.eos_id)
    prompts, lengths = world_prompts(setup.source.world, _PROMPTS.value, _PROMPT_LEN.value)
    key = jax.random.key(0)
    with sharding.activate(setup.mesh, config.mesh):
      chunks = lambda rows: sampler.sample_in_chunks(params, prompts[:rows], lengths[:rows],
                                                     key, chunk=_SLOTS.value)
      static = _timed(lambda: chunks(_SLOTS.value), lambda: chunks(_PROMPTS.value))
      continuous = measure(sampler.continuous_program(_SLOTS.value, _REFILL.value),
                           (params, prompts, lengths, key))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  rows = {}
  for name, m in (('static', static), ('continuous', continuous)):
    drawn = np.asarray(m['out'].lengths)
    rows[name] = {'s': m['run_s'], 'tokens': int(drawn.sum()),
                  'rate': drawn.sum() / m['run_s'], 'mean': drawn.mean(), 'max': drawn.max()}
  print(f'{"sampler":<12}{"run s":>8}{"tokens":>9}{"tok/s":>9}{"mean len":>10}{"max len":>9}')
  for name, r in rows.items():
    print(f'{name:<12}{r["s"]:>8.2f}{r["tokens"]:>9}{r["rate"]:>9.1f}{r["mean"]:>10.1f}'
          f'{r["max"]:>9}')
  figures = {
      'config': config_name(sys.argv), 'devices': jax.device_count(),
      'prompts': _PROMPTS.value, 'slots': _SLOTS.value, 'refill': _REFILL.value,
      'prompt_len': _PROMPT_LEN.value, 'new_tokens': _NEW.value, 'stop_probability': p,
      'mean_length': round(float(rows['continuous']['mean']), 2),
      'mean_over_max': round(float(rows['continuous']['mean']) / _NEW.value, 3),
      'static_tokens_per_s': round(float(rows['static']['rate']), 1),
      'continuous_tokens_per_s': round(float(rows['continuous']['rate']), 1),
      'continuous_compile_s': round(continuous['compile_s'], 2),
      'speedup': round(float(rows['continuous']['rate'] / rows['static']['rate']), 2),
  }
  print(json.dumps(figures))


def _timed(warm, call) -> dict:
  """The static sampler is a Python loop over one compiled batch: compiled and warmed by
  `warm` (its first batch), then one timed call."""
  warm()
  t = time.perf_counter()
  out = call()
  return {'run_s': time.perf_counter() - t, 'out': out}


if __name__ == '__main__':
  main()
