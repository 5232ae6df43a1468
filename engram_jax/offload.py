"""Host-offloaded Engram tables: a numpy row store with a lazy (row-wise) Adam.

docs/paper.md section 6 (Systems): addressing is a function of the token ids, so the rows a
batch needs can be fetched by the host ahead of use. With ``EngramConfig.offload`` the model holds
no table (``Engram`` keeps only the key its table would have been drawn from); ``HostTables`` holds
each layer's table [R, d_head] and its Adam moments as float32 numpy arrays, and

1. ``prefetch(batch)`` (in the BatchIterator's background thread, right after hashing) gathers
   ``batch["memory"] = {layer_id: [B, T, M] float32}`` and tags the batch with the store version;
2. ``refresh(batch)`` (main thread, just before the step) re-reads the rows that an update applied
   after the prefetch touched, so a batch always sees every earlier step's update (exactness);
3. the train step (``optim.make_steps``) returns d loss / d memory, already scaled by the global
   gradient clip, whose norm includes the tables' aggregated row gradients;
4. ``apply(rows, grads)`` scatter-adds row gradients (``np.add.at``) and takes a lazy Adam step
   on the rows the batch touched: the Engram group's schedule (``engram_lr_mult`` x the lr
   schedule of ``optim.schedule``), bias correction with the global step, no weight decay.

Lazy Adam equals optax ``adamw`` on the full table for every row that gets a gradient in every
step; a row absent from a step keeps its parameters and moments here, while dense Adam would still
move it by its decaying first moment. ``lazy_adam`` is the same rule as an optax transform on a
dense table (rows with an all-zero gradient are left alone), the reference the tests compare with.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engram_jax.config import ModelConfig, TrainConfig

EPS = 1e-8  # optax.adam's default eps (eps_root 0)


def table_init(key_data: tuple[int, ...], rows: int, d_head: int, std: float) -> np.ndarray:
    """The table the device-resident model would draw from the same key, computed on the host CPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        key = jax.random.wrap_key_data(jnp.asarray(key_data, jnp.uint32))
        return np.array(std * jax.random.normal(key, (rows, d_head), jnp.float32))  # writable


class HostTables:
    """Engram tables, Adam moments and the lazy Adam step, all in host memory.

    Attributes:
      tables, m, v: {layer_id: float32 [R, d_head]}; offsets: {layer_id: int64 [G]} (per-head
      row offsets in the flat table); version: updates applied so far (= Adam step count).
    """

    def __init__(self, model, tcfg: TrainConfig):
        cfg: ModelConfig = model.cfg
        e = cfg.engram
        if e is None or not e.offload:
            raise ValueError("HostTables needs a model built with engram.offload=True")
        if tcfg.engram_weight_decay != 0.0:
            raise ValueError("offloaded tables use Adam without weight decay: set "
                             "engram_weight_decay=0 or engram.offload=False")
        self.d_head, self.d_mem = e.d_head, e.d_mem
        from engram_jax.optim import schedule

        self.lr = schedule(tcfg, tcfg.lr * tcfg.engram_lr_mult)
        # The row step is ``lazy_adam``'s own arithmetic, compiled by XLA for the host CPU: a numpy
        # transcription rounds differently (XLA contracts a*b + c into an fma, divides by a scalar
        # through its reciprocal, evaluates the schedule compiled; numpy's 1 - float32(0.9) is
        # 0.100000024, optax's float32(1 - 0.9) is 0.1), and training amplifies a last-bit
        # difference in a table row to a visible one within a few steps.
        self._row_step = jax.jit(functools.partial(_host_row_step, self.lr, tcfg.b1, tcfg.b2,
                                                   tcfg.grad_clip))
        self._cpu = jax.devices("cpu")[0]
        self.tables, self.m, self.v, self.offsets, self.last_update = {}, {}, {}, {}, {}
        for blk in model.blocks:
            if blk.engram is None:
                continue
            eng, lid = blk.engram, blk.layer_id
            self.tables[lid] = table_init(eng.table_key, eng.rows, e.d_head, eng.table_std)
            self.m[lid] = np.zeros_like(self.tables[lid])
            self.v[lid] = np.zeros_like(self.tables[lid])
            self.offsets[lid] = np.asarray(eng.offsets, np.int64)
            self.last_update[lid] = np.zeros(eng.rows, np.int64)
        self.version = 0

    def size(self) -> int:
        """Parameters held here (the tables; moments are optimizer state)."""
        return int(sum(t.size for t in self.tables.values()))

    def nbytes(self) -> int:
        """Host bytes of tables + moments + version stamps."""
        return int(sum(a.nbytes for d in (self.tables, self.m, self.v, self.last_update)
                       for a in d.values()))

    def save(self, directory, step: int) -> None:
        """Write tables, moments and version stamps for ``step`` (atomically; keeps the latest)."""
        import os
        from pathlib import Path

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"version": np.asarray(self.version)}
        for name in ("tables", "m", "v", "last_update"):
            arrays.update({f"{name}/{lid}": a for lid, a in getattr(self, name).items()})
        tmp = d / f".{step}.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, d / f"{step}.npz")
        for old in d.glob("*.npz"):
            if old.stem != str(step):
                old.unlink()

    def restore(self, directory, step: int) -> None:
        """Load the state saved for ``step``; a missing file is an error (the run cannot resume)."""
        from pathlib import Path

        path = Path(directory) / f"{step}.npz"
        if not path.exists():
            raise ValueError(f"{path} is missing: the host-offloaded Engram tables of the "
                             f"checkpoint at step {step} were not saved; start a new run")
        with np.load(path) as z:
            for name in ("tables", "m", "v", "last_update"):
                for lid in getattr(self, name):
                    getattr(self, name)[lid] = np.array(z[f"{name}/{lid}"])
            self.version = int(z["version"])

    def rows(self, hash_ids: dict) -> dict[int, np.ndarray]:
        """Flat row ids {layer_id: int64 [B, T, G]} from hash ids {layer_id: [B, T, G]}."""
        return {lid: np.asarray(hash_ids[lid], np.int64) + off for lid, off in self.offsets.items()}

    def gather(self, rows: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Memory vectors {layer_id: float32 [B, T, M]} of the current tables."""
        out = {}
        for lid, r_BxTxG in rows.items():
            B, T = r_BxTxG.shape[:2]
            out[lid] = self.tables[lid][r_BxTxG].reshape(B, T, self.d_mem)
        return out

    def prefetch(self, batch: dict) -> dict:
        """Add ``memory`` and a host-side tag to a batch (safe to call from the prefetch thread)."""
        version = self.version  # read before the gather: updates after it are caught by refresh
        rows = self.rows(batch["hash_ids"])
        batch["memory"] = self.gather(rows)
        batch["offload_host"] = (version, rows)
        return batch

    def refresh(self, batch: dict) -> dict[int, np.ndarray]:
        """Bring a prefetched batch's memory up to date; pops and returns its row ids.

        Rows updated after the batch was prefetched (version stamp above the batch's) are read
        again, so the step sees exactly the rows a synchronous lookup would.
        """
        if "offload_host" not in batch:
            rows = self.rows(batch["hash_ids"])
            batch["memory"] = self.gather(rows)
            return rows
        version, rows = batch.pop("offload_host")
        if self.version > version:
            for lid, r_BxTxG in rows.items():
                r_N = r_BxTxG.reshape(-1)
                stale_N = self.last_update[lid][r_N] > version
                if stale_N.any():
                    mem_NxH = batch["memory"][lid].reshape(-1, self.d_head)  # a view
                    mem_NxH[stale_N] = self.tables[lid][r_N[stale_N]]
        return rows

    def apply(self, rows: dict[int, np.ndarray], grads) -> None:
        """One lazy Adam step from the train step's ``memory_grad``.

        ``grads``: ``(g_mem, g_norm)``, d loss / d memory {layer_id: [B, T, M]} before the clip and
        the global gradient norm: the rows are summed first and then clipped, in the order of
        ``optax.clip_by_global_norm`` on a dense table gradient (clipping each lookup before the
        sum rounds differently); or a dict of already clipped gradients (no clip here).
        The row gradients are summed per row (``np.add.at``, in the order of XLA's scatter-add),
        then the clip and ``adam_rows`` run on the U touched rows, padded to the N lookups of the
        batch with zero-gradient rows (left alone) so that it compiles once per batch shape.
        """
        g_norm = np.float32(0.0)  # 0: no clip (the gradients came clipped)
        if isinstance(grads, tuple):
            grads, g_norm = grads[0], np.float32(grads[1])
        t = self.version + 1
        count = jax.device_put(np.int32(self.version), self._cpu)
        g_norm = jax.device_put(g_norm, self._cpu)
        for lid, r_BxTxG in rows.items():
            g_NxH = np.asarray(grads[lid], np.float32).reshape(-1, self.d_head)
            u_U, inv_N = np.unique(r_BxTxG.reshape(-1), return_inverse=True)
            N, U = g_NxH.shape[0], u_U.size
            if U == 0:
                continue
            g_pad = np.zeros((N, self.d_head), np.float32)
            np.add.at(g_pad, inv_N, g_NxH)
            padded = []
            for a in (self.tables[lid], self.m[lid], self.v[lid]):
                x = np.zeros((N, self.d_head), np.float32)
                x[:U] = a[u_U]
                padded.append(jax.device_put(x, self._cpu))
            p, m, v = self._row_step(*padded, jax.device_put(g_pad, self._cpu), count, g_norm)
            self.tables[lid][u_U] = np.asarray(p)[:U]
            self.m[lid][u_U] = np.asarray(m)[:U]
            self.v[lid][u_U] = np.asarray(v)[:U]
            self.last_update[lid][u_U] = t  # before the version moves: see prefetch/refresh
        self.version = t


def table_grad_sqnorm(rows_N: jax.Array, g_NxH: jax.Array) -> jax.Array:
    """Squared norm of the dense table gradient that scatter-adding g at rows would give.

    Sorts the N row ids and sums the rows of equal ids, so nothing of the table's size is built.
    """
    N = rows_N.shape[0]
    order = jnp.argsort(rows_N)
    r = rows_N[order]
    seg = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(r[1:] != r[:-1], dtype=jnp.int32)])
    agg = jax.ops.segment_sum(g_NxH[order].astype(jnp.float32), seg, num_segments=N,
                              indices_are_sorted=True)
    return jnp.sum(agg * agg)


def adam_scalars(learning_rate: optax.Schedule, b1: float, b2: float, count):
    """The learning rate and bias corrections 1 - b1^t, 1 - b2^t of update t = count + 1."""
    t = count + 1
    return learning_rate(count), 1 - b1**t, 1 - b2**t


def adam_rows(g, m, v, lr, bc1, bc2, b1: float, b2: float):
    """Lazy Adam on rows [..., H]: (update, m, v). A row whose gradient is all zero keeps its
    moments and gets a zero update. The arithmetic of both ``lazy_adam`` and ``HostTables.apply``
    (optax's: moments (1 - b) g + b m with python-float b, no weight decay)."""
    hit = jnp.any(g != 0, axis=-1, keepdims=True)
    m = jnp.where(hit, (1 - b1) * g + b1 * m, m)
    v = jnp.where(hit, (1 - b2) * (g * g) + b2 * v, v)
    upd = (m / bc1) / (jnp.sqrt(v / bc2) + EPS)
    return jnp.where(hit, -lr * upd, 0.0), m, v


def _host_row_step(learning_rate, b1: float, b2: float, max_norm: float, p, m, v, g, count,
                   g_norm):
    """``HostTables``' step on gathered rows: new (rows, m, v). The clip is
    ``optax.clip_by_global_norm``'s expression (skipped for g_norm = 0), the add
    ``optax.apply_updates``'."""
    if max_norm > 0:
        clip = (g_norm == 0) | (g_norm < max_norm)
        g = jax.lax.select(clip, g, (g / g_norm) * max_norm)
    lr, bc1, bc2 = adam_scalars(learning_rate, b1, b2, count)
    upd, m, v = adam_rows(g, m, v, lr, bc1, bc2, b1, b2)
    return p + upd, m, v


def lazy_adam(learning_rate: optax.Schedule, b1: float, b2: float) -> optax.GradientTransformation:
    """Row-wise lazy Adam on a dense [R, H] table: rows with an all-zero gradient are untouched.

    The reference for ``HostTables.apply``; the global count drives bias correction and the lr.
    """

    def init(params):
        return (jnp.zeros([], jnp.int32), optax.tree.zeros_like(params),
                optax.tree.zeros_like(params))

    def update(g, state, params=None):
        del params
        count, mu, nu = state
        lr, bc1, bc2 = adam_scalars(learning_rate, b1, b2, count)
        leaves, treedef = jax.tree.flatten(g)
        out = [adam_rows(g_, m_, v_, lr, bc1, bc2, b1, b2) for g_, m_, v_ in
               zip(leaves, treedef.flatten_up_to(mu), treedef.flatten_up_to(nu), strict=True)]
        upd, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return upd, (count + 1, mu, nu)

    return optax.GradientTransformation(init, update)


def reference_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """``optim.make_optimizer`` with the table group's adamw replaced by ``lazy_adam``.

    Device-resident training with this optimizer is what offloaded training computes.
    """
    from engram_jax.optim import param_labels, schedule

    def adamw(peak: float, wd: float):
        return optax.adamw(schedule(tcfg, peak), b1=tcfg.b1, b2=tcfg.b2, weight_decay=wd)

    groups = optax.multi_transform(
        {"decay": adamw(tcfg.lr, tcfg.weight_decay), "no_decay": adamw(tcfg.lr, 0.0),
         "engram_table": lazy_adam(schedule(tcfg, tcfg.lr * tcfg.engram_lr_mult), tcfg.b1,
                                   tcfg.b2)},
        param_labels,
    )
    if tcfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), groups)
    return groups
