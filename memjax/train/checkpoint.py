"""Saving and restoring the train state with an orbax CheckpointManager."""

import os

import jax
import orbax.checkpoint as ocp

from memjax.train.state import TrainState


class Checkpointer:
  """Keeps the newest checkpoints of a run in one directory, one per step.

  Saves run in the background: `save` returns once the arrays are copied off
  the state, and `close` waits for the writes to finish.

  Args:
    directory: Where the step folders live; created if missing.
    save_every: Save when the step is a multiple of this (and when forced).
    keep: Number of checkpoints kept; older ones are deleted.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int):
    if save_every < 1 or keep < 1:
      raise ValueError(
          f"save_every and keep must be >= 1, got save_every={save_every}, "
          f"keep={keep}."
      )
    self._save_every = save_every
    # The decision of when to save is made in `save`, so orbax's own interval
    # policy (which also saves the first step it sees) is not used.
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )

  def latest_step(self) -> int | None:
    """Returns the newest saved step, or None if there is none."""
    return self._manager.latest_step()

  def restore(self, state: TrainState, step: int | None = None) -> TrainState:
    """Restores a checkpoint into the structure of `state`.

    The arrays are read straight into the shardings of `state`'s arrays,
    whatever mesh the checkpoint was saved from: a run saved on one mesh
    resumes on another (e.g. `create_train_state(..., mesh=other_mesh)`).

    Args:
      state: A freshly created state; gives the tree structure, shapes,
        dtypes and shardings of the result.
      step: The step to restore; the newest one if None.

    Returns:
      The restored state, or `state` itself if there is no checkpoint.
    """
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return state
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def save(self, state: TrainState, *, step: int, force: bool = False) -> bool:
    """Saves `state` as `step` if it is due.

    Args:
      state: The state after `step` updates.
      step: The checkpoint's step number.
      force: Save even if `step` is not a multiple of `save_every`.

    Returns:
      Whether a save was started; never twice for the same step.
    """
    due = force or step % self._save_every == 0
    if not due or step == self._manager.latest_step():
      return False
    return self._manager.save(
        step, args=ocp.args.StandardSave(state), force=True
    )

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
