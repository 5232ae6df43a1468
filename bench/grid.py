"""The ``grid`` part of ``make bench``: whole-grid model FLOP/s of the CPU budgets.

A trial's step time says little about what a science campaign costs: Ray start-up, data loading,
compilation, the periodic and final evaluations and two trials sharing the machine all count. So
for each CPU budget this part runs a real two-trial grid (rho 1.0 and 0.8, the budget's own
settings, a quarter of its steps) end to end with ``python -m sweeps.run`` in a subprocess and
times it from start to exit. Model FLOP/s = the sum over its trials of tokens x
``flops_per_token()`` (training FLOPs only: evaluation and compilation are overhead) divided by
that wall time; grid MFU is that over the reference peak of the run (the best f32 matmul of
n = 1024 and 2048 on a CPU).

Placement is measured on the smallest ladder budget (``cpu-1e12``) both ways: two trials side by
side with one CPU each (``resources: {cpu: 1}``, the shipped grids) and one trial at a time with
both (``{cpu: 2}``). Every grid starts with an empty compilation cache of its own (shared by its
trials); on that budget the two-trial grid is run once more with the cache its first run filled
(config ``...@warm``), as a rerun, a new seed or a continued campaign on the same machine finds it,
and once with glibc's default malloc settings instead of the trials' (``...@glibc-default``,
``engram_jax.host_malloc``), with an empty cache of its own.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import Peak, Row, target_row
from engram_jax.allocation import BUDGETS

REPO = Path(__file__).resolve().parent.parent
# Targets of the throughput issue: the largest CPU budget's grid at >= 0.40 of the matmul peak,
# the smallest at >= 0.25; hybrid trials at >= 0.97x the pure MoE's tokens/s.
MFU_TARGET_LARGEST, MFU_TARGET_OTHERS = 0.40, 0.25
PLACEMENT_BUDGET = "cpu-1e12"


def cpu_budgets() -> list[str]:
    """CPU budgets, smallest compute per trial first."""
    cpu = [b for b in BUDGETS.values() if b.device == "cpu"]
    cpu.sort(key=lambda b: b.tokens() * b.base().flops_per_token())
    return [b.name for b in cpu]


def run_grid(budget: str, *, placement: str, steps_fraction: float, workdir: Path,
             corpus: str | None = None, compile_cache: Path | None = None,
             suffix: str = "", host_malloc: str = "tuned") -> dict:
    """Run the two-trial grid of ``budget`` and return its timing and rows.

    Args:
      placement: "2x1" (two trials side by side, one CPU each) or "1x2" (one trial at a time
        with two CPUs).
      steps_fraction: share of the budget's steps each trial trains.
      corpus: override the budget's corpus (tests use a small one).
      compile_cache: the trials' compilation cache (default: a new one per grid).
      suffix: appended to the grid's name (a second run of the same grid).
      host_malloc: the trials' malloc settings (``sweeps.run --host-malloc``).

    Returns:
      {"wall_s", "rows": runs.csv rows, "flops": training FLOPs of the grid}.
    """
    b = BUDGETS[budget]
    cpus = {"2x1": 1, "1x2": 2}[placement]
    name = f"bench-{budget}-{placement}{suffix}"
    grid = {
        "name": name, "budget": budget, "rho": [1.0, 0.8], "seeds": [0],
        "steps": max(1, math.ceil(b.steps * steps_fraction)),
        "resources": {"cpu": cpus, "gpu": 0},
    }
    if corpus is not None:
        grid["corpus"] = corpus
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cache = compile_cache or workdir / f"xla-{name}"
    cmd = [sys.executable, "-m", "sweeps.run", str(path), "--results", str(workdir / "results"),
           "--num-cpus", "2", "--compile-cache", str(cache), "--host-malloc", host_malloc]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench grid {name} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with (workdir / "results" / name / "runs.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    flops = sum(float(r["tokens_seen"]) * float(r["flops_per_token"]) for r in rows)
    return {"wall_s": wall, "rows": rows, "flops": flops}


def grid_rows(peak: Peak, *, budgets: list[str] | None = None, steps_fraction: float = 0.25,
              corpus: str | None = None) -> list[Row]:
    """Rows per budget: wall time, model TFLOP/s (ratio = grid MFU, held to its target) and
    hybrid/MoE tokens/s; for the smallest budget also the one-trial-with-two-cores placement."""
    budgets = budgets or cpu_budgets()
    ladder = cpu_budgets()
    largest = max(budgets, key=ladder.index)
    out: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-grid-") as d:
        work = Path(d)
        # Placement is compared on the smallest ladder budget: smoke's grid is mostly start-up.
        both = PLACEMENT_BUDGET if PLACEMENT_BUDGET in budgets else budgets[0]
        for budget in budgets:
            runs = [("2x1", ""), ("1x2", ""), ("2x1", "@warm")] if budget == both else [("2x1", "")]
            if budget == PLACEMENT_BUDGET:  # not on smoke (the tests' grid): mostly start-up
                runs.append(("2x1", "@glibc-default"))
            for placement, variant in runs:
                tag = f"{budget}@{placement}cpu{variant}"
                # @warm: the cache its first run filled; @glibc-default: a cache of its own.
                cache = work / f"xla-{budget}-{placement}{variant.replace('@warm', '')}"
                g = run_grid(budget, placement=placement, steps_fraction=steps_fraction,
                             workdir=work, corpus=corpus, compile_cache=cache,
                             suffix=variant.replace("@", "-"),
                             host_malloc="default" if variant == "@glibc-default" else "tuned")
                fps = g["flops"] / g["wall_s"]
                mfu = fps / peak.flops
                bound = MFU_TARGET_LARGEST if budget == largest else MFU_TARGET_OTHERS
                out += [
                    Row("grid_wall_s", tag, g["wall_s"], "s"),
                    Row("grid_model_tflops", tag, fps / 1e12, "TFLOP/s", ratio=mfu),
                    target_row("grid_mfu", tag, mfu, ">=", bound, value=mfu, unit="fraction"),
                ]
                tps = {float(r["rho"]): float(r["tokens_per_s"]) for r in g["rows"]}
                out.append(Row("grid_trial_tokens_per_s", f"{tag}@rho=1.0", tps[1.0], "tok/s"))
                out.append(Row("grid_trial_tokens_per_s", f"{tag}@rho=0.8", tps[0.8], "tok/s"))
                out.append(target_row("grid_hybrid_over_moe_tokens_per_s", tag, tps[0.8] / tps[1.0],
                                      ">=", 0.97))
    return out
