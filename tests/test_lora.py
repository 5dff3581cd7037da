"""LoRA (rlhf_jax/models/lora.py, train/lora_state.py): zero-initialised adapters reproduce
the base logits bit for bit (full and cached forward); the adapted forward equals a NumPy
float64 merge W + (alpha/r) A B; the gradient reaches only the adapters and a step leaves
the base bitwise as it was; the optimiser state's bytes equal a hand count from the shapes;
a LoRA checkpoint loads merged (runs.load) and exports merged (--merge), re-importing to the
adapted model's logits within 1e-5; bad settings are refused in one line; and (slow) an SFT
run from the CLI checkpoints adapters only and resumes to the same numbers."""
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import hf_reference
from conftest import REPO, cli_env, load_config, read_state
from rlhf_jax import config as config_lib
from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import lora, reward_model
from rlhf_jax.models.transformer import KVCache, ModelConfig, Transformer
from rlhf_jax.train import lm_step, lora_state, runs
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.state import TrainState
from test_cli_errors import assert_one_error_line

BASE = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, d_ff=24, n_kv_heads=2)
TOKENS = (np.arange(2 * 9).reshape(2, 9) * 7 % 29 + 3).astype(np.int32)


def adapted(cfg=BASE, *, rank=4, alpha=8.0, targets=lora.TARGETS):
  block = ml_collections.ConfigDict(dict(rank=rank, alpha=alpha, targets=','.join(targets)))
  return lora.adapt(cfg, block)


def logits(cfg, params, tokens=TOKENS):
  pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(Transformer(cfg).apply({'params': params}, jnp.asarray(tokens),
                                           segment_ids=jnp.ones_like(tokens),
                                           positions=jnp.asarray(pos)).logits)


def init(cfg, seed):
  dummy = np.ones((1, 8), np.int32)
  return jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(
      Transformer(cfg).init(jax.random.key(seed), dummy, segment_ids=dummy,
                            positions=dummy)['params'])))


def with_random_b(trainable, seed=5, std=0.3):
  """The adapters with every B drawn at random (at init they are 0)."""
  rng = np.random.default_rng(seed)
  def fill(tree):
    return {k: fill(v) if isinstance(v, dict) else
            (rng.normal(0, std, v.shape).astype(v.dtype) if k.endswith(lora.B_SUFFIX) else v)
            for k, v in tree.items()}
  return fill(trainable)


def numpy_merge(params: dict, scale: float) -> dict:
  """W + scale * A B in float64 by plain reshapes: A [*in, r], B [r, *out], W [*in, *out]."""
  out = {}
  for k, v in params.items():
    if lora.is_adapter(k):
      continue
    if isinstance(v, dict):
      out[k] = numpy_merge(v, scale)
    elif k + lora.A_SUFFIX in params:
      a = np.asarray(params[k + lora.A_SUFFIX], np.float64)
      b = np.asarray(params[k + lora.B_SUFFIX], np.float64)
      ab = a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
      out[k] = (np.asarray(v, np.float64) + scale * ab.reshape(v.shape)).astype(v.dtype)
    else:
      out[k] = v
  return out


@pytest.mark.slow  # over 5 s
@pytest.mark.parametrize('mlp', ['swiglu', 'gelu'])
def test_zero_adapters_reproduce_the_base_logits_bit_for_bit(mlp):
  cfg = dataclasses.replace(BASE, mlp=mlp)
  base = init(cfg, 0)
  targets = lora.kernels_of(cfg)  # every kernel this MLP has
  trainable, frozen = lora.split(init(adapted(cfg, targets=targets), 1))
  assert jax.tree.structure(frozen) == jax.tree.structure(base)
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)}
  assert len(names) == 2 * len(targets) * cfg.n_layers
  assert all(n.endswith(("_lora_a']", "_lora_b']")) for n in names)
  params = lora.combine(trainable, base)
  want = logits(cfg, base)
  np.testing.assert_array_equal(logits(adapted(cfg, targets=targets), params), want)
  # The cached path too: a prefill of 5 tokens, then one at a time, each bit for bit the
  # base model's own cached logits.
  for c, p in ((cfg, base), (adapted(cfg, targets=targets), params)):
    model, cache = Transformer(c), KVCache.empty(c, batch=2, length=9)
    pieces = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 8), (8, 9)):
      toks = TOKENS[:, lo:hi]
      out = model.apply({'params': p}, jnp.asarray(toks), segment_ids=jnp.ones_like(toks),
                        positions=jnp.asarray(np.broadcast_to(np.arange(lo, hi), toks.shape)),
                        cache=cache)
      pieces.append(np.asarray(out.logits))
      cache = out.cache
    if c is cfg:
      base_cached = np.concatenate(pieces, axis=1)
    else:
      np.testing.assert_array_equal(np.concatenate(pieces, axis=1), base_cached)


@pytest.mark.slow  # over 5 s
def test_the_adapted_forward_equals_a_numpy_merge():
  cfg = adapted(rank=3, alpha=6.0)
  base = init(BASE, 0)
  trainable = with_random_b(lora.split(init(cfg, 1))[0])
  params = lora.combine(trainable, base)
  merged = numpy_merge(params, 6.0 / 3)
  got = logits(cfg, params)
  want = logits(BASE, merged)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.abs(got - logits(BASE, base)).max() > 0.1  # the adapters do change the model
  # lora.merge (what runs.load and export use) is the same merge.
  ours = lora.merge(params, scale=2.0)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-6)
  # Cached decoding with live adapters equals the full forward.
  model, cache = Transformer(cfg), KVCache.empty(cfg, batch=2, length=9)
  out = model.apply({'params': params}, jnp.asarray(TOKENS[:, :6]),
                    segment_ids=jnp.ones((2, 6), jnp.int32),
                    positions=jnp.asarray(np.broadcast_to(np.arange(6), (2, 6))), cache=cache)
  pieces, cache = [np.asarray(out.logits)], out.cache
  for t in range(6, 9):
    out = model.apply({'params': params}, jnp.asarray(TOKENS[:, t:t + 1]),
                      segment_ids=jnp.ones((2, 1), jnp.int32),
                      positions=jnp.full((2, 1), t, jnp.int32), cache=cache)
    pieces.append(np.asarray(out.logits))
    cache = out.cache
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), got, atol=2e-5, rtol=2e-5)


def _lm_batch():
  from rlhf_jax.data.batch import LMBatch
  inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
  pos = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape).astype(np.int32)
  return LMBatch(inputs=jnp.asarray(inputs), targets=jnp.asarray(targets),
                 segment_ids=jnp.ones_like(inputs), positions=jnp.asarray(pos),
                 weights=jnp.ones(inputs.shape, jnp.float32))


@pytest.mark.slow  # over 5 s
def test_the_gradient_reaches_only_the_adapters():
  cfg = adapted(targets=('query', 'value', 'down'))
  base = jax.tree.map(jnp.asarray, init(BASE, 0))
  kept = jax.tree.map(np.array, base)  # host copies, to compare after the step
  trainable = lora.split(init(cfg, 1))[0]
  batch = _lm_batch()
  model = Transformer(cfg)
  grad = lambda t: jax.grad(lambda t: lm_step._xent(t, batch, model, base)[0])(t)
  # At init (B = 0) only B moves the loss; A's gradient is exactly 0 until B is not.
  g0 = grad(trainable)
  for path, g in jax.tree_util.tree_leaves_with_path(g0):
    name = jax.tree_util.keystr(path)
    assert (np.abs(np.asarray(g)).max() > 0) == name.endswith("_lora_b']"), name
  g = grad(with_random_b(trainable))
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(g)}
  base_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(base)}
  assert paths.isdisjoint(base_paths) and len(paths) == 2 * 3 * cfg.n_layers
  assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(g))
  # One jitted optimiser step, the state donated as the stages do: the adapters move, the
  # base (an argument the step neither differentiates nor returns) stays bitwise the same.
  config = load_config('sft')
  tx = runs.optimizer(config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.asarray, trainable),
                     opt_state=tx.init(trainable), rng=jax.random.key_data(jax.random.key(0)))
  step = jax.jit(functools.partial(lm_step.train_step, model=model, tx=tx,
                                   schedule=lambda s: 0.0, grad_accum=1), donate_argnums=(0,))
  before = jax.tree.map(np.array, state.params)
  for _ in range(3):
    state, metrics = step(state, batch, base)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(np.asarray(a), b)
  moved = [float(np.abs(np.asarray(a) - b).max())
           for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
  assert min(moved) > 0 and np.isfinite(float(metrics['train/loss']))
  assert jax.tree.structure(state.params) == jax.tree.structure(trainable)


@pytest.mark.slow
def test_optimiser_state_bytes_equal_a_hand_count():
  config = load_config('sft')
  tx = runs.optimizer(config)
  cfg = adapted(rank=4, targets=('query', 'value'))
  rng = jax.random.key_data(jax.random.key(0))
  got = lora_state.memory_metrics(tx, runs.lm_init(Transformer(cfg)), rng)
  d, r, hd = BASE.d_model, 4, BASE.head_dim
  per_layer = (d * r + r * BASE.n_heads * hd) + (d * r + r * BASE.kv_heads * hd)
  trainable = BASE.n_layers * per_layer
  # AdamW: mu and nu, float32, per trained parameter; plus two int32 step counts (Adam's,
  # the schedule's); global-norm clipping and the decay mask hold nothing.
  counts = 2 * 4
  assert got['lora/trainable_params'] == trainable == 448
  assert got['lora/frozen_params'] == BASE.num_params()
  assert got['lora/opt_state_bytes'] == 8 * trainable + counts == 3592
  assert got['lora/full_opt_state_bytes'] == 8 * BASE.num_params() + counts
  assert got['lora/opt_state_saved_bytes'] == 8 * (BASE.num_params() - trainable)
  # The state a LoRA stage builds really is that size.
  state_bytes = lora.count(tx.init(lora.split(init(cfg, 1))[0]))[1]
  assert state_bytes == got['lora/opt_state_bytes']
  # A reward-model ensemble of 3: each member's adapters, type embedding and head train.
  rm = reward_model.ensemble(cfg, 3)
  members = 3
  got = lora_state.memory_metrics(runs.optimizer(config), reward_model.init_params(rm), rng,
                                  lm_keys=('trunk',))
  rm_trainable = members * (trainable + 2 * d + d + 1)
  assert got['lora/trainable_params'] == rm_trainable
  assert got['lora/frozen_params'] == members * BASE.num_params()
  assert got['lora/opt_state_bytes'] == 8 * rm_trainable + counts


def _mesh():
  mesh_config = config_lib.mesh_block()
  return sharding.make_mesh(mesh_config, jax.devices()[:1]), mesh_config


def _lora_run(workdir, base_run, *, rank, alpha, targets, seed=5):
  """A LoRA SFT run directory as a stage leaves it: config.json pointing at base_run and a
  checkpoint (step 5) of adapters with random B. Returns (adapted cfg, trainable)."""
  base_config = runs.read_config(str(base_run))
  config = load_config('sft')
  config.model = ml_collections.ConfigDict(base_config.model.to_dict())
  config.lora.update(rank=rank, alpha=alpha, targets=','.join(targets))
  config.init.run = str(base_run)
  config.init.step = runs.checkpoint_step(str(base_run), step=None)
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config_lib.to_dict(config), f)
  cfg = lora.adapt(ModelConfig.from_config(config.model), config.lora)
  trainable = with_random_b(lora.split(init(cfg, seed))[0], std=0.2)
  tx = runs.optimizer(config)
  state = TrainState(step=jnp.int32(5), params=trainable, opt_state=tx.init(trainable),
                     rng=jax.random.key_data(jax.random.key(0)))
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=3)
  ckpt.save(5, state=state, data_state={'position': 0})
  ckpt.close()
  return cfg, trainable


@pytest.mark.slow  # over 5 s
def test_merged_export_reimports_to_the_adapted_logits(tmp_path, capsys):
  from rlhf_jax.convert import __main__ as convert_main
  from rlhf_jax.convert import hf_import
  hf = hf_reference.FAMILY_CONFIGS['llama']  # GQA: key/value adapters of 2 heads
  hf_reference.write_checkpoint(str(tmp_path / 'hf'), hf, hf_reference.random_tensors(hf, 0))
  hf_import.import_folder(str(tmp_path / 'hf'), str(tmp_path / 'base'))
  mesh, mesh_config = _mesh()
  base = runs.load(str(tmp_path / 'base'), mesh=mesh, mesh_config=mesh_config)
  run = str(tmp_path / 'sft')
  cfg, trainable = _lora_run(run, tmp_path / 'base', rank=2, alpha=4.0,
                             targets=('query', 'key', 'value', 'out', 'gate_up', 'down'))
  tokens = np.random.default_rng(1).integers(3, 40, size=(2, 10)).astype(np.int32)
  want = logits(cfg, lora.combine(trainable, jax.device_get(base.params)), tokens)
  assert np.abs(want - logits(base.model.cfg, base.params, tokens)).max() > 0.05
  loaded = runs.load(run, mesh=mesh, mesh_config=mesh_config)  # base + adapters, merged
  assert loaded.step == 5 and loaded.model.cfg == base.model.cfg
  np.testing.assert_allclose(logits(loaded.model.cfg, loaded.params, tokens), want, atol=1e-5)
  # Without --merge: refused in one line, nothing written.
  assert convert_main.main(['--to=hf', str(tmp_path / 'out'), f'--workdir={run}']) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and '--merge' in err[0]
  assert not os.path.exists(tmp_path / 'out')
  assert convert_main.main(['--to=hf', str(tmp_path / 'out'), f'--workdir={run}',
                            '--merge']) == 0
  hf_import.import_folder(str(tmp_path / 'out'), str(tmp_path / 'again'))
  again = runs.load(str(tmp_path / 'again'), mesh=mesh, mesh_config=mesh_config)
  np.testing.assert_allclose(logits(again.model.cfg, again.params, tokens), want, atol=1e-5)
  # --merge of a run without adapters is refused too.
  assert convert_main.main(['--to=hf', str(tmp_path / 'o2'),
                            f'--workdir={tmp_path / "base"}', '--merge']) == 2


@pytest.mark.parametrize('override, mentions', [
    ('--config.lora.rank=-1', ('lora.rank=-1',)),
    ('--config.lora.targets=query,qkv', ("'qkv'", 'lora.targets')),
    ('--config.lora.alpha=0.0', ('lora.alpha=0.0',)),
])
def test_bad_lora_settings_are_refused_in_one_line(run_cli, tmp_path, override, mentions):
  workdir = tmp_path / 'run'
  result = run_cli('--config=configs/sft.py:tiny', f'--workdir={workdir}',
                   '--config.lora.rank=4', override)
  assert_one_error_line(result, mentions=mentions)
  assert not workdir.exists()


def test_settings_checked_against_the_model():
  from rlhf_jax.stages import from_run
  config = load_config('sft')
  config.lora.update(rank=4, targets='query,up')  # 'up' is a plain MLP's; this one gates
  with pytest.raises(UserError, match="'up'.*gate_up"):
    from_run.resolve_lora(config)
  config.lora.targets = 'query,gate_up'
  config.init.run = 'runs/x'
  from_run.resolve_lora(config)
  assert config.init.run == os.path.abspath('runs/x')  # the pointer, from anywhere
  for stage, ok in (('sft', True), ('pretrain', False)):
    c = load_config('sft')
    c.stage = stage
    c.lora.rank = 2
    if ok:
      config_lib.validate_lora(c)
    else:
      with pytest.raises(UserError, match='does not train with adapters'):
        config_lib.validate_lora(c)


def test_a_run_written_before_the_lora_block_still_resumes(tmp_path):
  config = load_config('sft')
  old = config_lib.to_dict(config)
  del old['lora']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  config_lib.write_or_check(config, str(tmp_path), write=False)  # the defaults: the same run
  config.lora.rank = 4
  with pytest.raises(UserError, match='lora.rank'):
    config_lib.write_or_check(config, str(tmp_path), write=False)


def _cli(*args):
  result = subprocess.run([sys.executable, '-m', 'rlhf_jax.main', *args,
                           '--config.train.progress=False'], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith('perf/')}
            for line in f]


@pytest.mark.slow
def test_sft_with_lora_from_the_cli_checkpoints_adapters_and_resumes(tmp_path):
  small = ('--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.n_heads=2')
  _cli('--config=configs/pretrain.py:tiny', f'--workdir={tmp_path / "pre"}', *small,
       '--config.train.steps=20', '--config.train.eval_every=20', '--config.train.ckpt_every=20')
  sft = ('--config=configs/sft.py:tiny', f'--config.init.run={tmp_path / "pre"}',
         '--config.train.steps=6', '--config.sft.num_prompts=64',
         '--config.sft.samples_per_prompt=2', '--config.sft.max_new_tokens=16',
         '--config.policy_eval.num_prompts=16', '--config.policy_eval.max_new_tokens=16',
         '--config.train.batch_size=8', '--config.train.eval_every=3',
         '--config.train.ckpt_every=3', '--config.train.keep_ckpts=5', '--config.lora.rank=4',
         '--config.lora.alpha=8.0')
  straight = tmp_path / 'sft'
  _cli(*sft, f'--workdir={straight}')
  config = json.load(open(straight / 'config.json'))
  assert config['init'] == {'run': str(tmp_path / 'pre'), 'step': 20}
  state = read_state(straight / 'checkpoints' / '6')
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      state['params'])]
  # Adapters only: query and value of 2 layers, A and B each; no base weight.
  assert len(names) == 8 and all(n.endswith(("_lora_a']", "_lora_b']")) for n in names)
  first = _metrics(straight)[0]
  base = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
  trainable = 2 * 2 * (32 * 4 + 4 * 32)
  assert first['lora/trainable_params'] == trainable
  assert first['lora/opt_state_bytes'] == 8 * trainable + 8
  assert first['lora/full_opt_state_bytes'] == 8 * base.num_params() + 8
  assert abs(first['policy/kl_ref']) < 1e-5  # B = 0: the policy is its reference
  # Killed after checkpoint 3: the rerun of the same command ends where the other did.
  resumed = tmp_path / 'resumed'
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')
  _cli(*sft, f'--workdir={resumed}')
  assert _metrics(resumed) == _metrics(straight)
  again = read_state(resumed / 'checkpoints' / '6')
  for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(again),
                            jax.tree_util.tree_leaves_with_path(state)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(p))
