"""The sampler against independent computations: its raw log-probs equal teacher-forced
scoring, cached greedy decoding equals full recomputation, sampled frequencies match the
true language and the exact filtered distributions (chi-square), and sharded sampling
equals single-device sampling."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax import sampling, sharding
from rlhf_jax.stages import pretrain
from rlhf_jax.train.state import abstract_sharded, make_optimizer
from rlhf_jax.world import language

from conftest import load_config

def tiny_config(mesh=(1, 1, 1)):
  config = load_config('pretrain', 'tiny')
  config.train.update(progress=False, eval_batches=1)
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return config


@pytest.fixture(scope='module')
def trained(chain, tmp_path_factory):
  """The tiny world model after its 300 steps (true KL about 0.04 nats/token): the
  session's pretraining run (configs/pretrain.py:tiny as is, one device), restored onto
  all 8 devices from a copy of its checkpoints (the session's run stays untouched)."""
  import shutil
  workdir = str(tmp_path_factory.mktemp('tiny'))
  shutil.copytree(os.path.join(chain['pretrain'], 'checkpoints'),
                  os.path.join(workdir, 'checkpoints'))
  setup = pretrain.Setup(tiny_config(mesh=(-1, 1, 1)), workdir=workdir)
  from rlhf_jax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=3)
  assert ckpt.latest_step() == 300
  state, _ = ckpt.restore(ckpt.latest_step(), state_shardings=setup.state_shardings,
                          like_state=setup.state)
  ckpt.close()
  return setup, jax.device_get(state.params)


def make_sampler(setup, sample_config, mesh_shape=(1, 1, 1)):
  config = tiny_config(mesh_shape)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(config.mesh, devices)
  dummy = np.ones((1, 8), np.int32)
  init = lambda rng: setup.model.init(rng, dummy, segment_ids=dummy, positions=dummy)['params']
  _, shardings = abstract_sharded(init_params=init, tx=make_optimizer(config.optim, 10),
                                  rng=jax.random.key_data(jax.random.key(0)), mesh=mesh,
                                  mesh_config=config.mesh)
  return sampling.Sampler(model=setup.model, config=sample_config, mesh=mesh,
                          mesh_config=config.mesh, param_shardings=shardings.params)


def world_prompts(lang, rows, seed=0):
  """True-language prefixes of 1 to 7 tokens (BOS and up to 6 content tokens)."""
  seqs = np.asarray(language.sample(lang, key=jax.random.key(seed), batch_size=rows,
                                    seq_len=16))
  rng = np.random.default_rng(seed)
  prompts = []
  for row in seqs:
    content = [int(t) for t in row[1:] if t > 2]
    prompts.append([1] + content[:rng.integers(0, min(6, len(content)) + 1)])
  return sampling.left_pad(prompts)


@pytest.mark.parametrize('bucket', [32, 7])
def test_raw_logprobs_equal_scoring(trained, bucket):
  """Also with length buckets of 7 steps: 40 new tokens cross 5 bucket edges (the last
  bucket partial), each step reading only the cache chunks filled so far."""
  setup, params = trained
  sampler = make_sampler(setup, sampling.SampleConfig(max_new_tokens=40, temperature=0.9,
                                                      top_k=20, cache_bucket=bucket))
  prompts, lengths = world_prompts(setup.source.world, 16)
  assert len(set(lengths.tolist())) > 2  # prompts of several lengths share the batch
  out = jax.device_get(sampler.sample(params, prompts, lengths, jax.random.key(3)))
  assert (out.lengths < 40).sum() >= 4  # rows that stopped early at EOS
  for row in range(16):
    n = int(out.lengths[row])
    assert out.mask[row, :n].all() and not out.mask[row, n:].any()
    assert (out.response[row, n:] == 0).all()
    if n < 40:
      assert out.response[row, n - 1] == language.EOS_ID
  scored = np.asarray(sampler.score(params, prompts, lengths, out.response)) * out.mask
  np.testing.assert_allclose(out.raw_logprobs, scored, atol=1e-5, rtol=0)
  # The sampling log-probs are those of the filtered distribution (T = 0.9, top 20),
  # recomputed here in float64 from the scored logits.
  tokens = np.asarray(out.tokens)
  segments, positions = sampling.sequence_layout(jnp.asarray(lengths), prompts.shape[1],
                                              tokens.shape[1])
  logits = np.asarray(jax.jit(setup.model.apply)(  # op by op on CPU this took seconds
      {'params': params}, jnp.asarray(tokens[:, :-1]), segment_ids=segments[:, :-1],
      positions=positions[:, :-1]).logits, np.float64)
  logits = logits[:, prompts.shape[1] - 1:] / 0.9
  kth = np.sort(logits, axis=-1)[..., -20][..., None]
  logits = np.where(logits < kth, -np.inf, logits)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.take_along_axis(logits, out.response[..., None], -1)[..., 0] - logz
  np.testing.assert_allclose(out.logprobs, np.where(out.mask > 0, want, 0.0), atol=1e-5)


@pytest.mark.parametrize('bucket', [0, 7])
def test_greedy_with_cache_equals_full_recomputation(trained, bucket):
  """One bucket (every step reads every slot), and buckets of 7 steps that the 30 new
  tokens cross 4 times, after prompts of 1 to 7 tokens."""
  setup, params = trained
  sampler = make_sampler(setup, sampling.SampleConfig(max_new_tokens=30, greedy=True,
                                                      cache_bucket=bucket))
  prompts, lengths = world_prompts(setup.source.world, 16, seed=1)
  cached = jax.device_get(sampler.sample(params, prompts, lengths, jax.random.key(0)))
  full = jax.device_get(sampler.sample(params, prompts, lengths, jax.random.key(0),
                                       cache=False))
  np.testing.assert_array_equal(cached.response, full.response)
  np.testing.assert_array_equal(cached.lengths, full.lengths)
  np.testing.assert_allclose(cached.raw_logprobs, full.raw_logprobs, atol=1e-5)
  assert (cached.logprobs == 0).all()  # greedy: a point mass


def next_token_counts(setup, params, sample_config, prompt, rows, seed):
  sampler = make_sampler(setup, sample_config)
  prompts, lengths = sampling.left_pad([prompt] * rows)
  out = jax.device_get(sampler.sample(params, prompts, lengths, jax.random.key(seed)))
  return np.bincount(out.response[:, 0], minlength=setup.model.cfg.vocab_size)


def model_logits(setup, params, prompt) -> np.ndarray:
  tokens = jnp.asarray([prompt], jnp.int32)
  out = setup.model.apply({'params': params}, tokens, segment_ids=jnp.ones_like(tokens),
                          positions=jnp.arange(len(prompt))[None])
  return np.asarray(out.logits[0, -1], np.float64)


def chi_square_p(counts, probs) -> float:
  """p-value of the counts under `probs` (over the tokens where probs > 0; all counts
  must fall there)."""
  support = probs > 0
  assert counts[~support].sum() == 0, np.nonzero(counts * ~support)
  expected = probs[support] / probs[support].sum() * counts.sum()
  return stats.chisquare(counts[support], expected).pvalue


def softmax(x):
  e = np.exp(x - x[np.isfinite(x)].max())
  return e / e.sum()


def markov_params(params, lang):
  """The tiny Transformer set to compute the true language exactly: with every block's
  output projection at zero the residual stream is the embedding, which is sqrt(d) times
  a one-hot (d_model = vocab size = 64), so after the final RMSNorm (scale 1) the logits
  are one row of the output matrix, set to the true log-probabilities (-30 for impossible tokens).
  Its true KL is 0 up to float32 rounding and e^-30, which training only approaches."""
  v = lang.vocab_size
  d = params['embed']['embedding'].shape[1]
  assert d == v
  table = np.full((v, v), -30.0)
  probs = np.asarray(language.next_token_probs(lang, prev=jnp.arange(v)), np.float64)
  table[probs > 0] = np.log(probs[probs > 0])
  out = jax.tree.map(np.array, params)
  out['embed']['embedding'] = np.sqrt(d) * np.eye(v, dtype=np.float32)
  out['logits']['kernel'] = (table / np.sqrt(d)).astype(np.float32)
  out['final_norm']['scale'][...] = 1.0
  for name, layer in out.items():
    if name.startswith('layer_'):
      layer['attn']['out'][...] = 0.0
      layer['mlp']['down'][...] = 0.0
  return out


@pytest.mark.parametrize('prev', [language.BOS_ID, 3, 9])
def test_frequencies_match_the_true_language(trained, prev):
  setup, params = trained
  lang = setup.source.world
  exact = markov_params(params, lang)
  truth = np.asarray(language.next_token_probs(lang, prev=jnp.int32(prev)), np.float64)
  prompt = [language.BOS_ID] if prev == language.BOS_ID else [language.BOS_ID, prev]
  np.testing.assert_allclose(softmax(model_logits(setup, exact, prompt)), truth, atol=1e-5)
  counts = next_token_counts(setup, exact, sampling.SampleConfig(max_new_tokens=1), prompt,
                             8192, seed=5)
  assert chi_square_p(counts, truth) > 1e-3
  # Two steps: the sampled pairs match p(a | prev) p(b | a) on the pairs seen.
  sampler = make_sampler(setup, sampling.SampleConfig(max_new_tokens=2))
  prompts, lengths = sampling.left_pad([prompt] * 4096)
  out = jax.device_get(sampler.sample(exact, prompts, lengths, jax.random.key(9)))
  pairs = out.response[:, 0] * lang.vocab_size + out.response[:, 1]
  pair_truth = np.zeros(lang.vocab_size ** 2)
  for a in np.nonzero(truth)[0]:
    nxt = np.asarray(language.next_token_probs(lang, prev=jnp.int32(a)), np.float64)
    pair_truth[a * lang.vocab_size:(a + 1) * lang.vocab_size] = truth[a] * nxt
  counts = np.bincount(pairs, minlength=lang.vocab_size ** 2)
  big = pair_truth * 4096 >= 5
  assert chi_square_p(np.append(counts[big], counts[~big].sum()),
                      np.append(pair_truth[big], pair_truth[~big].sum())) > 1e-3


@pytest.mark.parametrize('temperature', [0.5, 1.0, 1.7])
def test_temperature_matches_softmax_of_scaled_logits(trained, temperature):
  setup, params = trained
  prompt = [language.BOS_ID, 5]
  counts = next_token_counts(setup, params, sampling.SampleConfig(
      max_new_tokens=1, temperature=temperature), prompt, 8192, seed=6)
  probs = softmax(model_logits(setup, params, prompt) / temperature)
  # Tokens whose expected count is tiny are pooled, as chi-square asks.
  big = probs * counts.sum() >= 5
  pooled_counts = np.append(counts[big], counts[~big].sum())
  pooled_probs = np.append(probs[big], probs[~big].sum())
  assert chi_square_p(pooled_counts, pooled_probs) > 1e-3


def test_top_k_and_top_p_keep_to_their_sets(trained):
  setup, params = trained
  prompt = [language.BOS_ID, 7]
  logits = model_logits(setup, params, prompt)
  order = np.argsort(-logits)
  # top-k: only the k best, in the renormalised proportions.
  counts = next_token_counts(setup, params, sampling.SampleConfig(
      max_new_tokens=1, temperature=2.0, top_k=3), prompt, 8192, seed=7)
  probs = np.zeros_like(logits)
  probs[order[:3]] = softmax(logits[order[:3]] / 2.0)
  assert set(np.nonzero(counts)[0]) <= set(order[:3].tolist())
  assert chi_square_p(counts, probs) > 1e-3
  # top-p: the smallest most-likely set whose mass reaches p.
  p = softmax(logits / 2.0)[order]
  size = int(np.searchsorted(np.cumsum(p), 0.6) + 1)
  assert 1 < size < len(order)
  counts = next_token_counts(setup, params, sampling.SampleConfig(
      max_new_tokens=1, temperature=2.0, top_p=0.6), prompt, 8192, seed=8)
  nucleus = order[:size]
  probs = np.zeros_like(logits)
  probs[nucleus] = softmax(logits[nucleus] / 2.0)
  assert set(np.nonzero(counts)[0]) <= set(nucleus.tolist())
  assert chi_square_p(counts, probs) > 1e-3


@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 2, 2)])
def test_sharded_sampling_equals_single_device(trained, mesh):
  setup, params = trained
  sample_config = sampling.SampleConfig(max_new_tokens=24, temperature=1.0, top_p=0.95)
  prompts, lengths = world_prompts(setup.source.world, 16, seed=2)
  single = jax.device_get(make_sampler(setup, sample_config).sample(
      params, prompts, lengths, jax.random.key(11)))
  sampler = make_sampler(setup, sample_config, mesh)
  # Host params: the jitted sampler lays them out as the train state shards them.
  out = sampler.sample(params, prompts, lengths, jax.random.key(11))
  assert out.response.sharding.spec[0] == ('data', 'fsdp')
  out = jax.device_get(out)
  np.testing.assert_array_equal(out.response, single.response)
  np.testing.assert_allclose(out.raw_logprobs, single.raw_logprobs, atol=1e-5)
  np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)


def test_samplers_of_one_model_share_their_compiled_programs(trained):
  """A second Sampler of the same model, SampleConfig and layout (each evaluator of a stage,
  each round of a loop) runs the first one's compiled programs: no new trace, the same
  tokens for the same key; another SampleConfig gets programs of its own."""
  setup, params = trained
  config = sampling.SampleConfig(max_new_tokens=8)
  first, second = make_sampler(setup, config), make_sampler(setup, config)
  other = make_sampler(setup, sampling.SampleConfig(max_new_tokens=8, temperature=0.5))
  assert second._sample is first._sample and second._score is first._score
  assert other._sample is not first._sample and other._score is first._score
  prompts, lengths = world_prompts(setup.source.world, 4, seed=3)
  a = jax.device_get(first.sample(params, prompts, lengths, jax.random.key(5)))
  compiled = first._sample._cache_size()
  b = jax.device_get(second.sample(params, prompts, lengths, jax.random.key(5)))
  assert first._sample._cache_size() == compiled
  np.testing.assert_array_equal(a.response, b.response)


@pytest.mark.slow
def test_continuous_batching_gives_each_prompt_the_static_samplers_tokens(trained):
  """24 prompts of 1 to 7 tokens through 8 cache rows (refilled 2 at a time) and through 4
  rows (1 at a time): each prompt's response, length and log-probs equal the static
  sampler's with row keys on all 24 at once, whichever row it landed in."""
  setup, params = trained
  config = sampling.SampleConfig(max_new_tokens=40, temperature=0.9, row_keys=True)
  sampler = make_sampler(setup, config)
  prompts, lengths = world_prompts(setup.source.world, 24, seed=2)
  key = jax.random.key(5)
  static = jax.device_get(sampler.sample(params, prompts, lengths, key))
  assert len(set(static.lengths.tolist())) > 5  # a ragged workload
  for slots, refill in ((8, 2), (4, 1)):
    cont = jax.device_get(sampler.sample_continuous(params, prompts, lengths, key,
                                                    slots=slots, refill=refill))
    np.testing.assert_array_equal(cont.response, static.response)
    np.testing.assert_array_equal(cont.lengths, static.lengths)
    np.testing.assert_array_equal(cont.mask, static.mask)
    np.testing.assert_allclose(cont.raw_logprobs, static.raw_logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cont.logprobs, static.logprobs, atol=1e-5, rtol=0)


def test_row_keys_do_not_depend_on_the_batch(trained):
  """With row keys, row r draws its token at step t with fold_in(fold_in(key, r), t):
  the first token of each row equals that draw made by hand from the row's logits."""
  setup, params = trained
  config = sampling.SampleConfig(max_new_tokens=6, row_keys=True)
  sampler = make_sampler(setup, config)
  prompts, lengths = world_prompts(setup.source.world, 8, seed=3)
  key = jax.random.key(9)
  out = jax.device_get(sampler.sample(params, prompts, lengths, key))
  logits = jax.jit(sampling.response_logits, static_argnames='model')(
      params, prompts, lengths, out.response[:, :1], model=setup.model)[:, 0]
  for r in range(8):
    want = jax.random.categorical(jax.random.fold_in(jax.random.fold_in(key, r), 0),
                                  logits[r])
    assert out.response[r, 0] == int(want)
