"""Orbax checkpoints of the train state (parameters, optimizer state, routing biases, step).

Saved in the background (orbax's asynchronous save; ``wait`` blocks until it is on disk). On a
device mesh each process writes the shards its devices hold, nothing gathered, and a restore
reads each array straight into the shardings of the state it restores into: a run saved on one
mesh resumes on another. Engram and OverEncoding tables are stored with their rows padded to the
mesh's device count (``parallel.rules.padded_rows``); restored on a mesh of another size, the
zero padding rows are dropped or added.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec


class Checkpointer:
    """Keeps the latest checkpoint under ``directory``; restores into a template state."""

    def __init__(self, directory: str | Path, max_to_keep: int = 1):
        self.directory = Path(directory).absolute()
        self.mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state) -> None:
        self.mngr.save(step, args=ocp.args.StandardSave(state))

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def restore_latest(self, template):
        """(state, step): the latest checkpoint restored into ``template``'s structure and
        shardings, or (template, 0)."""
        step = self.mngr.latest_step()
        if step is None:
            return template, 0
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        saved = _saved_shapes(self.directory / str(step) / "default")
        resized = {}

        def as_saved(path, a):
            from engram_jax.parallel.rules import is_table, path_names

            names = path_names(path)
            shape = saved.get("/".join(names))
            if shape is None or shape == tuple(a.shape) or not is_table(names, len(a.shape)):
                return a  # as the template (orbax names any other mismatch)
            resized["/".join(names)] = a
            return jax.ShapeDtypeStruct(shape, a.dtype, sharding=_rows_sharding(a.sharding, shape))

        state = self.mngr.restore(step, args=ocp.args.StandardRestore(
            jax.tree_util.tree_map_with_path(as_saved, abstract)))
        if resized:
            from engram_jax.parallel.rules import path_names

            def fit(path, x):
                a = resized.get("/".join(path_names(path)))
                return x if a is None else _fit_rows(x, a)

            state = jax.tree_util.tree_map_with_path(fit, state)
        return state, int(step)


def _saved_shapes(item_dir: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every array of a saved state, by its path ('params/blocks/1/engram/table')."""
    from engram_jax.parallel.rules import path_names

    meta = ocp.StandardCheckpointHandler().metadata(item_dir)
    tree = getattr(meta, "tree", meta)
    return {"/".join(path_names(p)): tuple(m.shape)
            for p, m in jax.tree_util.tree_leaves_with_path(tree) if hasattr(m, "shape")}


def _rows_sharding(sharding, shape):
    """``sharding`` where it splits ``shape``'s rows evenly, else replicated over its mesh."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    axes = spec[0] if isinstance(spec[0], tuple) else (() if spec[0] is None else (spec[0],))
    ways = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
    return sharding if shape[0] % ways == 0 else NamedSharding(sharding.mesh, PartitionSpec())


def _fit_rows(x: jax.Array, a: jax.ShapeDtypeStruct) -> jax.Array:
    """A table restored with another mesh's padding, cut or zero-padded to ``a``'s rows."""
    rows = a.shape[0]
    x = x[:rows] if x.shape[0] >= rows else jax.numpy.pad(
        x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))
    return jax.device_put(x, a.sharding)
