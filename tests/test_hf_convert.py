"""Hugging Face checkpoints in and out (rlhf_jax/convert): for GPT-2, Llama (GQA, Llama 3
rope scaling), Qwen2 (qkv biases, tied), Qwen3 (qk-norm, decoupled head_dim) and Gemma
(MQA, offset norms, embedding scale, GeGLU, soft-capping), a tiny random checkpoint in
Hugging Face's layout is imported and its logits compared with an independent float64
NumPy forward of the family (tests/hf_reference.py) within 1e-4; cached decoding equals
full recomputation; export then re-import is bit-for-bit, and the exported tensors are
the original ones; bad folders are refused in one line, before any weight is read."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference
from conftest import REPO, cli_env
from rlhf_jax import config as config_lib
from rlhf_jax import sharding
from rlhf_jax.convert import hf_export, hf_import
from rlhf_jax.data import hf_tokenizer
from rlhf_jax.models.transformer import KVCache
from rlhf_jax.train import runs
from test_cli_errors import assert_one_error_line

FAMILIES = tuple(hf_reference.FAMILY_CONFIGS)


def convert(*args):
  return subprocess.run([sys.executable, '-m', 'rlhf_jax.convert', *args], cwd=REPO,
                        env=cli_env(), capture_output=True, text=True, timeout=300)


def _load(workdir):
  mesh_config = config_lib.mesh_block()
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:1])
  return runs.load(str(workdir), mesh=mesh, mesh_config=mesh_config)


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """family -> (hf config, tensors, folder, run dir, loaded run)."""
  out = {}
  for i, family in enumerate(FAMILIES):
    root = tmp_path_factory.mktemp(family)
    hf = hf_reference.FAMILY_CONFIGS[family]
    tensors = hf_reference.random_tensors(hf, seed=i)
    hf_reference.write_checkpoint(str(root / 'hf'), hf, tensors, shards=2 if i % 2 else 1)
    hf_import.import_folder(str(root / 'hf'), str(root / 'run'))
    out[family] = (hf, tensors, root / 'hf', root / 'run', _load(root / 'run'))
  return out


def _our_logits(loaded, ours):
  pos = np.broadcast_to(np.arange(ours.shape[1]), ours.shape)
  out = loaded.model.apply({'params': loaded.params}, jnp.asarray(ours),
                           segment_ids=jnp.ones_like(ours), positions=jnp.asarray(pos))
  return np.asarray(out.logits, np.float64)


@pytest.mark.parametrize('family', FAMILIES)
def test_logits_equal_the_float64_reference(imported, family):
  hf, tensors, _, run, loaded = imported[family]
  specials = json.load(open(run / 'config.json'))['hf']['specials']
  perm = hf_tokenizer.permutation(hf['vocab_size'], specials)
  ids = np.random.default_rng(7).integers(0, hf['vocab_size'], size=(2, 12))  # theirs
  ours = np.argsort(perm)[ids]
  want = hf_reference.forward(hf, tensors, ids)  # [B, T, V] over their ids
  got = _our_logits(loaded, ours)[..., np.argsort(perm)]  # reordered to their ids
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert np.abs(want).max() > 0.5  # the comparison is not between two near-zero tensors


def test_soft_capping_equals_the_reference(imported):
  """Gemma 2's soft-capping of scores and logits (no importer sets it: Gemma 1 has none),
  on the imported Gemma's weights, against the reference with the caps set."""
  import dataclasses
  from rlhf_jax.models.transformer import Transformer
  hf, tensors, _, run, loaded = imported['gemma']
  capped = dict(hf, attn_logit_softcapping=2.0, final_logit_softcapping=1.5)
  model = Transformer(dataclasses.replace(loaded.model.cfg, attn_softcap=2.0,
                                          logit_softcap=1.5))
  specials = json.load(open(run / 'config.json'))['hf']['specials']
  perm = hf_tokenizer.permutation(hf['vocab_size'], specials)
  ids = np.random.default_rng(8).integers(0, hf['vocab_size'], size=(2, 12))
  want = hf_reference.forward(capped, tensors, ids)
  got = _our_logits(dataclasses.replace(loaded, model=model), np.argsort(perm)[ids])
  np.testing.assert_allclose(got[..., np.argsort(perm)], want, atol=1e-4, rtol=1e-4)
  assert np.abs(want).max() <= 1.5 and np.abs(hf_reference.forward(hf, tensors, ids)).max() > 2


def test_specials_sit_at_our_ids(imported):
  # Llama: BOS 5, EOS 7 -> ours 1, 2; GPT-2: one special (39) for both -> EOS 2, BOS = EOS;
  # Gemma: pad 0, eos 1, bos 2 -> ours 0, 2, 1 (a cycle of three).
  expect = {'llama': {1: 5, 2: 7}, 'gpt2': {2: 39}, 'gemma': {0: 0, 1: 2, 2: 1},
            'qwen2': {0: 11, 2: 9}}
  for family, places in expect.items():
    specials = json.load(open(imported[family][3] / 'config.json'))['hf']['specials']
    perm = hf_tokenizer.permutation(40, specials)
    assert sorted(perm.tolist()) == list(range(40))
    assert {k: int(perm[k]) for k in places} == places, family
  tok = hf_tokenizer.load_for_run(str(imported['gpt2'][3]))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 2, 2)
  ids = tok.encode('w39 w2 w5')  # their 39 is our EOS 2; their 2 sits where 39 was
  assert ids == [2, 39, 5] and tok.decode([39, 5]) == 'w2 w5'


@pytest.mark.slow  # over 5 s
@pytest.mark.parametrize('family', FAMILIES)
def test_cached_decoding_equals_full_recomputation(imported, family):
  _, _, _, _, loaded = imported[family]
  model, params = loaded.model, loaded.params
  tokens = np.random.default_rng(3).integers(4, 40, size=(2, 10))
  full = _our_logits(loaded, tokens)
  cache = KVCache.empty(model.cfg, batch=2, length=10)
  step = lambda toks, start, cache: model.apply(
      {'params': params}, jnp.asarray(toks), segment_ids=jnp.ones_like(toks),
      positions=jnp.asarray(np.broadcast_to(np.arange(start, start + toks.shape[1]),
                                            toks.shape)), cache=cache)
  out = step(tokens[:, :6], 0, cache)  # prefill 6, then one token at a time
  pieces = [np.asarray(out.logits)]
  cache = out.cache
  for t in range(6, 10):
    out = step(tokens[:, t:t + 1], t, cache)
    pieces.append(np.asarray(out.logits))
    cache = out.cache
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('family', [f if f == 'llama' else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_the_sampler_decodes_every_family_as_full_recomputation(imported, family):
  from rlhf_jax import sampling
  _, _, _, _, loaded = imported[family]
  prompts, lengths = sampling.left_pad([[5, 9, 12], [7, 8, 9, 10, 11, 13]], pad_id=0)
  lengths = jnp.asarray(lengths)
  config = sampling.SampleConfig(max_new_tokens=6, temperature=0.7)
  key = jax.random.key(4)
  cached = sampling.sample(loaded.params, jnp.asarray(prompts), lengths, key,
                           model=loaded.model, config=config)
  full = sampling.sample_without_cache(loaded.params, jnp.asarray(prompts), lengths, key,
                                       model=loaded.model, config=config)
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(full.tokens))
  np.testing.assert_allclose(np.asarray(cached.raw_logprobs), np.asarray(full.raw_logprobs),
                             atol=1e-5)
  assert float(np.asarray(cached.mask).sum()) >= 2


@pytest.mark.parametrize('family', FAMILIES)
def test_export_then_import_is_bit_for_bit(imported, family, tmp_path):
  from safetensors.numpy import load_file
  hf, tensors, _, run, loaded = imported[family]
  hf_export.export_run(str(run), str(tmp_path / 'out'), max_shard_bytes=4096)
  files = sorted(os.listdir(tmp_path / 'out'))
  assert 'model.safetensors.index.json' in files and 'tokenizer.json' in files
  written = {}
  for name in files:
    if name.endswith('.safetensors'):
      written.update(load_file(str(tmp_path / 'out' / name)))
  prefix = 'transformer.' if family == 'gpt2' else ''
  assert set(written) == {prefix + k for k in tensors}
  for k, v in tensors.items():
    np.testing.assert_array_equal(written[prefix + k], v)
  back = json.load(open(tmp_path / 'out' / 'config.json'))
  assert hf_reference.forward(back, tensors, np.arange(8)[None] % 40).shape == (1, 8, 40)
  hf_import.import_folder(str(tmp_path / 'out'), str(tmp_path / 'again'))
  again = _load(tmp_path / 'again')
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('family', FAMILIES)
def test_transformers_loads_the_export_with_equal_logits(imported, family, tmp_path):
  """Only where torch and transformers happen to be installed (never a dependency)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  hf, _, _, run, loaded = imported[family]
  hf_export.export_run(str(run), str(tmp_path / 'out'))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / 'out'), torch_dtype=torch.float32).eval()
  specials = json.load(open(run / 'config.json'))['hf']['specials']
  perm = hf_tokenizer.permutation(hf['vocab_size'], specials)
  ids = np.random.default_rng(2).integers(0, hf['vocab_size'], size=(2, 10))
  with torch.no_grad():
    want = model(torch.as_tensor(ids)).logits.double().numpy()
  got = _our_logits(loaded, np.argsort(perm)[ids])[..., np.argsort(perm)]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('family', ('llama', 'gpt2', 'qwen2'))
def test_blocks_over_heads_and_vocab_give_the_same_params(imported, family, tmp_path):
  """An import onto fsdp=4 x tensor=2 reads each shard's block alone: half the heads of a
  q/k/v kernel (GPT-2: of one third of the fused qkv), half the vocabulary's rows through
  the permutation; the params equal those of the default import (embed over 8 devices)."""
  _, _, folder, _, loaded = imported[family]
  mesh = hf_import.import_mesh_block()
  mesh.update(data=1, fsdp=4, tensor=2)
  out = hf_import.import_folder(str(folder), str(tmp_path / 'run'), mesh_config=mesh)
  assert out['bytes_read'] == [out['bytes_in_files']]  # one process: every byte, once
  again = _load(tmp_path / 'run')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded.params),
                          jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_a_mesh_that_cuts_a_parameter_unevenly_is_refused_before_reading(imported, tmp_path):
  from rlhf_jax.errors import UserError
  mesh = hf_import.import_mesh_block()
  mesh.update(data=1, fsdp=1, tensor=8)  # 4 query heads (2 kv heads) over 8 devices
  with pytest.raises(UserError, match=r'does not divide layer_0/attn/\w+ of shape'):
    hf_import.import_folder(str(imported['llama'][2]), str(tmp_path / 'run'), mesh_config=mesh)
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow  # two imports in subprocesses, ~20 s
def test_two_processes_import_what_one_does_reading_half(tmp_path):
  """2 processes x 4 CPU devices import the sharded Llama checkpoint to the same params,
  bit for bit, as 1 process x 8 devices; each process reads half of every tensor whose
  embed axis fsdp shards (all but the norms, which are replicated) and the whole of the
  rest, by a hand count of the tensors' bytes."""
  from conftest import read_state
  from test_multihost import free_port
  hf = hf_reference.FAMILY_CONFIGS['llama']
  tensors = hf_reference.random_tensors(hf, seed=3)
  hf_reference.write_checkpoint(str(tmp_path / 'hf'), hf, tensors, shards=2)
  port = free_port()
  args = lambda run: [sys.executable, '-m', 'rlhf_jax.convert', '--from=hf',
                      str(tmp_path / 'hf'), f'--workdir={tmp_path / run}']
  procs = [subprocess.Popen(args('one'), cwd=REPO, env=cli_env(8), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)]
  procs += [subprocess.Popen(
      args('two') + [f'--coordinator=localhost:{port}', '--num_processes=2',
                     f'--process_id={i}'], cwd=REPO, env=cli_env(4), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert 'imported llama' in outs[1][0] and 'imported' not in outs[2][0]  # process 0 prints
  one, two = read_state(tmp_path / 'one/checkpoints/0'), read_state(tmp_path / 'two/checkpoints/0')
  a, b = jax.tree_util.tree_leaves_with_path(one), jax.tree_util.tree_leaves_with_path(two)
  assert [p for p, _ in a] == [p for p, _ in b] and len(a) > 20
  for (path, x), (_, y) in zip(a, b):
    assert x.dtype == y.dtype, path
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  assert (tmp_path / 'one/config.json').read_text() == (tmp_path / 'two/config.json').read_text()
  assert sorted(os.listdir(tmp_path / 'two')) == ['checkpoints', 'config.json', 'import.json',
                                                  'tokenizer']
  total = sum(v.nbytes for v in tensors.values())
  half = sum(v.nbytes // 2 if v.ndim == 2 else v.nbytes for v in tensors.values())
  figures = {run: json.load(open(tmp_path / run / 'import.json')) for run in ('one', 'two')}
  assert figures['one']['bytes_read'] == [total] == [figures['one']['bytes_in_files']]
  assert figures['two']['bytes_read'] == [half, half] and half < 0.52 * total
  assert figures['two']['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}


@pytest.mark.slow  # over 5 s
def test_the_cli_imports_and_exports(imported, tmp_path):
  _, _, folder, _, _ = imported['llama']
  result = convert('--from=hf', str(folder), f'--workdir={tmp_path / "run"}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'imported llama' in result.stdout
  result = convert('--to=hf', str(tmp_path / 'out'), f'--workdir={tmp_path / "run"}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.load(open(tmp_path / 'out' / 'config.json'))['num_key_value_heads'] == 2
  # A second export onto the same folder refuses and keeps what is there.
  before = sorted(os.listdir(tmp_path / 'out'))
  again = convert('--to=hf', str(tmp_path / 'out'), f'--workdir={tmp_path / "run"}')
  assert_one_error_line(again, mentions=('not an empty folder',))
  assert sorted(os.listdir(tmp_path / 'out')) == before


def _folder(tmp_path, **changes):
  hf = dict(hf_reference.FAMILY_CONFIGS['llama'], **changes)
  folder = tmp_path / 'hf'
  hf_reference.write_checkpoint(str(folder), hf, hf_reference.random_tensors(
      hf_reference.FAMILY_CONFIGS['llama'], seed=0))
  return folder


@pytest.mark.parametrize('change, mentions', [
    ({'model_type': 'bert', 'architectures': ['BertForMaskedLM']}, ('BertForMaskedLM',)),
    ({'hidden_act': 'relu'}, ('hidden_act', 'relu')),
    pytest.param({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}},
                 ('rope_scaling', 'yarn'), marks=pytest.mark.slow),
    ({'num_hidden_layers': 3}, ('lacks', 'model.layers.2')),
    pytest.param({'intermediate_size': 32}, ('shape',), marks=pytest.mark.slow),
])
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, change, mentions):
  folder = _folder(tmp_path, **change)
  if change.get('model_type') or 'hidden_act' in change or 'rope_scaling' in change:
    # Refused from config.json alone: weights that cannot be read change nothing.
    (folder / 'model.safetensors').write_bytes(b'not a safetensors file')
  result = convert('--from=hf', str(folder), f'--workdir={tmp_path / "run"}')
  assert_one_error_line(result, mentions=mentions)
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_pickled_weights_are_never_read(tmp_path):
  folder = _folder(tmp_path)
  os.remove(folder / 'model.safetensors')
  (folder / 'pytorch_model.bin').write_bytes(b'\x80\x04 any pickle')
  result = convert('--from=hf', str(folder), f'--workdir={tmp_path / "run"}')
  assert_one_error_line(result, mentions=('pytorch_model.bin', 'arbitrary code'))


def test_a_workdir_with_the_users_files_is_refused(tmp_path):
  folder = _folder(tmp_path)
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'notes.txt').write_text('mine')
  result = convert('--from=hf', str(folder), f'--workdir={tmp_path / "run"}')
  assert_one_error_line(result, mentions=('not empty',))
  assert (tmp_path / 'run' / 'notes.txt').read_text() == 'mine'


def _jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'rlhf_jax.main', *args], cwd=REPO,
                        env=cli_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # an end-to-end run of three stages
def test_import_sft_dpo_on_jsonl_then_export(imported, tmp_path):
  """The recipe of the README on a tiny Llama: import -> SFT on a JSONL -> DPO with LoRA on
  a preference JSONL -> merged export; the exported folder's logits under the float64
  reference equal the DPO run's own (base + adapters), and training moved the weights."""
  hf, tensors, folder, _, _ = imported['llama']
  run = tmp_path / 'import'
  assert convert('--from=hf', str(folder), f'--workdir={run}').returncode == 0
  rng = np.random.default_rng(0)
  words = lambda n: ' '.join(f'w{i}' for i in rng.integers(10, 40, size=n))
  sft_rows = [{'prompt': words(3), 'completion': words(4)} for _ in range(12)]
  pairs = [{'prompt': words(3), 'chosen': words(2), 'rejected': words(3)} for _ in range(12)]
  steps = ('--config.train.steps=3', '--config.train.batch_size=4',
           '--config.train.log_every=1', '--config.train.progress=False')
  sft = tmp_path / 'sft'
  result = _main('--config=configs/sft.py:tiny', f'--workdir={sft}', f'--config.init.run={run}',
                 f'--config.sft.data=jsonl:{_jsonl(tmp_path / "sft.jsonl", sft_rows)}',
                 '--config.sft.prompt_len=8', '--config.sft.max_new_tokens=8', *steps)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'sft: 12 rows of 12' in result.stdout
  dpo = tmp_path / 'dpo'
  result = _main('--config=configs/dpo.py:tiny', f'--workdir={dpo}', f'--config.init.run={sft}',
                 f'--config.prefs.data=jsonl:{_jsonl(tmp_path / "pairs.jsonl", pairs)}',
                 '--config.prefs.prompt_len=8', '--config.prefs.max_new_tokens=8',
                 '--config.lora.rank=4', '--config.lora.targets=query,value,gate_up,down',
                 '--config.optim.lr=3e-2', *steps)
  assert result.returncode == 0, result.stderr[-3000:]
  first = json.loads(open(dpo / 'metrics.jsonl').readline())
  # AdamW: two moments of 4 bytes per trained parameter (+ two step counters).
  assert first['lora/opt_state_bytes'] == 8 * first['lora/trainable_params'] + 8
  d, f, r, layers = 16, 24, 4, 2  # adapters A [in, r], B [r, out] per targeted kernel
  per_layer = sum(r * (i + o) for i, o in ((d, 4 * 4), (d, 2 * 4), (d, 2 * f), (f, d)))
  assert first['lora/trainable_params'] == layers * per_layer
  assert first['lora/full_opt_state_bytes'] == 8 * sum(v.size for v in tensors.values()) + 8
  out = tmp_path / 'out'
  assert convert('--to=hf', str(out), f'--workdir={dpo}').returncode == 2  # needs --merge
  result = convert('--to=hf', str(out), f'--workdir={dpo}', '--merge')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'as llama' in result.stdout and (out / 'tokenizer.json').exists()
  from safetensors.numpy import load_file
  trained = load_file(str(out / 'model.safetensors'))
  assert set(trained) == set(tensors)
  assert max(np.abs(trained[k] - tensors[k]).max() for k in tensors) > 1e-4
  ids = np.random.default_rng(1).integers(0, 40, size=(2, 9))
  want = hf_reference.forward(json.load(open(out / 'config.json')), trained, ids)
  perm = hf_tokenizer.permutation(40, json.load(open(run / 'config.json'))['hf']['specials'])
  got = _our_logits(_load(dpo), np.argsort(perm)[ids])[..., np.argsort(perm)]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_what_an_export_can_say():
  """Our default model is Llama's math and exports as Llama; a feature the family cannot
  express is refused rather than dropped."""
  from rlhf_jax.convert import families
  from rlhf_jax.errors import UserError
  m = config_lib.model_block()
  m.vocab_size = 40
  assert families.export_family(m) == 'llama'
  families.check_expressible('llama', m, families.hf_config('llama', m, torch_dtype='float32',
                                                            specials={'eos': 2}))
  m.tie_embeddings = True  # tied and scaled by d_model^-0.5: no family does that
  with pytest.raises(UserError, match='matches no Hugging Face family'):
    families.export_family(m)
  g = config_lib.model_block()
  g.update(vocab_size=40, mlp='geglu', norm_offset=1.0, embed_scale=True,
           tie_embeddings=True, tied_scale=False, logit_softcap=3.0)
  with pytest.raises(UserError, match='logit_softcap'):
    families.check_expressible('gemma', g, families.hf_config(
        'gemma', g, torch_dtype='float32', specials={'eos': 1}))
