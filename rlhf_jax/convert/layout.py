"""How one of our parameters sits in a Hugging Face tensor, so that any block of it can be
read from the file alone (no full tensor in memory): import builds each parameter shard by
shard, every process reading only the blocks its own devices hold.

Our parameter is the HF tensor (or one of several, stacked) with its axes reordered and
each HF axis split into one or more of ours, in C order: torch's Linear [out, in] is our
[in, heads, head_dim] (`order=(1, 0)`, HF axis 0 split in two). A block of ours is then one
rectangular read per HF axis, except where the vocabulary permutation reorders rows (read
run by run: the permutation moves only the few special tokens) and where a split axis's
inner dims are only partly wanted (the whole inner extent is read and cut; our logical
rules never shard `kv`, so the shards of an import are exact).
"""
import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
  """ours = transpose(theirs, order) with HF axis j split into groups[j] of our dims.

  order: HF axes in our order (None: ours is theirs, element for element).
  groups: by HF axis, how many of our dims it splits into.
  part: (axis, k, n): ours is the k-th of n equal parts of that HF axis (GPT-2's fused qkv).
  perm: our row i is HF row perm[i] along HF axis 0 (the vocabulary).
  stack: our dim that picks the HF tensor (gate and up as one [D, 2, F]); None: one tensor.
  """
  order: tuple | None = None
  groups: tuple | None = None
  part: tuple | None = None
  perm: np.ndarray | None = dataclasses.field(default=None, compare=False)
  stack: int | None = None

  def theirs(self, shape: tuple) -> tuple:
    """The HF shape (of each stacked tensor) our `shape` needs."""
    shape = tuple(shape)
    if self.stack is not None:
      shape = shape[:self.stack] + shape[self.stack + 1:]
    if self.order is None:
      return shape
    dims = self._dims_of()
    out = [math.prod(shape[d] for d in dims[j]) for j in range(len(self.groups))]
    if self.part:
      out[self.part[0]] *= self.part[2]
    return tuple(out)

  def sources(self, shape: tuple) -> int:
    return 1 if self.stack is None else int(shape[self.stack])

  def read(self, tensors: list, index: tuple, shape: tuple) -> np.ndarray:
    """The block `index` (slices, one per our dim) of ours, of shape `shape`, from the lazy
    HF tensors (`tensors[k][slices]` reads only that block)."""
    spans = [_span(s, n) for s, n in zip(index, shape)]
    if self.stack is None:
      return self._read_one(tensors[0], spans, tuple(shape))
    d = self.stack
    rest, rest_shape = spans[:d] + spans[d + 1:], tuple(shape[:d]) + tuple(shape[d + 1:])
    return np.stack([self._read_one(tensors[k], rest, rest_shape)
                     for k in range(*spans[d])], axis=d)

  def _dims_of(self) -> dict:
    """HF axis -> our dims it becomes."""
    dims, at = {}, 0
    for j in self.order:
      dims[j] = list(range(at, at + self.groups[j]))
      at += self.groups[j]
    return dims

  def _read_one(self, tensor, spans: list, shape: tuple) -> np.ndarray:
    if self.order is None:
      return _fetch(tensor, spans, self.perm)
    dims = self._dims_of()
    reads, split, post = [], [], [slice(None)] * len(shape)
    for j in range(len(self.groups)):
      first, inner = dims[j][0], [shape[d] for d in dims[j][1:]]
      stride = math.prod(inner)
      start, stop = spans[first]
      whole = math.prod(shape[d] for d in dims[j])  # this part's extent along axis j
      offset = self.part[1] * whole if self.part and self.part[0] == j else 0
      reads.append((offset + start * stride, offset + stop * stride))
      split.append([stop - start, *inner])
      for d in dims[j][1:]:  # the inner dims were read whole
        post[d] = slice(*spans[d])
    block = _fetch(tensor, reads, self.perm)
    block = block.reshape([n for group in split for n in group])
    at, where = 0, {}  # HF axis -> its dims in the block, which keeps HF's axis order
    for j in range(len(self.groups)):
      where[j] = list(range(at, at + self.groups[j]))
      at += self.groups[j]
    block = block.transpose([a for j in self.order for a in where[j]])
    return block[tuple(post)]


def _span(s: slice, n: int) -> tuple:
  start, stop, step = s.indices(n)
  assert step == 1, s
  return start, stop


def _fetch(tensor, spans: list, perm) -> np.ndarray:
  """tensor[spans], with axis 0's rows taken through `perm` when it is given: one read per
  run of consecutive HF rows."""
  if perm is None:
    return tensor[tuple(slice(a, b) for a, b in spans)]
  rows = perm[spans[0][0]:spans[0][1]]
  rest = tuple(slice(a, b) for a, b in spans[1:])
  breaks = np.flatnonzero(np.diff(rows) != 1) + 1
  runs = np.split(rows, breaks) if len(rows) else []
  return np.concatenate([tensor[(slice(int(r[0]), int(r[-1]) + 1),) + rest] for r in runs])
