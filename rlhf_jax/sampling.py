"""Decoding with a KV cache, and teacher-forced scoring, with the train step's numerics.

Prompts are left-padded to a common length P (`left_pad`), so every row's response starts
at column P and a batch of prompts of different lengths decodes in lockstep: slot P + i of
the cache holds response token i of every row. Positions count from each row's first real
token, exactly as in a training row, so `score` of the same tokens reproduces the sampler's
raw log-probs.

Both are pure functions of (params, data); `Sampler` jits them once per shape on the
training mesh (batch over `data`/`fsdp`, weights as the train state shards them).
"""
import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import distributed, losses, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import KVCache, Transformer


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """How to pick each token. temperature, top_k (0: off) and top_p (1.0: off) are applied
  in that order; greedy takes the argmax of the raw logits instead.

  cache_bucket: response steps per length bucket of the cached decoder. Steps
  [j * bucket, (j + 1) * bucket) attend over the first P + (j + 1) * bucket cache slots
  only (each bucket one compiled loop body), so a step reads the filled part of the cache
  plus less than one bucket, not all P + max_new_tokens slots; 0: one bucket.

  row_keys: row r's token at step t is drawn with fold_in(fold_in(key, r), t), its own
  stream, so the tokens of a row do not depend on which other rows share its batch or
  which slot it sits in: what continuous batching (sampling_continuous.py, always row
  keys) needs to give each prompt exactly the static sampler's tokens. False: one key per
  step for the whole batch, fold_in(key, t)."""
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_id: int = 2
  pad_id: int = 0
  cache_bucket: int = 32
  row_keys: bool = False

  def validate(self, vocab_size: int) -> None:
    if self.max_new_tokens <= 0:
      raise UserError(f'max_new_tokens={self.max_new_tokens} must be positive')
    if self.cache_bucket < 0:
      raise UserError(f'cache_bucket={self.cache_bucket} must be >= 0 (0: one bucket)')
    if not self.greedy and not self.temperature > 0:
      raise UserError(f'temperature={self.temperature} must be > 0 (or use greedy)')
    if not 0 <= self.top_k <= vocab_size:
      raise UserError(f'top_k={self.top_k} must be in [0, vocab size {vocab_size}]')
    if not 0 < self.top_p <= 1:
      raise UserError(f'top_p={self.top_p} must be in (0, 1]')


@flax.struct.dataclass
class SampleOutput:
  """tokens:        [B, P+N] int32 left-padded prompt, then the response.
  response:         [B, N] int32 sampled tokens, PAD after the row's EOS.
  mask:             [B, N] float32, 1 on response tokens (EOS included), 0 after.
  logprobs:         [B, N] float32 log-prob of each token under the sampling distribution
                    (after temperature, top-k, top-p; 0 for greedy); 0 where mask is 0.
  raw_logprobs:     [B, N] float32 log-prob under the model itself; 0 where mask is 0.
  prompt_lengths:   [B] int32.
  lengths:          [B] int32 response tokens per row (EOS included).
  """
  tokens: jax.Array
  response: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  raw_logprobs: jax.Array
  prompt_lengths: jax.Array
  lengths: jax.Array


def left_pad(prompts, *, pad_id: int = 0, length: int | None = None):
  """Lists of token ids -> (tokens [B, P] int32 right-aligned, lengths [B] int32)."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if len(prompts) == 0 or lengths.min() < 1:
    raise UserError('every prompt needs at least one token (BOS)')
  width = int(lengths.max()) if length is None else length
  if lengths.max() > width:
    raise UserError(f'a prompt of {lengths.max()} tokens does not fit in {width}')
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, p in enumerate(prompts):
    tokens[row, width - len(p):] = p
  return tokens, lengths


def _prompt_layout(prompt_lengths, width: int):
  """(segment_ids, positions) [B, P] of left-padded prompts: 0/1 and 0.. from the first
  real token."""
  pad = width - prompt_lengths[:, None]
  cols = jnp.arange(width)[None, :]
  return (cols >= pad).astype(jnp.int32), jnp.maximum(cols - pad, 0).astype(jnp.int32)


def filter_logits(logits: jax.Array, config: SampleConfig) -> jax.Array:
  """The sampling distribution's logits [..., V]: temperature, then top-k, then top-p
  (the smallest set of most likely tokens whose mass reaches top_p). Removed tokens get
  -inf; ties at a threshold are all kept."""
  logits = logits / config.temperature
  if config.top_k:
    kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The first sorted token is always kept, so at least one survives.
    keep = mass_before < config.top_p
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def step_keys(key: jax.Array, rows: jax.Array, step: jax.Array) -> jax.Array:
  """[B] keys fold_in(fold_in(key, rows[b]), step[b]) (row keys; step [] or [B])."""
  step = jnp.broadcast_to(step, rows.shape)
  return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(rows, step)


def choose(logits: jax.Array, *, key: jax.Array, config: SampleConfig):
  """Next tokens from logits [B, V]: (tokens [B], sampling log-probs [B], raw log-probs [B]).
  key: one key for the batch, or [B] keys, one per row (`step_keys`)."""
  raw = jax.nn.log_softmax(logits, axis=-1)
  if config.greedy:
    tokens = jnp.argmax(logits, axis=-1)
    sampled = jnp.zeros(tokens.shape, jnp.float32)
  else:
    filtered = filter_logits(logits, config)
    if not (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1):
      tokens = jax.random.categorical(key, filtered, axis=-1)
    else:
      tokens = jax.vmap(jax.random.categorical)(key, filtered)
    sampled = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tokens[:, None],
                                  axis=-1)[:, 0]
  raw_picked = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
  return tokens.astype(jnp.int32), sampled, raw_picked


@flax.struct.dataclass
class _Loop:
  """State of the decoding loop; [B, N] buffers are filled at column `step`."""
  step: jax.Array
  logits: jax.Array      # [B, V] logits for the token at column `step`
  cache: KVCache | None
  done: jax.Array        # [B] bool, EOS emitted
  response: jax.Array
  logprobs: jax.Array
  raw_logprobs: jax.Array


def buckets(config: SampleConfig) -> list[int]:
  """Where the cached decoder's length buckets end: bucket j holds response steps
  [ends[j-1], ends[j]) and its own cache chunk of those slots; a step of bucket j reads the
  prompt's chunk and chunks 0..j, enough for its own slot P + s."""
  n, size = config.max_new_tokens, config.cache_bucket or config.max_new_tokens
  return [min(end, n) for end in range(size, n + size, size)]


def _decode(prompts, prompt_lengths, key, *, config: SampleConfig, next_logits, first_logits,
            cache, max_steps):
  """The loop shared by the cached and the full-recompute decoders: one while loop per
  length bucket (`buckets`; the full-recompute decoder has one), next_logits(state,
  token, chunks) reading the cache's first `chunks` chunks (None: no cache)."""
  b = prompts.shape[0]
  n = config.max_new_tokens
  zeros = jnp.zeros((b, n), jnp.float32)
  init = _Loop(step=jnp.zeros((), jnp.int32), logits=first_logits, cache=cache,
               done=jnp.zeros((b,), bool), response=jnp.full((b, n), config.pad_id, jnp.int32),
               logprobs=zeros, raw_logprobs=zeros)

  def body(s: _Loop, window) -> _Loop:
    keys = (step_keys(key, jnp.arange(b), s.step) if config.row_keys
            else jax.random.fold_in(key, s.step))
    token, lp, raw = choose(s.logits, key=keys, config=config)
    live = ~s.done
    token = jnp.where(live, token, config.pad_id)
    put = lambda buf, col: jax.lax.dynamic_update_slice(buf, col[:, None], (0, s.step))
    logits, cache = next_logits(s, token, window)
    return _Loop(step=s.step + 1, logits=logits, cache=cache,
                 done=s.done | (token == config.eos_id), response=put(s.response, token),
                 logprobs=put(s.logprobs, jnp.where(live, lp, 0.0)),
                 raw_logprobs=put(s.raw_logprobs, jnp.where(live, raw, 0.0)))

  limit = n if max_steps is None else jnp.minimum(max_steps, n)
  final = init
  for j, end in enumerate(buckets(config) if cache is not None else [n]):
    bound = jnp.minimum(limit, end)
    chunks = j + 2 if cache is not None else None  # the prompt's, then buckets 0..j
    final = jax.lax.while_loop(lambda s, bound=bound: (s.step < bound) & ~jnp.all(s.done),
                               functools.partial(body, window=chunks), final)
  # A column holds a response token if it was decoded while its row was live: before the
  # loop stopped and not after the row's first EOS.
  cols = jnp.arange(n)[None, :]
  is_eos = final.response == config.eos_id
  eos_before = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
  mask = ((cols < final.step) & ~eos_before).astype(jnp.float32)
  return SampleOutput(
      tokens=jnp.concatenate([prompts, final.response], axis=1), response=final.response,
      mask=mask, logprobs=final.logprobs * mask, raw_logprobs=final.raw_logprobs * mask,
      prompt_lengths=prompt_lengths, lengths=mask.sum(axis=1).astype(jnp.int32))


def sample(params, prompts, prompt_lengths, key, max_steps=None, *, model: Transformer,
           config: SampleConfig) -> SampleOutput:
  """Samples up to config.max_new_tokens after each prompt with a KV cache.

  prompts: [B, P] int32 left-padded (`left_pad`), prompt_lengths: [B] int32 >= 1; key: the
  step keys are fold_in(key, i). One prefill over the prompts writes slots 0..P-1, then
  each step feeds one token per row, attending over the cache's filled part rounded up to
  its length bucket (config.cache_bucket). The loop stops when every row has emitted EOS,
  or after max_steps steps (a traced int, for benchmarks; None: max_new_tokens).
  """
  b, p = prompts.shape
  segments, positions = _prompt_layout(prompt_lengths, p)
  ends = buckets(config)
  cache = KVCache.empty(model.cfg, batch=b, length=p + config.max_new_tokens,
                        chunks=(p, *np.diff([0, *ends])))
  out = model.apply({'params': params}, prompts, segment_ids=segments, positions=positions,
                    cache=cache, cache_chunks=1)

  def next_logits(s: _Loop, token, window):
    step_out = model.apply({'params': params}, token[:, None],
                           segment_ids=jnp.ones((b, 1), jnp.int32),
                           positions=(prompt_lengths + s.step)[:, None], cache=s.cache,
                           cache_chunks=window)
    return step_out.logits[:, 0], step_out.cache

  return _decode(prompts, prompt_lengths, key, config=config, next_logits=next_logits,
                 first_logits=out.logits[:, -1], cache=out.cache, max_steps=max_steps)


def sequence_layout(prompt_lengths, width: int, total: int):
  """(segment_ids, positions) [B, total] of a left-padded prompt of `width` columns
  followed by response columns, which continue each row's positions."""
  segments, positions = _prompt_layout(prompt_lengths, width)
  extra = total - width
  resp_pos = prompt_lengths[:, None] + jnp.arange(extra)[None, :]
  return (jnp.concatenate([segments, jnp.ones((segments.shape[0], extra), jnp.int32)], 1),
          jnp.concatenate([positions, resp_pos.astype(jnp.int32)], 1))


def sample_without_cache(params, prompts, prompt_lengths, key, max_steps=None, *,
                         model: Transformer, config: SampleConfig) -> SampleOutput:
  """The same decoding by full recomputation: every step runs the model over the whole
  [B, P+N] buffer and reads the logits at the current column. The reference for the
  cached sampler's correctness and speed."""
  b, p = prompts.shape
  total = p + config.max_new_tokens
  segments, positions = sequence_layout(prompt_lengths, p, total)

  def logits_at(buffer, col):
    logits = model.apply({'params': params}, buffer, segment_ids=segments,
                         positions=positions).logits
    return jax.lax.dynamic_slice_in_dim(logits, col, 1, axis=1)[:, 0]

  empty = jnp.full((b, config.max_new_tokens), config.pad_id, jnp.int32)

  def next_logits(s: _Loop, token, window):
    del window  # no cache
    # The buffer is the prompt, the response so far and this step's token.
    response = jax.lax.dynamic_update_slice(s.response, token[:, None], (0, s.step))
    return logits_at(jnp.concatenate([prompts, response], axis=1), p + s.step), None

  return _decode(prompts, prompt_lengths, key, config=config, next_logits=next_logits,
                 first_logits=logits_at(jnp.concatenate([prompts, empty], axis=1), p - 1),
                 cache=None, max_steps=max_steps)


def response_logits(params, prompts, prompt_lengths, responses, *,
                    model: Transformer) -> jax.Array:
  """Teacher-forced logits [B, N, V] that predict `responses` [B, N] after left-padded
  `prompts` [B, P]: entry i is the distribution of responses[:, i] given the prompt and
  responses[:, :i], from the same forward as the train step."""
  p, n = prompts.shape[1], responses.shape[1]
  tokens = jnp.concatenate([prompts, responses], axis=1)
  segments, positions = sequence_layout(prompt_lengths, p, p + n)
  return model.apply({'params': params}, tokens[:, :-1], segment_ids=segments[:, :-1],
                     positions=positions[:, :-1]).logits[:, p - 1:]


def score(params, prompts, prompt_lengths, responses, *, model: Transformer) -> jax.Array:
  """Teacher-forced log-probs [B, N] of `responses` [B, N] after left-padded `prompts`
  [B, P]: entry i is log p(responses[:, i] | prompt, responses[:, :i]). Callers multiply
  by their response mask."""
  logits = response_logits(params, prompts, prompt_lengths, responses, model=model)
  return losses.token_logprobs(logits, responses)


def _hashable(*trees):
  return tuple((treedef, tuple(leaves)) for leaves, treedef in map(jax.tree.flatten, trees))


@functools.lru_cache(maxsize=64)
def _jitted(fn, model, config, in_shardings, out_shardings):
  """`fn` jitted for one model, SampleConfig (None: `fn` takes none) and layout, shared by
  every Sampler built with the same ones: a process that builds many (each evaluator of a
  stage, each round of a loop, each run of an experiment) traces, lowers and compiles each
  shape once. Modules and SampleConfigs compare by value; shardings arrive flattened."""
  kwargs = {'model': model} if config is None else {'model': model, 'config': config}
  unflatten = lambda flat: jax.tree.unflatten(flat[0], flat[1])
  return jax.jit(functools.partial(fn, **kwargs), in_shardings=unflatten(in_shardings),
                 out_shardings=unflatten(out_shardings))


@functools.lru_cache(maxsize=16)
def _continuous(slots: int, refill: int):
  """One function object per (slots, refill), so `_jitted` compiles each once."""
  from rlhf_jax.sampling_continuous import sample_continuous
  return functools.partial(sample_continuous, slots=slots, refill=refill)


class Sampler:
  """`sample`, `sample_without_cache` and `score` for one model and SampleConfig, jitted
  once per shape on `mesh`: batch arrays over the mesh's batch axes, params as
  `param_shardings` (the train state's) say, so a rollout gathers nothing to one device.

  continuous_slots: how `sample_in_chunks` decodes. 0: the static sampler, a chunk at a
  time; > 0 (divisible by the data-parallel size): continuous batching through that many
  cache rows per chunk (`sample_continuous`), with row keys, so each prompt gets exactly
  the tokens the static sampler with SampleConfig.row_keys gives it (config's row_keys is
  then set, for `sample` too)."""

  def __init__(self, *, model: Transformer, config: SampleConfig, mesh, mesh_config,
               param_shardings, continuous_slots: int = 0):
    config.validate(model.cfg.vocab_size)
    if continuous_slots:
      config = dataclasses.replace(config, row_keys=True)
    self.model, self.config = model, config
    self.mesh, self.mesh_config = mesh, mesh_config
    self.batch_sharding = sharding.batch_sharding(mesh, mesh_config)
    self.rows_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(self.batch_sharding.spec[0]))
    self.dp = sharding.data_parallel_size(mesh, mesh_config)
    if continuous_slots < 0 or continuous_slots % self.dp:
      raise UserError(f'continuous_slots={continuous_slots} must be 0 (the static sampler) or '
                      f'a positive multiple of the data-parallel size {self.dp} of the mesh '
                      '(each device holds as many cache rows)')
    self.continuous_slots = continuous_slots
    replicated = sharding.replicated(mesh)
    out = SampleOutput(tokens=self.batch_sharding, response=self.batch_sharding,
                       mask=self.batch_sharding, logprobs=self.batch_sharding,
                       raw_logprobs=self.batch_sharding, prompt_lengths=self.rows_sharding,
                       lengths=self.rows_sharding)
    decode_in = (param_shardings, self.batch_sharding, self.rows_sharding, replicated,
                 replicated)
    self._param_shardings, self._out = param_shardings, out
    self._sample, self._sample_full = (
        _jitted(fn, model, config, *_hashable(decode_in, out))
        for fn in (sample, sample_without_cache))
    self._score = _jitted(score, model, None, *_hashable(
        (param_shardings, self.batch_sharding, self.rows_sharding, self.batch_sharding),
        self.batch_sharding))

  def _check_rows(self, prompts) -> None:
    if prompts.shape[0] % self.dp:
      raise UserError(f'{prompts.shape[0]} prompts are not divisible by the data-parallel '
                      f'size {self.dp} of the mesh')

  def sample(self, params, prompts, prompt_lengths, key, *, max_steps: int | None = None,
             cache: bool = True) -> SampleOutput:
    self._check_rows(prompts)
    steps = jnp.int32(self.config.max_new_tokens if max_steps is None else max_steps)
    fn = self._sample if cache else self._sample_full
    prompts, prompt_lengths = self._put(prompts, prompt_lengths)
    with sharding.activate(self.mesh, self.mesh_config):
      return fn(params, prompts, prompt_lengths, key, steps)

  def _put(self, rows, row_lengths, *more):
    """Host rows ([B, T], [B], more [B, T]) as int32 inputs of the compiled programs: in a
    multi-process run, global arrays built from this process's rows (every process holds
    the same host rows)."""
    if jax.process_count() == 1:
      return (jnp.asarray(rows, jnp.int32), jnp.asarray(row_lengths, jnp.int32),
              *(jnp.asarray(m, jnp.int32) for m in more))
    cast = lambda x: x if isinstance(x, jax.Array) else np.asarray(x, np.int32)
    return distributed.put_global(
        tuple(map(cast, (rows, row_lengths, *more))),
        (self.batch_sharding, self.rows_sharding, *(self.batch_sharding for _ in more)))

  def sample_continuous(self, params, prompts, prompt_lengths, key, *, slots: int,
                        refill: int = 0) -> SampleOutput:
    """All N prompts through `slots` cache rows by continuous batching
    (sampling_continuous.py), `refill` rows prefilled at a time (0: slots // 4, at least
    1); each prompt's tokens are those of `sample` with row_keys over all N at once."""
    refill = refill or max(1, slots // 4)
    if slots <= 0 or slots % self.dp or not 0 < refill <= slots:
      raise UserError(f'continuous batching needs slots > 0 divisible by the data-parallel '
                      f'size {self.dp} and 0 < refill <= slots; got slots={slots}, '
                      f'refill={refill}')
    self._check_rows(prompts)
    fn = self.continuous_program(slots, refill)
    prompts, prompt_lengths = self._put(prompts, prompt_lengths)
    with sharding.activate(self.mesh, self.mesh_config):
      return fn(params, prompts, prompt_lengths, key)

  def continuous_program(self, slots: int, refill: int):
    """The jitted continuous sampler (params, prompts, lengths, key) -> SampleOutput."""
    return _jitted(_continuous(slots, refill), self.model, self.config, *_hashable(
        (self._param_shardings, self.batch_sharding, self.rows_sharding,
         sharding.replicated(self.mesh)), self._out))

  def sample_in_chunks(self, params, prompts, prompt_lengths, key, *,
                       chunk: int = 1024) -> SampleOutput:
    """`sample` over any number of prompts, `chunk` rows at a time (one compiled shape;
    the last chunk is padded with copies of its first row), chunk c with key fold_in(key,
    c). With continuous_slots, each chunk goes through `sample_continuous` instead (its
    prompts padded only to a multiple of the data-parallel size, and at most as many
    slots as it has rows): the same tokens as the static sampler with row keys. Returns
    host numpy arrays."""
    n = prompts.shape[0]
    chunk = -(-min(chunk, n) // self.dp) * self.dp
    parts = []
    for c, lo in enumerate(range(0, n, chunk)):
      size = chunk
      if self.continuous_slots:  # padding rows would be decoded, not just carried
        size = -(-min(chunk, n - lo) // self.dp) * self.dp
      rows = np.arange(lo, lo + size)
      rows = np.where(rows < n, rows, lo)
      args = (params, prompts[rows], prompt_lengths[rows], jax.random.fold_in(key, c))
      out = distributed.to_host(
          self.sample_continuous(*args, slots=min(self.continuous_slots, size))
          if self.continuous_slots else self.sample(*args))
      parts.append(jax.tree.map(lambda x: np.asarray(x)[:min(chunk, n - lo)], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

  def score(self, params, prompts, prompt_lengths, responses) -> jax.Array:
    self._check_rows(prompts)
    prompts, prompt_lengths, responses = self._put(prompts, prompt_lengths, responses)
    with sharding.activate(self.mesh, self.mesh_config):
      return self._score(params, prompts, prompt_lengths, responses)
