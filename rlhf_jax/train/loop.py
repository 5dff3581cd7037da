"""The one training loop every stage runs: resume, step, log, evaluate, checkpoint.

A stage supplies a jitted `step(state, batch) -> (state, metrics)`, a data source with
`next_batch()`, `get_state()` and `set_state()`, and `evaluate(state) -> metrics`. The loop
owns everything else, so resuming, logging and failure behave the same in every stage.
"""
import dataclasses
import math
import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm

from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.metrics import MetricsWriter


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint stays in place."""


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  workdir: str
  steps: int
  log_every: int
  eval_every: int
  ckpt_every: int
  keep_ckpts: int
  progress: bool
  tokens_per_step: int

  @classmethod
  def from_config(cls, config, *, workdir: str, tokens_per_step: int) -> 'LoopSpec':
    t = config.train
    return cls(workdir=workdir, steps=t.steps, log_every=t.log_every,
               eval_every=t.eval_every, ckpt_every=t.ckpt_every, keep_ckpts=t.keep_ckpts,
               progress=t.progress, tokens_per_step=tokens_per_step)


def run(*, spec: LoopSpec, state, state_shardings, step: Callable, source,
        put_batch: Callable, evaluate: Callable[[Any], dict],
        static_metrics: dict | Callable[[], dict]) -> Any:
  """Trains from the newest checkpoint in spec.workdir (or from `state`) to spec.steps.

  static_metrics are logged once at step 0 (facts of the run, such as the world's
  entropy rate): a dict, or a function returning one, called only then (a resumed run
  skips what it costs). Returns the final state.
  """
  ckpt = Checkpointer(f'{spec.workdir}/checkpoints', keep=spec.keep_ckpts)
  start = 0
  # The newest checkpoint that restores; newer damaged ones are moved aside (with a warning),
  # and the metrics after the step resumed from are recomputed, as after any stop.
  resumed = ckpt.restore_newest(state_shardings=state_shardings, like_state=state)
  if resumed is not None:
    start, state, data_state = resumed
    source.set_state(data_state)
  # A run with no checkpoint to resume rewrites step 0 too, so keeps no earlier line
  # (one killed before its first checkpoint has already logged step 0).
  writer = MetricsWriter(spec.workdir, resume_step=start if start else -1)
  if start == 0:
    static = static_metrics() if callable(static_metrics) else static_metrics
    writer.write(0, {**static, **evaluate(state)})
  bar = tqdm.tqdm(total=spec.steps, initial=start,
                  disable=not spec.progress or jax.process_index() != 0,
                  dynamic_ncols=True, mininterval=1.0)
  last_good = start
  t0, steps_timed = time.perf_counter(), 0
  try:
    for i in range(start, spec.steps):
      state, metrics = step(state, put_batch(source.next_batch()))
      done = i + 1
      steps_timed += 1
      log = done % spec.log_every == 0 or done == spec.steps
      save = done % spec.ckpt_every == 0 or done == spec.steps
      evaluating = done % spec.eval_every == 0 or done == spec.steps
      if not (log or save or evaluating):
        continue
      metrics = jax.device_get(metrics)  # the only host sync between log steps
      loss = float(np.asarray(metrics['train/loss']))
      # The loss is that of the parameters before this update; a non-finite gradient norm
      # means the update itself has already poisoned the state about to be saved.
      for key in ('train/loss', 'train/grad_norm'):
        value = float(np.asarray(metrics.get(key, 0.0)))
        if not math.isfinite(value):
          where = (f'the last good checkpoint is step {last_good} in {ckpt.directory}'
                   if last_good else 'no checkpoint was written')
          raise NonFiniteLoss(f'non-finite {key} ({value}) at step {done}; {where}')
      elapsed = time.perf_counter() - t0
      metrics['perf/tokens_per_s'] = spec.tokens_per_step * steps_timed / max(elapsed, 1e-9)
      metrics['perf/step_s'] = elapsed / steps_timed
      if evaluating:
        metrics.update(evaluate(state))
      writer.write(done, metrics)
      bar.set_postfix(loss=f'{loss:.4f}', tok_s=f'{metrics["perf/tokens_per_s"]:.0f}')
      bar.update(done - bar.n)
      if save:
        ckpt.save(done, state=state, data_state=source.get_state())
        last_good = done
      t0, steps_timed = time.perf_counter(), 0
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  return state
