"""The accelerator check: the train step of the GPU budgets with each option on and off.

    python -m bench.gpucheck --out results/bench        (make bench-gpu)

For each GPU budget (``gpu-s``, ``gpu-m``, their batch sizes, bf16 compute) it times the jitted
train step a trial runs (``optim.make_steps``, on a device-resident batch of random tokens and
hash ids) under these option sets, at rho = 1.0 (pure MoE) and, for ``base`` and ``all``, at
rho = 0.8 (an iso-parameter hybrid with the same active FLOPs):

- ``base``: today's GPU program: capacity dispatch (factor 1.25), XLA's attention, full logits;
- ``cudnn``: cuDNN's fused attention (``ModelConfig.attention``);
- ``dropless``: dropless MoE on tiled grouped matmuls (``moe.dispatch``, ``grouped_matmul=tiles``);
- ``dropless-ragged``: dropless MoE on ``jax.lax.ragged_dot`` and its own gradient;
- ``chunked-loss``: the LM head and cross-entropy in chunks (``TrainConfig.loss_chunk``);
- ``all``: cuDNN attention, dropless (tiles) and the chunked loss together.

Rows (``results/bench/<device>.csv``, merged as ``make bench`` merges): ``train_step_ms``,
``train_tokens_per_s``, ``model_flops_per_token`` (the useful FLOPs, as MFU counts),
``mfu`` (against the matmul peak measured in the same run, ``reference_peak_tflops``) and
``mfu_rated`` (against the chip's rated dense bf16 peak, ``rated_peak_tflops``,
``engram_jax.peaks``), each tagged ``<budget>@rho=<rho>/<option>``; and the targets: ``mfu_rated``
at least 0.40 at the largest budget (every option set, so the table shows which reach it), the
hybrid at least 0.97x the pure MoE's tokens/s (``base`` and ``all``), dropless at least as fast
as capacity (``dropless`` and ``dropless-ragged`` over ``base``; ``all`` over ``cudnn`` +
chunked loss is not separated). A configuration that fails to compile or run (out of memory,
an unsupported kernel) gets an ``error`` row naming why, and the run goes on.

MFU is recomputable from the rows: train_tokens_per_s x model_flops_per_token /
(rated_peak_tflops x 1e12), rows of the same ``run``.

Time: about a minute per configuration on an H100/H200 (mostly compilation), 16 in all;
``--budgets`` and ``--options`` run a part (the rows merge into the same CSV).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import (Results, Row, rated_mfu_row, rated_peak_for_run, reference_peak,
                          target_row, timeit)

GPU_BUDGETS = ("gpu-s", "gpu-m")
LOSS_CHUNK = 8192  # positions per chunk of the chunked loss: [8192, V] float32 logits at a time
OPTIONS: dict[str, tuple[dict, dict]] = {  # name: (model overrides, train overrides)
    "base": ({"attention": "xla"}, {}),
    "cudnn": ({"attention": "cudnn"}, {}),
    "dropless": ({"attention": "xla", "moe.dispatch": "dropless"}, {}),
    "dropless-ragged": ({"attention": "xla", "moe.dispatch": "dropless",
                         "moe.grouped_matmul": "ragged"}, {}),
    "chunked-loss": ({"attention": "xla"}, {"loss_chunk": LOSS_CHUNK}),
    "all": ({"attention": "cudnn", "moe.dispatch": "dropless"}, {"loss_chunk": LOSS_CHUNK}),
}
HYBRID_OPTIONS = ("base", "all")  # also timed at rho = 0.8
MFU_TARGET, HYBRID_TARGET, DROPLESS_TARGET = 0.40, 0.97, 1.0


def step_inputs(budget: str, rho: float, option: str, dtype: str, batch_size: int | None = None):
    """(cfg, tcfg, batch) of a budget at ``rho`` with ``option``'s overrides."""
    from bench.common import budget_step_inputs

    cfg, tcfg, batch = budget_step_inputs(budget, rho)
    model_o, train_o = OPTIONS[option]
    cfg = dataclasses.replace(cfg.with_overrides(model_o), dtype=dtype)
    tcfg = dataclasses.replace(tcfg, **train_o)
    if batch_size is not None and batch_size != tcfg.batch_size:
        tcfg = dataclasses.replace(tcfg, batch_size=batch_size)
        batch = jax.tree.map(lambda x: x[:batch_size], batch)
    return cfg, tcfg, batch


def time_step(cfg, tcfg, batch, *, repeats: int, inner: int) -> float:
    """Median seconds of one train step (compiled and warmed up first)."""
    from flax import nnx

    from engram_jax.model import HybridLM
    from engram_jax.optim import TrainState, make_optimizer, make_steps

    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tcfg)
    holder = {"state": TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32))}
    train_step, _ = make_steps(graphdef, cfg, tcfg, tx)

    def step():
        holder["state"], m = train_step(holder["state"], batch)
        return m["loss"]

    return timeit(step, repeats=repeats, warmup=2, inner=inner)


def run(budgets=GPU_BUDGETS, options=tuple(OPTIONS), *, repeats: int = 5, inner: int = 3,
        batch_size: int | None = None, dtype: str | None = None,
        peak_n: int = 8192) -> Results:
    from engram_jax.counting import flops_per_token

    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    res = Results()
    peak = reference_peak(dtype, cpu_matmul_n=(min(peak_n, 1024),)) \
        if jax.default_backend() == "cpu" else _measured_peak(dtype, peak_n)
    rated = rated_peak_for_run(dtype)
    res.add(Row("reference_peak_tflops", f"run:{res.run_id}", peak.flops / 1e12, "TFLOP/s"))
    res.notes.append(f"measured peak: {peak.label} = {peak.flops / 1e12:.4g} TFLOP/s")
    if rated is not None:
        res.add(Row("rated_peak_tflops", f"run:{res.run_id}", rated.flops / 1e12, "TFLOP/s"))
        res.notes.append(f"rated peak: {rated.chip} {dtype} {rated.flops / 1e12:.4g} TFLOP/s "
                         f"({rated.source})")
    else:
        res.notes.append(f"no rated peak for {jax.devices()[0].device_kind} {dtype}: mfu_rated "
                         "left out")
    largest = budgets[-1] if budgets else None
    for budget in budgets:
        tps: dict[tuple[float, str], float] = {}
        for option in options:
            for rho in ((1.0, 0.8) if option in HYBRID_OPTIONS else (1.0,)):
                tag = f"{budget}@rho={rho}/{option}"
                t0 = time.perf_counter()
                try:
                    cfg, tcfg, batch = step_inputs(budget, rho, option, dtype, batch_size)
                    s = time_step(cfg, tcfg, batch, repeats=repeats, inner=inner)
                except Exception as e:  # noqa: BLE001 - one configuration failing is a result
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    res.add(Row("error", tag, float("nan"), msg))
                    res.notes.append(f"{tag}: {msg}")
                    continue
                B, T = tcfg.batch_size, cfg.seq_len
                fpt = flops_per_token(cfg)
                tps[(rho, option)] = B * T / s
                m = tps[(rho, option)] * fpt / peak.flops
                res.add(Row("train_step_ms", tag, s * 1e3, "ms"),
                        Row("train_tokens_per_s", tag, B * T / s, "tok/s"),
                        Row("model_flops_per_token", tag, fpt, "FLOP"),
                        Row("mfu", tag, m, "fraction", ratio=m))
                r = rated_mfu_row(tag, B * T / s, fpt, rated)
                if r is not None:
                    if budget == largest:
                        r = target_row("mfu_rated", tag, r.value, ">=", MFU_TARGET,
                                       unit="fraction")
                    res.add(r)
                res.notes.append(f"{tag}: {s * 1e3:.1f} ms/step ({time.perf_counter() - t0:.0f} s "
                                 "with compilation)")
        for option in HYBRID_OPTIONS:
            if (1.0, option) in tps and (0.8, option) in tps:
                res.add(target_row("hybrid_over_moe_tokens_per_s", f"{budget}/{option}",
                                   tps[(0.8, option)] / tps[(1.0, option)], ">=", HYBRID_TARGET))
        for option in ("dropless", "dropless-ragged"):
            if (1.0, option) in tps and (1.0, "base") in tps:
                res.add(target_row("dropless_over_capacity_tokens_per_s", f"{budget}@rho=1.0/{option}",
                                   tps[(1.0, option)] / tps[(1.0, "base")], ">=", DROPLESS_TARGET))
    return res


def _measured_peak(dtype: str, n: int):
    from bench.common import Peak, device_kind, matmul_peak

    f = matmul_peak(n, jnp.dtype(dtype))
    return Peak(f, f"{dtype} matmul {n}^3 measured in this run on {device_kind()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpucheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench", help="directory of the CSV")
    ap.add_argument("--budgets", default=",".join(GPU_BUDGETS),
                    help="comma-separated budgets, smallest first (default gpu-s,gpu-m)")
    ap.add_argument("--options", default=",".join(OPTIONS),
                    help=f"comma-separated option sets of {', '.join(OPTIONS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--batch-size", type=int, help="override the budgets' batch size (tests)")
    a = ap.parse_args(argv)
    options = tuple(a.options.split(","))
    bad = [o for o in options if o not in OPTIONS]
    if bad:
        ap.error(f"unknown option sets {bad}; known: {', '.join(OPTIONS)}")
    if jax.default_backend() == "cpu":
        print("warning: no accelerator; this check is meant for a GPU (CPU rows are written to "
              "cpu.csv)", file=sys.stderr)
    from engram_jax.train import _git_commit

    res = run(tuple(a.budgets.split(",")), options, repeats=a.repeats, inner=a.inner,
              batch_size=a.batch_size)
    path = res.write(Path(a.out), _git_commit())
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    for n in res.notes:
        print(n)
    print(res.table())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
