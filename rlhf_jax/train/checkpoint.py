"""Checkpoints through orbax: the train state plus the data iterator's position.

Writes are atomic (orbax writes a temporary directory and renames it), so a run killed
at any point leaves only complete checkpoints; the newest one is where a rerun resumes.
"""
import gc
import logging
import os
import sys
import warnings

import jax
import orbax.checkpoint as ocp

from rlhf_jax.errors import UserError


def _drop_closed_loop_callbacks() -> None:
  """A failed restore leaves tensorstore reads in flight whose completion callbacks post to
  orbax's event loop, which orbax has already closed; each would print a traceback through
  sys.unraisablehook under the one `error:` line. Drops exactly those, passes on the rest."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop', False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
      previous(unraisable)
  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _collect_abandoned_reads() -> None:
  """Orbax stops at the first failed read and closes its event loop with the other reads
  still pending. Collecting them now, with asyncio's "Task exception was never retrieved"
  log and the "never awaited" warnings muted, keeps that noise from surfacing later."""
  log = logging.getLogger('asyncio')
  disabled, log.disabled = log.disabled, True
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', message='coroutine .* was never awaited')
      gc.collect()
  finally:
    log.disabled = disabled


class Checkpointer:

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, *, state, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, *, state_shardings, like_state) -> tuple[object, dict]:
    """Restores onto the given shardings; `like_state` gives shapes and dtypes."""
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        like_state, state_shardings)
    _drop_closed_loop_callbacks()  # before: the first callbacks fire while orbax unwinds
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      return restored.state, restored.data
    except Exception as e:  # orbax raises many types for a damaged directory
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # Outside the except block, so that its traceback no longer holds orbax's frames.
    _collect_abandoned_reads()
    # TensorStore appends its whole spec (a bound-method repr, JSON) to the reason.
    reason = reason.split(' See full TensorStore details')[0].split(' [tensorstore_spec')[0]
    reason = reason if len(reason) <= 300 else reason[:297] + '...'
    raise UserError(f'checkpoint {step} in {self.directory} cannot be restored ({reason}); '
                    'move it aside to resume from an earlier one')

  def close(self) -> None:
    self._manager.close()
