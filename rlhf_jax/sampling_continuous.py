"""Continuous batching: N prompts decoded through `slots` rows of one KV cache, a row that
finishes (EOS or max_new_tokens) taking the next prompt, so a ragged workload costs about
its total tokens, not N / slots times its longest row.

One compiled program: every row decodes one token per step until at least `refill` rows
are free while prompts remain (or no row is live); then the next `refill` prompts are
prefilled together on a [refill, P] cache and their keys, values and slot segments
scattered into the free rows, whose write index goes back to P; and so on. Each
row has its own step and cache index (KVCache.index [slots]), so positions, slots and the
mask are per row; a row's cache slots past its own index hold a former prompt's keys
under segment 0 and are never seen.

Prompt i's token at step t is drawn with fold_in(fold_in(key, i), t), the static
sampler's row keys (SampleConfig.row_keys): each prompt gets exactly the tokens the
static sampler gives it in a batch of all N prompts with the same key, whatever slot it
landed in and whoever shared the cache with it. Outputs are in prompt order, as
sampling.SampleOutput.
"""
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import KVCache, Transformer
from rlhf_jax.sampling import SampleConfig, SampleOutput, _prompt_layout, choose, step_keys


@flax.struct.dataclass
class _Slots:
  cache: KVCache         # [slots] rows, one chunk, index [slots]
  prompt: jax.Array      # [slots] int32 prompt each row decodes (N: none yet)
  step: jax.Array        # [slots] int32 response tokens the row has emitted
  length: jax.Array      # [slots] int32 its prompt's length
  logits: jax.Array      # [slots, V] logits of the row's next token
  live: jax.Array        # [slots] bool
  next: jax.Array        # [] int32 first prompt not yet taken
  response: jax.Array    # [N, n] int32, in prompt order
  logprobs: jax.Array    # [N, n]
  raw_logprobs: jax.Array
  lengths: jax.Array     # [N] int32


def _refill(s: _Slots, rows: int, params, prompts, prompt_lengths, *, model: Transformer):
  """The next `rows` prompts, prefilled together, into the first `rows` free rows."""
  n_prompts, p = prompts.shape
  slots = s.live.shape[0]
  free = ~s.live
  target = jnp.argsort(~free, stable=True)[:rows]  # free rows first, lowest first
  ids = s.next + jnp.arange(rows)
  ok = (ids < n_prompts) & free[target]  # a prefix: free rows and remaining prompts
  ids = jnp.minimum(ids, n_prompts - 1)
  tokens, lengths = prompts[ids], prompt_lengths[ids]
  segments, positions = _prompt_layout(lengths, p)
  out = model.apply({'params': params}, tokens, segment_ids=segments, positions=positions,
                    cache=KVCache.empty(model.cfg, batch=rows, length=p))
  at = jnp.where(ok, target, slots)  # out of range: dropped
  put = lambda big, small: (big[0].at[at, :, :p].set(small[0], mode='drop'),)
  width = s.cache.segment_ids.shape[1]
  cache = KVCache(
      keys=tuple(map(put, s.cache.keys, out.cache.keys)),
      values=tuple(map(put, s.cache.values, out.cache.values)),
      segment_ids=s.cache.segment_ids.at[at].set(
          jnp.pad(segments, ((0, 0), (0, width - p))), mode='drop'),
      index=s.cache.index.at[at].set(p, mode='drop'))
  set_rows = lambda old, new: old.at[at].set(new, mode='drop')
  return s.replace(cache=cache, prompt=set_rows(s.prompt, ids), step=set_rows(s.step, 0),
                   length=set_rows(s.length, lengths),
                   logits=set_rows(s.logits, out.logits[:, -1]),
                   live=set_rows(s.live, True), next=s.next + ok.sum().astype(jnp.int32))


def _decode_step(s: _Slots, params, key, *, model: Transformer, config: SampleConfig):
  n_prompts = s.lengths.shape[0]
  token, lp, raw = choose(s.logits, key=step_keys(key, s.prompt, s.step), config=config)
  token = jnp.where(s.live, token, config.pad_id)
  at = jnp.where(s.live, s.prompt, n_prompts)  # finished or empty rows write nothing
  put = lambda buf, value: buf.at[at, s.step].set(value, mode='drop')
  out = model.apply({'params': params}, token[:, None],
                    segment_ids=jnp.ones((token.shape[0], 1), jnp.int32),
                    positions=(s.length + s.step)[:, None], cache=s.cache)
  ended = (token == config.eos_id) | (s.step + 1 >= config.max_new_tokens)
  return s.replace(cache=out.cache, logits=out.logits[:, 0], step=s.step + 1,
                   live=s.live & ~ended, response=put(s.response, token),
                   logprobs=put(s.logprobs, lp), raw_logprobs=put(s.raw_logprobs, raw),
                   lengths=s.lengths.at[at].set(s.step + 1, mode='drop'))


def sample_continuous(params, prompts, prompt_lengths, key, *, model: Transformer,
                      config: SampleConfig, slots: int, refill: int) -> SampleOutput:
  """Samples up to config.max_new_tokens after each of the N prompts ([N, P] left-padded,
  lengths [N]) through `slots` cache rows, refilling `refill` rows at a time."""
  n_prompts, p = prompts.shape
  n = config.max_new_tokens
  zeros = jnp.zeros((n_prompts, n), jnp.float32)
  cache = KVCache.empty(model.cfg, batch=slots, length=p + n)
  start = _Slots(
      cache=cache.replace(index=jnp.zeros((slots,), jnp.int32)),
      prompt=jnp.full((slots,), n_prompts, jnp.int32), step=jnp.zeros((slots,), jnp.int32),
      length=jnp.ones((slots,), jnp.int32),
      logits=jnp.zeros((slots, model.cfg.vocab_size), jnp.float32),
      live=jnp.zeros((slots,), bool), next=jnp.zeros((), jnp.int32),
      response=jnp.full((n_prompts, n), config.pad_id, jnp.int32), logprobs=zeros,
      raw_logprobs=zeros, lengths=jnp.zeros((n_prompts,), jnp.int32))
  fill = lambda s, rows: _refill(s, rows, params, prompts, prompt_lengths, model=model)
  state = fill(start, min(slots, n_prompts))

  due = lambda s: (s.next < n_prompts) & ((~s.live).sum() >= refill)
  decode = lambda s: _decode_step(s, params, key, model=model, config=config)

  def round_(s: _Slots) -> _Slots:
    # Decode until a refill is due or no row is live, then refill (a no-op scatter once
    # the prompts are used up). Nested loops, not a cond per step: a conditional over the
    # cache would copy it.
    s = jax.lax.while_loop(lambda s: s.live.any() & ~due(s), decode, s)
    return fill(s, refill)

  final = jax.lax.while_loop(lambda s: s.live.any() | (s.next < n_prompts), round_, state)
  mask = (jnp.arange(n)[None, :] < final.lengths[:, None]).astype(jnp.float32)
  return SampleOutput(
      tokens=jnp.concatenate([prompts, final.response], axis=1), response=final.response,
      mask=mask, logprobs=final.logprobs * mask, raw_logprobs=final.raw_logprobs * mask,
      prompt_lengths=prompt_lengths, lengths=final.lengths)
