"""Checkpoints through orbax: the train state plus the data iterator's position.

Writes are atomic (orbax writes a temporary directory and renames it), so a run killed
at any point leaves only complete checkpoints; the newest one that restores is where a rerun
resumes. One that does not (damaged on disk after it was written) is moved aside to
DIR/corrupt_checkpoints/, outside orbax's view, so that neither its listing nor its
max_to_keep collection ever sees it again.
"""
import gc
import logging
import os
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

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
  # On a busy machine some of those reads are still pending now and die later (at exit at
  # the latest): the same two messages, for a checkpoint already reported as damaged.
  if not any(isinstance(f, _AbandonedReadsFilter) for f in log.filters):
    log.addFilter(_AbandonedReadsFilter())
  warnings.filterwarnings('ignore', message='coroutine .* was never awaited')


class _AbandonedReadsFilter(logging.Filter):
  """Drops asyncio's reports of the tasks a failed orbax restore abandoned."""

  def filter(self, record) -> bool:
    # The first line names the future's class: Task, or _GatheringFuture for a gather.
    first = record.getMessage().split('\n', 1)[0]
    return not (first.endswith(' exception was never retrieved') or
                first.endswith(' was destroyed but it is pending!'))


# The barrier that ends orbax's CheckpointManager.restore in every process (orbax
# Checkpointer.restore: sync_global_processes('Checkpointer:restore'), no prefix by default).
_ORBAX_RESTORE_BARRIER = 'Checkpointer:restore'


class CorruptCheckpoint(UserError):
  """A checkpoint that exists but cannot be restored; `reason` says why in a few words."""

  def __init__(self, message: str, *, step: int, reason: str):
    super().__init__(message)
    self.step = step
    self.reason = reason


def _free_name(root: str, name: str) -> str:
  """root/name, or root/name.1, root/name.2, ...: the first that does not exist yet, so that
  a checkpoint moved aside never lands on one moved there earlier."""
  path, n = os.path.join(root, name), 0
  while os.path.lexists(path):
    n += 1
    path = os.path.join(root, f'{name}.{n}')
  return path


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
    """Restores onto the given shardings; `like_state` gives shapes and dtypes. Raises
    CorruptCheckpoint in every process if it fails in any."""
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        like_state, state_shardings)
    _drop_closed_loop_callbacks()  # before: the first callbacks fire while orbax unwinds
    reason = None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged directory
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if jax.process_count() > 1:
      # A process whose reads failed never reached the barrier that ends orbax's restore,
      # where the others now wait: it joins them there. Then all agree, so that every
      # process goes on with the same checkpoint (or with none).
      if reason is not None:
        multihost_utils.sync_global_devices(_ORBAX_RESTORE_BARRIER)
      failed = np.asarray(multihost_utils.process_allgather(np.int32(reason is not None)))
      if reason is None and failed.any():
        reason = f'it failed to restore in process {int(np.argmax(failed))}'
    if reason is None:
      return restored.state, restored.data
    # Outside the except block, so that its traceback no longer holds orbax's frames.
    _collect_abandoned_reads()
    # TensorStore appends its whole spec (a bound-method repr, JSON) to the reason.
    reason = reason.split(' See full TensorStore details')[0].split(' [tensorstore_spec')[0]
    reason = reason if len(reason) <= 300 else reason[:297] + '...'
    raise CorruptCheckpoint(f'checkpoint {step} in {self.directory} cannot be restored '
                            f'({reason})', step=step, reason=reason)

  def restore_newest(self, *, state_shardings, like_state) -> tuple[int, object, dict] | None:
    """Resuming this run: (step, state, data state) of the newest checkpoint that restores,
    None if there is none. Newer ones that cannot be restored are moved aside (only once
    an earlier one has restored) and named in one warning line on stderr; if none restores,
    UserError, with everything left where it was."""
    bad = []
    for step in reversed(self.all_steps()):
      try:
        state, data = self.restore(step, state_shardings=state_shardings,
                                   like_state=like_state)
      except CorruptCheckpoint as e:
        bad.append(e)
        continue
      if bad:
        self._move_aside(bad, resumed=step)
      return step, state, data
    if bad:
      reasons = '; '.join(f'{e.step}: {e.reason}' for e in bad)
      raise UserError(f'no checkpoint in {self.directory} can be restored ({reasons}); '
                      'nothing was moved: to start over, move the checkpoints folder aside '
                      'or use a fresh --workdir')
    return None

  def _move_aside(self, bad: list, *, resumed: int) -> None:
    """Process 0 renames each bad step's folder into DIR/corrupt_checkpoints/ (never onto
    an earlier one there); the others wait for it, then all forget those steps."""
    root = os.path.join(os.path.dirname(self.directory), 'corrupt_checkpoints')
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      moved = []
      for e in bad:
        moved.append(_free_name(root, str(e.step)))
        os.rename(os.path.join(self.directory, str(e.step)), moved[-1])
      if len(bad) == 1:
        what = (f'checkpoint {bad[0].step} in {self.directory} cannot be restored '
                f'({bad[0].reason}); moved it to {moved[0]}')
      else:
        what = (f'checkpoints {", ".join(str(e.step) for e in bad)} in {self.directory} '
                'cannot be restored (' + '; '.join(f'{e.step}: {e.reason}' for e in bad) +
                f'); moved them to {", ".join(moved)}')
      print(f'warning: {what}; resuming from checkpoint {resumed}', file=sys.stderr,
            flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('rlhf_jax: corrupt checkpoints moved aside')
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
