"""Memory per device of one real pod shape per family, on paper: the program each family
spends its memory in is compiled by XLA for the pod's device count (CPU devices standing in
for the chips: nothing is allocated and nothing runs) and its memory analysis read.

  python -m rlhf_jax.pod_memory [--rows=lm,ppo,selfplay]

Rows (SHAPES): the Transformer's train step (pretraining and SFT; the reward model and DPO
train the same Transformer) for a 1B model on a TPU v5e-64; PPO for a 1B policy on the same
slice: its update compiled as the Transformer's train step at the update's shape, and the
critic, the frozen reference and reward model and the rollout's KV cache added by their
shardings; AlphaZero self-play of go_9x9 on a TPU v4-32: the self-play program and the
update step. Per device: `state` is XLA's argument bytes (params and optimiser moments,
sharded as the run shards them, and the device's rows of the batch: exact), `temp` its
temporary bytes (activations, gradients, the search tree). The temporaries are XLA:CPU's
buffer assignment, not the TPU compiler's, which fuses and schedules differently: read them
as an estimate, not a measurement. Prints a table and, last, one JSON line of the figures.
"""
import argparse
import dataclasses
import functools
import json
import os
import sys
import time

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Shape:
  """One pod shape: the config and overrides, the devices and their memory."""
  name: str
  config: str                    # configs/<file>.py:<variant>
  overrides: dict
  pod: str
  devices: int
  hbm_gib: float                 # per chip
  note: str = ''
  runs: str = ''                  # the configs the row stands for


ONE_B = {'model.d_model': 2048, 'model.n_layers': 16, 'model.n_heads': 16,
         'model.d_ff': 5632, 'model.vocab_size': 32000, 'model.dtype': 'bfloat16',
         'model.remat': 'full', 'mesh.data': 1, 'mesh.fsdp': 16, 'mesh.tensor': 4}
SHAPES = {
    'lm': Shape('lm', 'pretrain.py:small', {
        **ONE_B, 'train.batch_size': 256, 'train.seq_len': 2048, 'optim.grad_accum': 8},
        pod='TPU v5e-64', devices=64, hbm_gib=16.0,
        note='256 x 2048 tokens a step in 8 microbatches',
        runs='pretrain.py, sft.py, reward_model.py, dpo.py with a 1B model'),
    # PPO's update: a minibatch of rollouts (prompt 512 + response 512 tokens) through the
    # policy; the rollouts are 512 prompts a step in 8 minibatches.
    'ppo': Shape('ppo', 'pretrain.py:small', {
        **ONE_B, 'train.batch_size': 64, 'train.seq_len': 1024, 'optim.grad_accum': 1},
        pod='TPU v5e-64', devices=64, hbm_gib=16.0,
        note='512 prompts x (512 + 512) tokens a step, 8 minibatches; ppo.value=critic',
        runs='ppo.py (grpo.py alike, without the critic and reward model) for a 1B policy'),
    'selfplay': Shape('selfplay', 'selfplay.py:go_9x9', {'mesh.data': 16},
                      pod='TPU v4-32', devices=16, hbm_gib=32.0,
                      note='1024 games x 128 simulations; updates of 2048 positions',
                      runs='selfplay.py:go_9x9'),
}
PPO_ROLLOUT_ROWS, PPO_PROMPT, PPO_RESPONSE = 512, 512, 512


def load(shape: Shape):
  from rlhf_jax.config import load_named
  path, variant = shape.config.split(':')
  config = load_named(path.removesuffix('.py'), variant)
  with config.unlocked():
    for dotted, value in shape.overrides.items():
      *parents, leaf = dotted.split('.')
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  return {'state': m.argument_size_in_bytes / GIB, 'temp': m.temp_size_in_bytes / GIB}


def lm_step(config) -> tuple[dict, object]:
  """XLA's memory of the Transformer's train step; (figures, the model config)."""
  import jax
  from rlhf_jax import sharding
  from rlhf_jax.stages.pretrain import build_model, dummy_batch
  from rlhf_jax.train import lm_step as step_lib
  from rlhf_jax.train.state import abstract_sharded, make_optimizer, make_schedule
  model = build_model(config, config.model.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  tx = make_optimizer(config.optim, config.train.steps)
  batch = dummy_batch(config)
  init = lambda rng: model.init(rng, batch.inputs, segment_ids=batch.segment_ids,
                                positions=batch.positions)['params']
  abstract, shardings = abstract_sharded(init_params=init, tx=tx,
                                         rng=jax.random.key_data(jax.random.key(0)),
                                         mesh=mesh, mesh_config=config.mesh)
  step = functools.partial(step_lib.train_step, model=model, tx=tx,
                           schedule=make_schedule(config.optim, config.train.steps),
                           grad_accum=config.optim.grad_accum)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  with sharding.activate(mesh, config.mesh):
    compiled = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh, config.mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,)).lower(abstract, batch).compile()
  params = sum(x.size for x in jax.tree.leaves(abstract.params))
  return {**memory(compiled), 'params_b': params / 1e9,
          'params_gib': params * 4 / config.mesh.fsdp / config.mesh.tensor / GIB}, model.cfg


def ppo(config) -> dict:
  """The policy's update (compiled) plus, by their shardings: a critic of the same size
  (its own params and moments), the frozen reference and reward model (params only), and
  the rollout's KV cache (bfloat16, heads over tensor, rows over fsdp)."""
  out, cfg = lm_step(config)
  m = config.mesh
  rows = PPO_ROLLOUT_ROWS // (m.data * m.fsdp)
  cache = (rows * (PPO_PROMPT + PPO_RESPONSE) * cfg.n_layers * 2 * cfg.d_model // m.tensor
           * 2) / GIB
  out['extra'] = out['state'] + 2 * out['params_gib'] + cache
  out['extra_what'] = (f'critic {out["state"]:.2f} + reference and reward model '
                       f'{2 * out["params_gib"]:.2f} + KV cache {cache:.2f}')
  return out


def selfplay(config) -> dict:
  """XLA's memory of the self-play program (search over every game) and of the update."""
  import jax
  from rlhf_jax import sharding
  from rlhf_jax.loops.selfplay import Engine
  engine = Engine(config)
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      engine.like_state, engine.state_shardings)  # the run's layout
  key = jax.ShapeDtypeStruct((2,), jax.numpy.uint32, sharding=engine.replicated)
  with sharding.activate(engine.mesh, config.mesh):
    play = engine.selfplay.lower(like['train'].params, key).compile()
    update = engine.step.lower(like['train'], like['replay'], key).compile()
  play_m, update_m = memory(play), memory(update)
  replay = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(like['replay']))
  params = sum(x.size for x in jax.tree.leaves(like['train'].params))
  return {'state': update_m['state'], 'temp': max(play_m['temp'], update_m['temp']),
          'params_b': params / 1e9, 'play_temp': play_m['temp'], 'update_temp': update_m['temp'],
          'replay_gib': replay / config.mesh.data / GIB}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--rows', default=','.join(SHAPES))
  args = p.parse_args(argv)
  names = [n for n in args.rows.split(',') if n]
  bad = [n for n in names if n not in SHAPES]
  if bad or not names:
    print(f'error: --rows={args.rows!r}: choose from {",".join(SHAPES)}', file=sys.stderr)
    sys.exit(2)
  rows = []
  for name in names:
    shape = SHAPES[name]
    # Each row in its own process: the CPU device count is fixed when JAX starts.
    if os.environ.get('RLHF_JAX_POD_ROW') != name:
      import subprocess
      env = {**os.environ, 'RLHF_JAX_POD_ROW': name,
             'XLA_FLAGS': f'--xla_force_host_platform_device_count={shape.devices}'}
      out = subprocess.run([sys.executable, '-m', 'rlhf_jax.pod_memory', f'--rows={name}'],
                           env=env, capture_output=True, text=True)
      if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        sys.exit(out.returncode)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1])['rows'][0])
      continue
    start = time.time()
    config = load(shape)
    figures = {'lm': lambda c: lm_step(c)[0], 'ppo': ppo, 'selfplay': selfplay}[name](config)
    mesh = 'x'.join(f'{a} {config.mesh[a]}' for a in ('data', 'fsdp', 'tensor')
                    if config.mesh.get(a, 1) not in (1, -1)) or 'data'
    total = figures['state'] + figures['temp'] + figures.get('extra', 0.0)
    rows.append({'row': name, 'runs': shape.runs, 'config': shape.config, 'pod': shape.pod,
                 'devices': shape.devices, 'mesh': mesh, 'note': shape.note,
                 **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()},
                 'total_gib': round(total, 3), 'hbm_gib': shape.hbm_gib,
                 'compile_s': round(time.time() - start, 1)})
  print(f'{"row":<9} {"pod":<11} {"mesh":<17} {"params":>7} {"state":>7} {"temp":>7} '
        f'{"extra":>7} {"total":>7} {"HBM":>5}  (GiB per device)')
  for r in rows:
    print(f'{r["row"]:<9} {r["pod"]:<11} {r["mesh"]:<17} {r["params_b"]:>6.3f}B '
          f'{r["state"]:>7.3f} {r["temp"]:>7.2f} {r.get("extra", 0.0):>7.2f} '
          f'{r["total_gib"]:>7.2f} {r["hbm_gib"]:>5.0f}')
  print(json.dumps({'rows': rows}))


if __name__ == '__main__':
  main()
