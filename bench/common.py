"""Timing, peaks and result rows shared by the benchmark parts."""

from __future__ import annotations

import csv
import datetime
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp

# bf16 dense matmul peak measured with JAX on the H100 (8192^3, median of repeats).
H100_BF16_PEAK_FLOPS = 664e12
COLUMNS = ("name", "config", "value", "unit", "target", "ratio", "status", "run", "device",
           "backend", "jax_version", "git_commit", "date")


def device_kind() -> str:
    return jax.devices()[0].device_kind


def device_slug() -> str:
    """File-name form of the device kind, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind().lower()).strip("-") or "unknown"


def timeit(fn: Callable[[], object], *, repeats: int, warmup: int = 1, inner: int = 1) -> float:
    """Median seconds of one call of ``fn`` (which returns jax values) over ``repeats`` samples.

    Each sample runs ``inner`` calls back to back and blocks on the last result, so dispatch
    overlaps compute as it does in a training loop; warm-up calls (compilation) are not timed.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def matmul_peak(n: int, dtype, repeats: int = 5) -> float:
    """Achieved FLOP/s of an n^3 matmul (random inputs passed as jit arguments)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    return 2.0 * n**3 / timeit(lambda: f(a, b), repeats=repeats, warmup=2)


@dataclass
class Peak:
    """The FLOP/s that MFU and achieved/peak ratios are taken against, and where it came from."""

    flops: float
    label: str


def reference_peak(dtype: str, *, cpu_matmul_n: tuple[int, ...]) -> Peak:
    """GPU: the measured H100 bf16 peak (only valid on an H100); CPU: the best f32 matmul of the
    sizes ``cpu_matmul_n``, measured now."""
    kind = device_kind().lower()
    if jax.default_backend() == "gpu" and "h100" in kind and dtype == "bfloat16":
        return Peak(H100_BF16_PEAK_FLOPS, "H100 bf16 matmul 664 TFLOP/s (measured, gpu README)")
    if jax.default_backend() == "cpu":
        f, n = max((matmul_peak(n, jnp.float32), n) for n in cpu_matmul_n)
        return Peak(f, f"this CPU's best f32 matmul of n = {cpu_matmul_n} (n = {n}) measured in "
                       "this run")
    f = matmul_peak(8192, jnp.dtype(dtype))
    return Peak(f, f"{dtype} matmul 8192^3 measured in this run on {device_kind()}")


def rated_peak_for_run(dtype: str):
    """The rated dense peak of this device for ``dtype`` (``engram_jax.peaks``), or None."""
    from engram_jax.peaks import rated_peak

    return rated_peak(device_kind(), dtype)


def rated_mfu_row(tag: str, tokens_per_s: float, flops_per_token: float, rated,
                  n_devices: int = 1) -> Row | None:
    """``mfu_rated``: model FLOP/s per device over the chip's rated dense peak (None without a
    rated peak). Recomputable from the CSV: train_tokens_per_s x model_flops_per_token /
    (rated_peak_tflops x 1e12) of the same run."""
    if rated is None:
        return None
    m = tokens_per_s / n_devices * flops_per_token / rated.flops
    return Row("mfu_rated", tag, m, "fraction", ratio=m)


# Rows a run writes once, holding the peaks its ratios are taken against (config ``run:<run>``).
PEAK_ROWS = ("reference_peak_tflops", "rated_peak_tflops")


@dataclass
class Row:
    name: str
    config: str
    value: float
    unit: str
    target: str = ""
    ratio: float = math.nan
    status: str = "n/a"


def check(value: float, op: str, bound: float) -> str:
    """pass/fail of ``value op bound`` (op is "<=" or ">="); n/a for non-finite values."""
    if not math.isfinite(value):
        return "n/a"
    ok = value <= bound if op == "<=" else value >= bound
    return "pass" if ok else "fail"


def target_row(name: str, config: str, ratio: float, op: str, bound: float, *, value=None,
               unit: str = "ratio") -> Row:
    """A row whose ``ratio`` is held to the target ``op bound``."""
    return Row(name, config, ratio if value is None else value, unit, f"{op} {bound:g}", ratio,
               check(ratio, op, bound))


@dataclass
class Results:
    """Rows of one run plus the context columns every row carries."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).strftime(
        "%Y%m%dT%H%M%S"))

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)

    def write(self, out_dir: Path, git_commit: str) -> Path:
        """Merge into ``out_dir/<device-slug>.csv``: rows of this run replace same (name, config).

        Every row carries its run's id (``run``, the start time); each run writes its own
        ``reference_peak_tflops`` row (the measured matmul peak), which the run's ratios are
        taken against, and on a chip with a rated peak its ``rated_peak_tflops`` row, which its
        ``mfu_rated`` rows are taken against.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{device_slug()}.csv"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ctx = {"run": self.run_id, "device": device_kind(), "backend": jax.default_backend(),
               "jax_version": jax.__version__, "git_commit": git_commit, "date": now}
        new = [{"name": r.name, "config": r.config, "value": _fmt(r.value), "unit": r.unit,
                "target": r.target, "ratio": _fmt(r.ratio), "status": r.status, **ctx}
               for r in self.rows]
        keys = {(r["name"], r["config"]) for r in new}
        old = []
        if path.exists():
            with path.open() as f:
                old = [r for r in csv.DictReader(f) if (r["name"], r["config"]) not in keys
                       and "run" in r]  # rows of a file written before runs were named: dropped
            live = {r["run"] for r in old if r["name"] not in PEAK_ROWS}
            old = [r for r in old if r["name"] not in PEAK_ROWS or r["run"] in live]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(old + new)
        return path

    def table(self) -> str:
        lines = [f"{'name':<34} {'config':<22} {'value':>12} {'unit':<10} {'target':<8} "
                 f"{'ratio':>8} status"]
        for r in self.rows:
            lines.append(f"{r.name:<34} {r.config:<22} {_fmt(r.value):>12} {r.unit:<10} "
                         f"{r.target:<8} {_fmt(r.ratio):>8} {r.status}")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.4g}"


def budget_step_inputs(budget: str, rho: float):
    """``(cfg, tcfg, batch)`` for timing one train step of a budget at ``rho``: the allocated
    model config, the budget's train config, and a random batch at its batch size and sequence
    length (tokens uniform over the vocabulary, hash ids uniform within each head's sub-table)."""
    import numpy as np

    from engram_jax.allocation import BUDGETS, allocate
    from engram_jax.config import TrainConfig

    b = BUDGETS[budget]
    cfg = allocate(b.base(), rho)
    tcfg = TrainConfig(**{**b.train_overrides(), "steps": 1000})
    B, T, V = tcfg.batch_size, cfg.seq_len, cfg.vocab_size
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, V, (B, T + 1)), jnp.int32)
    hash_ids = {}
    if cfg.engram is not None:
        for lid in cfg.engram.layer_ids:
            sizes = [p for order in cfg.engram.primes()[lid] for p in order]
            hash_ids[lid] = jnp.asarray(np.stack([rng.integers(0, s, (B, T)) for s in sizes], -1),
                                        jnp.int32)
    return cfg, tcfg, {"tokens": tokens, "hash_ids": hash_ids}


def budget_train_step(budget: str, rho: float):
    """``(cfg, tcfg, batch, state, train_step)`` of a budget at ``rho``: the jitted train step a trial
    runs (``optim.make_steps``), its initial state (seed 0) and a random batch
    (``budget_step_inputs``). The step donates its state: pass each call the state it returned."""
    from flax import nnx

    from engram_jax.model import HybridLM
    from engram_jax.optim import TrainState, make_optimizer, make_steps

    cfg, tcfg, batch = budget_step_inputs(budget, rho)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tcfg)
    state = TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32))
    train_step, _ = make_steps(graphdef, cfg, tcfg, tx)
    return cfg, tcfg, batch, state, train_step
