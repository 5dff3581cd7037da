"""Checkpoints through orbax: the train state plus the data iterator's position.

Writes are atomic (orbax writes a temporary directory and renames it), so a run killed
at any point leaves only complete checkpoints; the newest one is where a rerun resumes.
"""
import os

import jax
import orbax.checkpoint as ocp

from rlhf_jax.errors import UserError


class Checkpointer:

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, *, state, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, *, state_shardings, like_state) -> tuple[object, dict]:
    """Restores onto the given shardings; `like_state` gives shapes and dtypes."""
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        like_state, state_shardings)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged directory
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f'checkpoint {step} in {self.directory} cannot be restored ({first}); '
                      'move it aside to resume from an earlier one') from None
    return restored.state, restored.data

  def close(self) -> None:
    self._manager.close()
