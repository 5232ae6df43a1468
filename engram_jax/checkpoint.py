"""Orbax checkpoints of the train state (parameters, optimizer state, routing biases, step)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the latest checkpoint under ``directory``; restores into a template state."""

    def __init__(self, directory: str | Path, max_to_keep: int = 1):
        self.mngr = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state) -> None:
        self.mngr.save(step, args=ocp.args.StandardSave(state))

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def restore_latest(self, template):
        """(state, step): the latest checkpoint restored into ``template``'s structure, or (template, 0)."""
        step = self.mngr.latest_step()
        if step is None:
            return template, 0
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        return self.mngr.restore(step, args=ocp.args.StandardRestore(abstract)), int(step)
