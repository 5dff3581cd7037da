"""Self-play's training updates: one `lax.scan` over the updates (the design's inner-loop
style, and a baseline measured in the same run) against the Python loop over one jitted
step that rlhf_jax/selfplay/update.py uses.

  python -m rlhf_jax.bench_selfplay [--variant=connect_four] [--updates=20] [--repeats=3]

Both run the same updates (same keys, same batches) of a config's network on a replay
buffer of random positions; each is compiled first (timed apart), then the best of
`--repeats` steady-state runs is kept. ratio = scan_s / loop_s: above 1, the loop is
faster. On XLA:CPU a convolution's backward pass inside a loop body is far slower than
outside one, so the residual net of connect_four shows a large ratio (about 20) and the
MLP of tic_tac_toe about 0.8 (the loop's dispatch shows on so small a step).
max_param_diff: the two give the same parameters up to float rounding, which Adam's
normalisation amplifies (0 for the MLP, about 4e-4 after 20 updates of the resnet).
Prints a table, then one JSON line.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags

from rlhf_jax import config as config_lib
from rlhf_jax.cli import parse_flags_or_exit

_VARIANT = flags.DEFINE_string('variant', 'connect_four', 'Variant of configs/selfplay.py.')
_UPDATES = flags.DEFINE_integer('updates', 20, 'Updates per timed run.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Steady-state runs timed; the best is kept.')


def best_of(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def main():
  parse_flags_or_exit(sys.argv)
  from rlhf_jax.loops import selfplay as selfplay_loop
  from rlhf_jax.selfplay import update as update_lib
  if _VARIANT.value not in ('tic_tac_toe', 'connect_four', 'go_9x9') \
      or min(_UPDATES.value, _REPEATS.value) < 1:
    print('error: --variant must be a configs/selfplay.py variant, --updates and --repeats '
          '>= 1', file=sys.stderr)
    sys.exit(2)
  config = config_lib.load_named('selfplay', _VARIANT.value)
  with config.unlocked():
    config.selfplay.buffer_iterations = 1
  engine = selfplay_loop.Engine(config)
  run_state = engine.init_state(jax.random.PRNGKey(0))
  state, buffer = run_state['train'], run_state['replay']
  k_obs = jax.random.PRNGKey(1)
  buffer = buffer.replace(
      observation=jax.random.bernoulli(k_obs, 0.3, buffer.observation.shape)
      .astype(buffer.observation.dtype),
      policy=jnp.full(buffer.policy.shape, 1.0 / buffer.policy.shape[-1]),
      legal_action_mask=jnp.ones_like(buffer.legal_action_mask),
      valid=jnp.ones_like(buffer.valid))
  step = update_lib.make_step(apply_fn=engine.apply_fn, tx=engine.tx,
                              batch_size=config.train.batch_size,
                              weight_decay=config.selfplay.weight_decay)
  key, n = jax.random.PRNGKey(2), _UPDATES.value

  def scanned(state, replay, key):
    return jax.lax.scan(lambda s, k: step(s, replay, k), state, jax.random.split(key, n))

  t = time.perf_counter()
  scan = jax.jit(scanned).lower(state, buffer, key).compile()
  scan_compile = time.perf_counter() - t
  t = time.perf_counter()
  one = jax.jit(step).lower(state, buffer, key).compile()
  loop_compile = time.perf_counter() - t
  scan_s = best_of(lambda: scan(state, buffer, key), _REPEATS.value)
  loop_s = best_of(lambda: update_lib.train(one, state, buffer, key, steps=n), _REPEATS.value)
  a = scan(state, buffer, key)[0].params
  b = update_lib.train(one, state, buffer, key, steps=n)[0].params
  max_diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
                 zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  print(f'{_VARIANT.value}: {config.network.name} {config.network.num_blocks} x '
        f'{config.network.width}, {n} updates of {config.train.batch_size} positions')
  print(f'{"updates as":<34}{"compile s":>11}{"run s":>10}{"s/update":>10}')
  for name, c, s in (('lax.scan (baseline)', scan_compile, scan_s),
                     ('Python loop of one jitted step', loop_compile, loop_s)):
    print(f'{name:<34}{c:>11.2f}{s:>10.3f}{s / n:>10.4f}')
  print(json.dumps({
      'backend': jax.default_backend(), 'variant': _VARIANT.value,
      'network': config.network.name, 'updates': n, 'batch_size': config.train.batch_size,
      'scan_compile_s': round(scan_compile, 3), 'loop_compile_s': round(loop_compile, 3),
      'scan_s': scan_s, 'loop_s': loop_s, 'ratio': scan_s / loop_s,
      'max_param_diff': max_diff}))


if __name__ == '__main__':
  main()
