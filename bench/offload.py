"""Host-offloaded Engram tables vs device-resident ones (``--only offload``).

Tokens/s of the whole training loop (batch, host row refresh, step, host Adam) at the preset's
table size, and a bounded search for the largest table that still trains each way: table sizes
doubled from the preset's until a step fails (out of memory) or the doubling bound is reached
(then the figure is a lower bound, flagged in the config column).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench.common import Row
from engram_jax.config import ModelConfig, TrainConfig


def _with_offload(cfg: ModelConfig, offload: bool, scale: int = 1) -> ModelConfig:
    e = cfg.engram
    sizes = tuple(s * scale for s in e.table_sizes)
    return dataclasses.replace(cfg, engram=dataclasses.replace(e, offload=offload, table_sizes=sizes))


def step_seconds(cfg: ModelConfig, tcfg: TrainConfig, make_it, steps: int) -> float:
    """Median wall seconds of one training-loop iteration (blocking on each step's loss).

    Offloaded: next batch (rows prefetched in the worker) -> refresh -> step -> host Adam.
    Device-resident: next batch -> step. The first two iterations (compilation) are not timed.
    """
    from engram_jax.model import HybridLM
    from engram_jax.offload import HostTables
    from engram_jax.optim import TrainState, make_optimizer, make_steps

    model = HybridLM(cfg, rngs=nnx.Rngs(tcfg.seed))
    off = cfg.engram.offload
    store = HostTables(model, tcfg) if off else None
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    tx = make_optimizer(tcfg, clip=not off)
    state = TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32))
    train_step, _ = make_steps(gd, cfg, tcfg, tx)
    it = make_it(cfg, prefetch=4, post_fn=store.prefetch if off else None)
    times = []
    try:
        for i in range(steps + 2):
            t0 = time.perf_counter()
            batch = next(it)
            if off:
                rows = store.refresh(batch)
                state, m = train_step(state, batch)
                store.apply(rows, m.pop("memory_grad"))  # pulls the row gradients: a sync point
            else:
                state, m = train_step(state, batch)
            jax.block_until_ready(m["loss"])
            if i >= 2:
                times.append(time.perf_counter() - t0)
    finally:
        it.close()
    return statistics.median(times)


def is_out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure and nothing else.

    Host: ``MemoryError`` (numpy's array allocation error is a subclass). Device: XLA reports a
    failed allocation with the status RESOURCE_EXHAUSTED, which JAX raises as
    ``jax.errors.JaxRuntimeError`` with the status name leading the message (the exception carries
    no separate status code). Any other error, whatever its message says, is a bug to surface.
    """
    if isinstance(e, MemoryError):
        return True
    return isinstance(e, jax.errors.JaxRuntimeError) and str(e).startswith("RESOURCE_EXHAUSTED")


def _fits(cfg, tcfg, make_it) -> bool:
    try:
        step_seconds(cfg, tcfg, make_it, steps=1)
        return True
    except (MemoryError, jax.errors.JaxRuntimeError) as e:
        if is_out_of_memory(e):
            return False
        raise


def offload_rows(cfg: ModelConfig, tcfg: TrainConfig, make_it, tag: str, *, steps: int,
                 max_doublings: int) -> list[Row]:
    tokens = tcfg.batch_size * cfg.seq_len
    tcfg = dataclasses.replace(tcfg, engram_weight_decay=0.0)
    s_dev = step_seconds(_with_offload(cfg, False), tcfg, make_it, steps)
    s_off = step_seconds(_with_offload(cfg, True), tcfg, make_it, steps)
    table = cfg.param_counts()["engram_tables"]
    rows = [
        Row("offload_engram_table_params", tag, table, "params"),
        Row("device_resident_tokens_per_s", tag, tokens / s_dev, "tok/s"),
        Row("offloaded_tokens_per_s", tag, tokens / s_off, "tok/s"),
        Row("offloaded_over_device_tokens_per_s", tag, s_dev / s_off, "ratio", ratio=s_dev / s_off),
    ]
    for off in (False, True):
        best, scale, bounded = None, 1, True
        for _ in range(max_doublings + 1):
            c = _with_offload(cfg, off, scale)
            if not _fits(c, tcfg, make_it):
                bounded = False
                break
            best = c.param_counts()["engram_tables"]
            scale *= 2
        what = "offloaded" if off else "device_resident"
        note = f"{tag} (>= bound)" if bounded else tag
        rows.append(Row(f"largest_table_{what}", note, float("nan") if best is None else best,
                        "params"))
    return rows
