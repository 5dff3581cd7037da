"""Metrics to DIR/metrics.jsonl (one JSON object per log step) and TensorBoard events.
Written by process 0 only."""
import json
import math
import os

import jax
import numpy as np


class MetricsWriter:

  def __init__(self, workdir: str, *, resume_step: int):
    """Keeps the lines of an earlier attempt up to `resume_step` (the checkpoint a resumed
    run continues from); later lines are recomputed identically by the resumed run, and a
    line cut short by a kill is dropped."""
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not self.enabled:
      return
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except ValueError:
            continue
          if isinstance(record, dict) and record.get('step', math.inf) <= resume_step:
            kept.append(line if line.endswith('\n') else line + '\n')
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    from tensorboardX import SummaryWriter  # import late: it is slow and optional for tools
    self._tb = SummaryWriter(workdir)
    self._file = open(self.path, 'a')

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    for key, value in sorted(metrics.items()):
      value = np.asarray(value).item()
      record[key] = value
      self._tb.add_scalar(key, value, int(step))
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()
