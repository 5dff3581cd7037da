"""A judge LM's verdicts inside a jitted step: direct RLAIF (Lee et al. 2023), where the
judge's score of each rollout is the reward itself, with no reward model in between.

The judge (a `judge` run, stages/judge.py) compares two responses under a principle, so a
rollout y is scored against a response y_ref the reference policy samples for the same
prompt in the same step, under a principle drawn by weight for each row:

  r(y) = sigmoid(a) - sigmoid(b) = 2 p - 1,  p = (sigmoid(a) + 1 - sigmoid(b)) / 2

with a the judge's log-odds that the first response is better in the document (y, y_ref)
and b the same in (y_ref, y); p is the order-averaged P(y better than y_ref), as the
labels of data/ai_feedback.py read it. r is in [-1, 1], exactly antisymmetric under
swapping y and y_ref, and exactly 0 when y = y_ref: it is centred at the reference
policy by construction, as a reward model's score is centred by reward_norm.

Documents are laid out as data/judge_docs.documents lays them out on the host (that
function is the reference the tests hold this one to), here by a scatter per row.
"""
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax import sampling
from rlhf_jax.world import language


@flax.struct.dataclass
class JudgeFrozen:
  """params: the judge LM's; tags: [K] int32, principle k's tag token; log_weights: [K]
  float32, log of the principles' weights (a principle is drawn per row by them)."""
  params: object
  tags: jax.Array
  log_weights: jax.Array


def verdict_logprobs(params, docs, doc_lengths, *, model, first: int, second: int):
  """[B] log P(first verdict) - log P(second verdict) after each left-padded document
  [B, D]: the judge's log-odds that the response shown first is the better one."""
  logits = sampling.response_logits(params, docs, doc_lengths,
                                    jnp.zeros((docs.shape[0], 1), jnp.int32), model=model)
  logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)
  return logp[:, first] - logp[:, second]


def documents(tags, *, prompts, prompt_lengths, first, first_mask, second, second_mask,
              principle):
  """(docs [B, D] int32 left-padded, lengths [B]) as judge_docs.documents makes them:
  BOS tag prompt EOS first second tag, D = P + 2 R + 3; a response's tokens are those its
  mask keeps, in order."""
  p, r = prompts.shape[1], first.shape[1]
  width = p + 2 * r + 3

  def one(prompt, plen, y1, m1, y2, m2, tag):
    n_content, n1, n2 = plen - 1, m1.sum().astype(jnp.int32), m2.sum().astype(jnp.int32)
    length = n_content + n1 + n2 + 4
    off = width - length
    cols = jnp.arange(p)
    content_at = jnp.where(cols >= p - n_content, off + 2 + cols - (p - n_content), width)
    y1_at = jnp.where(m1 > 0, off + 3 + n_content + jnp.cumsum(m1 > 0) - 1, width)
    y2_at = jnp.where(m2 > 0, off + 3 + n_content + n1 + jnp.cumsum(m2 > 0) - 1, width)
    doc = jnp.zeros((width,), jnp.int32)
    doc = doc.at[content_at].set(prompt, mode='drop')
    doc = doc.at[y1_at].set(y1, mode='drop').at[y2_at].set(y2, mode='drop')
    doc = doc.at[off].set(language.BOS_ID).at[off + 1].set(tag)
    doc = doc.at[off + 2 + n_content].set(language.EOS_ID).at[width - 1].set(tag)
    return doc, length

  return jax.vmap(one)(prompts, prompt_lengths, first, first_mask, second, second_mask,
                       tags[principle])


def direct_reward(frozen: JudgeFrozen, key, *, prompts, prompt_lengths, response, mask,
                  ref_response, ref_mask, model, first: int, second: int):
  """(r [B] float32 as the module docstring defines it, principle [B] int32): each rollout
  judged against the reference's response to its prompt under a drawn principle."""
  principle = jax.random.categorical(key, frozen.log_weights, shape=(prompts.shape[0],))
  read = lambda y1, m1, y2, m2: verdict_logprobs(
      frozen.params, *documents(frozen.tags, prompts=prompts, prompt_lengths=prompt_lengths,
                                first=y1, first_mask=m1, second=y2, second_mask=m2,
                                principle=principle), model=model, first=first, second=second)
  a = read(response, mask, ref_response, ref_mask)
  b = read(ref_response, ref_mask, response, mask)
  return jax.nn.sigmoid(a) - jax.nn.sigmoid(b), principle.astype(jnp.int32)
