"""A trial's device mesh and the shardings of its state and batches (JAX).

``Parallel(MeshShape)`` builds the ``jax.sharding.Mesh`` (axes ``data``, ``fsdp``, ``expert``)
and turns ``rules.spec`` into ``NamedSharding``s: of the train state (parameters, optimizer
moments and gradients split like their parameters; routing biases and counters replicated), of a
batch (its sequences split over every axis) and of the metrics (replicated). The train and eval
steps are jitted with those shardings as inputs and outputs, and XLA inserts the collectives the
shardings imply (GSPMD): all-gathers of FSDP weights, reduce-scatters and all-reduces of
gradients, the exchange of tokens with the devices of their experts and of table rows with the
devices that hold them.

One device is the mesh (1, 1, 1): every spec is then fully replicated over that one device and
the program is the single-device one.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax.parallel import rules
from engram_jax.parallel.mesh import AXES, MeshShape, check_mesh


def build_mesh(shape: MeshShape, devices=None) -> Mesh:
    """The mesh of ``shape`` over ``devices`` (default: every device JAX sees, or the first one
    for a one-device mesh). Raises ValueError when the sizes do not match."""
    if devices is None:
        devices = jax.devices()[:1] if shape.size == 1 else jax.devices()
    if len(devices) != shape.size:
        raise ValueError(f"bad mesh: the mesh {shape} uses {shape.size} devices but "
                         f"{len(devices)} were given")
    if shape.size == 1:
        grid = np.array(devices, dtype=object).reshape(shape.shape)
    else:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape.shape, devices=devices,
                                             allow_split_physical_axes=True)
    return Mesh(grid, AXES)


class Parallel:
    """The mesh of one trial and the shardings of everything that crosses the jit boundary.

    Args:
      shape: the mesh's ``MeshShape`` (``TrainConfig.mesh``).
      cfg, tcfg: the trial's configs, checked against the mesh and the devices first
        (``check_mesh``: ValueError naming every problem).
      devices: the devices to use (default: as ``build_mesh``).
    """

    def __init__(self, shape: MeshShape, cfg=None, tcfg=None, *, devices=None):
        self.shape = shape
        if cfg is not None:
            check_mesh(shape, cfg, tcfg, devices=len(devices) if devices else jax.device_count())
        self.mesh = build_mesh(shape, devices)

    def _spec(self, names: list[str], shape: tuple[int, ...]) -> PartitionSpec:
        return PartitionSpec(*rules.spec(names, shape, self.shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding:
        """Every leaf of a batch has the sequences first: split over ``RULES['batch']``."""
        return NamedSharding(self.mesh, self._spec(["batch"], (self.shape.batch_ways,)))

    def shardings(self, tree):
        """A ``NamedSharding`` for every array leaf of ``tree`` (a train state, parameters,
        gradients, optimizer state), by the leaf's path (``rules.spec``)."""
        def one(path, x):
            return NamedSharding(self.mesh, self._spec(rules.path_names(path), np.shape(x)))

        return jax.tree_util.tree_map_with_path(one, tree)

    def put(self, tree):
        """``tree`` placed on the mesh with ``shardings(tree)``."""
        return jax.device_put(tree, self.shardings(tree))

    def put_batch(self, batch: dict) -> dict:
        """A host batch (numpy, the global batch) as global arrays split over the mesh. Each
        process copies only the slices its own devices hold, so every process may pass the same
        global batch."""
        sh = self.batch_sharding

        def one(x):
            x = np.asarray(x)
            if jax.process_count() == 1:
                return jax.device_put(x, sh)
            return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

        return jax.tree.map(one, batch)

    def local_rows(self, batch_size: int) -> np.ndarray:
        """The sequences of a batch of ``batch_size`` that this process's devices hold."""
        index_map = self.batch_sharding.addressable_devices_indices_map((batch_size,))
        rows = np.zeros(batch_size, bool)
        for idx in index_map.values():
            rows[idx[0] if idx else slice(None)] = True
        return np.flatnonzero(rows)

    def local_hash_fn(self, hash_fn, batch_size: int):
        """``hash_fn`` computing only this process's sequences of a batch of ``batch_size``
        (zeros elsewhere: never copied to a device), so that each host hashes what it feeds;
        ``hash_fn`` itself in a single process. The n-gram hashes of a sequence depend on that
        sequence alone."""
        if hash_fn is None or jax.process_count() == 1:
            return hash_fn
        rows = self.local_rows(batch_size)

        def local(ids_BxT: np.ndarray) -> dict:
            part = hash_fn(ids_BxT[rows])
            out = {}
            for lid, h in part.items():
                full = np.zeros((ids_BxT.shape[0], *h.shape[1:]), h.dtype)
                full[rows] = h
                out[lid] = full
            return out

        return local

    @staticmethod
    def fetch(tree):
        """Host (numpy) values of a tree of arrays replicated over the mesh (metrics, losses):
        ``jax.device_get``; on a mesh over several processes each reads its own replica."""
        def one(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return x.addressable_data(0)
            return x

        return jax.device_get(jax.tree.map(one, tree))

    def pad_tables(self, params):
        """Engram and OverEncoding tables with zero rows appended up to ``rules.padded_rows``, so
        their rows split evenly over the mesh (unchanged on one device)."""
        def one(path, x):
            names = rules.path_names(path)
            if not rules.is_table(names, np.ndim(x)):
                return x
            rows = rules.padded_rows(x.shape[0], self.shape)
            if rows == x.shape[0]:
                return x
            return jax.numpy.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))

        return jax.tree_util.tree_map_with_path(one, params)

    def jit_steps(self, train_step, eval_step, state):
        """``train_step(state, batch) -> (state, metrics)`` and ``eval_step(state, batch) ->
        loss`` jitted with the shardings of ``state`` (a template), of a batch and replicated
        metrics; the state is donated."""
        st, b, r = self.shardings(state), self.batch_sharding, self.replicated
        train = jax.jit(train_step, in_shardings=(st, b), out_shardings=(st, r),
                        donate_argnums=(0,))
        evaluate = jax.jit(eval_step, in_shardings=(st, b), out_shardings=r)
        return train, evaluate

    def per_device_bytes(self, tree) -> int:
        """Bytes of ``tree``'s arrays on the most loaded device (of this process)."""
        per: dict = {}
        for x in jax.tree.leaves(tree):
            for s in x.addressable_shards:
                per[s.device] = per.get(s.device, 0) + s.data.nbytes
        return max(per.values(), default=0)
