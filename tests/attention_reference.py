"""A float64 reference of causal, packed-segment attention and the segment layout the
attention tests share (tests/test_transformer.py, tests/test_attention_kernels.py)."""
import numpy as np

SEGMENTS = np.array([
    [1] * 7 + [2] * 9 + [0] * 4,   # two documents, then padding
    [1] * 20,                      # one document filling the row
    [1] * 5 + [2] * 11 + [3] * 4,  # three documents
], np.int32)


def reference(q, k, v, segments):
  """float64 softmax attention, q already scaled; query head i reads key head i // G.
  q [B, T, H, D], k, v [B, T, K, D] -> [B, T, H, D]; padding rows are left 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, _ = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for qi in range(t):
      if segments[i, qi] == 0:
        continue
      keys = [j for j in range(qi + 1) if segments[i, j] == segments[i, qi]]
      for head in range(h):
        kh = head // group
        s = np.array([q[i, qi, head] @ k[i, j, kh] for j in keys])
        p = np.exp(s - s.max())
        out[i, qi, head] = (p / p.sum()) @ v[i, keys, kh]
  return out
