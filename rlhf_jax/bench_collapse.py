"""Seeds for free? One bigram collapse run (`loops/collapse_bigram.py`) for 1 seed against
the same run vmapped over many seeds.

  python -m rlhf_jax.bench_collapse [--seeds=8] [--generations=10] [--samples=512] [--engine=adam]

All are `jit` of the same `run` on the tiny world (V = 64, K = 8), schedule replace and
by default the adam engine's training (100 Adam steps a generation; `--engine=mle`, the
exact refit, is a handful of ops a generation, so sampling is nearly all its cost): one
seed on one device; the seeds vmapped on one device; and the seeds vmapped and sharded
over all devices (on a CPU host, one device per core: this module asks XLA for
os.cpu_count() host devices unless XLA_FLAGS already sets a count). A single seed cannot
use more than one device, so the sharded run is how a machine's whole width goes to many
seeds. Each is compiled first (timed apart), then timed steady-state: the best of
`--repeats` calls.
ratio = sharded_s / one_seed_s (ratio_one_device = vmapped_s / one_seed_s); near 1 means
extra seeds cost nothing, `seeds` means no saving. On a CPU core every op here is
compute-bound, so expect a ratio near seeds / cores plus a little; on an accelerator a
single seed leaves the device mostly idle. Prints a table, then one JSON line.
"""
import json
import os
import sys
import time

if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={os.cpu_count()}')

import jax  # noqa: E402  (after the device count is set)
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from absl import flags  # noqa: E402

from rlhf_jax.cli import parse_flags_or_exit
from rlhf_jax.errors import UserError  # noqa: E402

_SEEDS = flags.DEFINE_integer('seeds', 8, 'Seeds in the vmapped run.')
_GENERATIONS = flags.DEFINE_integer('generations', 10, 'Generations per run.')
_SAMPLES = flags.DEFINE_integer('samples', 512, 'Rows sampled per generation.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 64, 'Row length, BOS included.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Steady-state calls timed; the best is kept.')
_ENGINE = flags.DEFINE_string('engine', 'adam', 'Collapse engine: adam or mle.')


def measure(fn, arg, repeats: int) -> dict:
  """Compile once (timed apart), warm up, then the best of `repeats` steady-state calls."""
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(arg).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(arg))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(arg))
    times.append(time.perf_counter() - t)
  return {'compile_s': compile_s, 'run_s': min(times)}


def main():
  parse_flags_or_exit(sys.argv)
  from rlhf_jax.analysis import collapse_metrics as cm
  from rlhf_jax.loops import collapse_bigram as cb
  from rlhf_jax.world import language
  try:
    if min(_SEEDS.value, _REPEATS.value) < 1:
      raise UserError('--seeds and --repeats must be >= 1')
    spec = cb.CollapseSpec(generations=_GENERATIONS.value, samples=_SAMPLES.value,
                           seq_len=_SEQ_LEN.value, engine=_ENGINE.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  lang = language.make_language(seed=0, vocab_size=64, branching=8, zipf_a=1.1, eos_prob=0.05)
  heldout = language.sample(lang, key=jax.random.key(1), batch_size=1024,
                            seq_len=spec.seq_len)
  run = cb.make_collapse(spec, vocab_size=lang.vocab_size, real=cb.RealData.world(lang),
                         heldout_counts=cm.bigram_counts(heldout, vocab_size=lang.vocab_size),
                         true_logp=cm.true_logp_table(lang), tail=cm.world_tail(lang))
  key = jax.random.key(0)
  one = measure(run, key, _REPEATS.value)
  keys = jax.random.split(key, _SEEDS.value)
  many = measure(jax.vmap(run), keys, _REPEATS.value)
  # The largest device count that divides the seeds: each device vmaps its share.
  devices = max(d for d in range(1, len(jax.devices()) + 1) if _SEEDS.value % d == 0)
  mesh = Mesh(np.array(jax.devices()[:devices]), ('seeds',))
  sharded = measure(jax.vmap(run), jax.device_put(keys, NamedSharding(mesh, PartitionSpec(
      'seeds'))), _REPEATS.value)
  ratio = sharded['run_s'] / one['run_s']
  print(f'{"run":<26}{"seeds":>7}{"compile s":>11}{"run s":>10}{"s/seed":>10}')
  for name, seeds, m in (('jit, 1 device', 1, one), ('jit(vmap), 1 device', _SEEDS.value, many),
                         (f'jit(vmap), {devices} devices', _SEEDS.value, sharded)):
    print(f'{name:<26}{seeds:>7}{m["compile_s"]:>11.2f}{m["run_s"]:>10.4f}'
          f'{m["run_s"] / seeds:>10.4f}')
  figures = {
      'backend': jax.default_backend(), 'engine': spec.engine, 'seeds': _SEEDS.value,
      'generations': spec.generations, 'samples': spec.samples, 'seq_len': spec.seq_len,
      'train_steps': spec.train_steps,
      'one_seed_compile_s': round(one['compile_s'], 3),
      'vmapped_compile_s': round(many['compile_s'], 3),
      'devices': devices, 'one_seed_s': one['run_s'], 'vmapped_s': many['run_s'],
      'sharded_s': sharded['run_s'], 'ratio_one_device': many['run_s'] / one['run_s'],
      'ratio': ratio,
  }
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
