"""The benchmark harness: a tiny CPU run writes a complete CSV, and the offloaded path it times
trains to the same loss as the device-resident path at the bench's config."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.common import COLUMNS
from bench.run import SIZES, configs, run
from engram_jax.offload import reference_optimizer
from tests.test_offload import train_device, train_offload

REPO = Path(__file__).resolve().parent.parent


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_tiny_bench_writes_csv(tmp_path):
    res = run("tiny", None, tmp_path)
    (path,) = tmp_path.glob("*.csv")
    rows = _rows(path)
    assert tuple(rows[0].keys()) == COLUMNS
    names = {r["name"] for r in rows}
    for want in ("train_tokens_per_s", "mfu", "attention_fwd_bwd_ms", "moe_over_dense_time",
                 "engram_gather_vs_ceiling", "engram_scatter_vs_ceiling", "pipeline_tokens_per_s",
                 "real_over_synthetic_step", "hybrid_over_moe_tokens_per_s"):
        assert want in names, want
    for r in rows:
        assert math.isfinite(float(r["value"])), r
        assert r["status"] in ("pass", "fail", "n/a") and r["backend"] == "cpu"
    assert "measured in this run" in res.notes[0]  # CPU MFU is against a CPU peak, said so


@pytest.mark.slow
def test_offload_part_runs(tmp_path):
    run("tiny", "offload", tmp_path)
    rows = {r["name"]: r for r in _rows(next(tmp_path.glob("*.csv")))}
    assert float(rows["offloaded_tokens_per_s"]["value"]) > 0
    assert float(rows["largest_table_offloaded"]["value"]) > 0


def test_offload_loss_equals_device_loss_at_bench_config():
    """The tiny size's hybrid (smoke at rho = 0.8): offloaded == device-resident (lazy Adam)."""
    (_, cfg, _, _), = [c for c in configs("smoke", SIZES["tiny"], "float32") if c[1].engram]
    cfg = dataclasses.replace(cfg, seq_len=32)
    off = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, offload=True))
    ref, _, _ = train_device(cfg, reference_optimizer(_tcfg()), 3, tcfg=_tcfg())
    got, _, _, _ = train_offload(off, 3, tcfg=_tcfg())
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def _tcfg():
    from tests.test_offload import TCFG

    return TCFG


@pytest.mark.slow
def test_small_cpu_bench(tmp_path):
    run("small", None, tmp_path)
    assert all(math.isfinite(float(r["value"])) for r in _rows(next(tmp_path.glob("*.csv"))))


def _consistent(rows):
    """Every ratio of a run recomputed from that run's own rows and its one peak row."""
    peaks = {r["run"]: float(r["value"]) for r in rows if r["name"] == "reference_peak_tflops"}
    assert len(peaks) == len({r["run"] for r in rows}), "one peak row per run"
    by = {(r["run"], r["name"], r["config"]): float(r["value"]) for r in rows}
    for r in rows:
        peak = peaks[r["run"]]
        if r["unit"] == "TFLOP/s" and r["name"] != "reference_peak_tflops":
            assert float(r["ratio"]) == pytest.approx(float(r["value"]) / peak, rel=2e-3), r
        if r["name"] == "mfu":
            tps = by[(r["run"], "train_tokens_per_s", r["config"])]
            fpt = by[(r["run"], "model_flops_per_token", r["config"])]
            assert float(r["value"]) == pytest.approx(tps * fpt / (peak * 1e12), rel=2e-3), r
        if r["name"] == "hybrid_over_moe_tokens_per_s":
            moe = by[(r["run"], "train_tokens_per_s", f"{r['config']}@rho=1.0")]
            hyb = by[(r["run"], "train_tokens_per_s", f"{r['config']}@rho=0.8")]
            assert float(r["value"]) == pytest.approx(hyb / moe, rel=2e-3), r
        if r["name"] == "grid_hybrid_over_moe_tokens_per_s":
            moe = by[(r["run"], "grid_trial_tokens_per_s", f"{r['config']}@rho=1.0")]
            hyb = by[(r["run"], "grid_trial_tokens_per_s", f"{r['config']}@rho=0.8")]
            assert float(r["value"]) == pytest.approx(hyb / moe, rel=2e-3), r
        if r["target"]:
            op, bound = r["target"].split()
            ok = float(r["ratio"]) <= float(bound) if op == "<=" else float(r["ratio"]) >= float(bound)
            assert r["status"] == ("pass" if ok else "fail"), r


@pytest.mark.parametrize("name", sorted(p.name for p in (
    Path(__file__).resolve().parent.parent / "results" / "bench").glob("*.csv")))
def test_committed_bench_is_internally_consistent(name):
    _consistent(_rows(Path(__file__).resolve().parent.parent / "results" / "bench" / name))


@pytest.mark.slow
def test_tiny_bench_with_a_grid_is_consistent_and_keeps_other_runs(tmp_path):
    """Two runs into one file: each keeps its own peak, every ratio recomputes from its rows."""
    run("tiny", "offload", tmp_path)
    run("tiny", "grid", tmp_path)
    rows = _rows(next(tmp_path.glob("*.csv")))
    assert len({r["run"] for r in rows}) == 2
    names = {r["name"] for r in rows}
    assert {"grid_mfu", "grid_model_tflops", "grid_wall_s", "offloaded_tokens_per_s"} <= names
    # smoke, the only budget: both placements, and the grid again with the cache it filled
    assert {r["config"] for r in rows if r["name"] == "grid_mfu"} == {
        "smoke@2x1cpu", "smoke@1x2cpu", "smoke@2x1cpu@warm"}
    _consistent(rows)


def test_breakdown_flops_add_up_to_the_model_count():
    """The breakdown's per-component FLOPs (attention, MoE or dense FFN, head) sum to
    ``counting.flops_per_token`` of the pure MoE exactly: an independent count of each part."""
    from bench.breakdown import component_flops
    from engram_jax.allocation import BUDGETS, allocate

    for name, b in BUDGETS.items():
        cfg = allocate(b.base(), 1.0)
        f = component_flops(cfg, 3)
        parts = sum(v for k, v in f.items() if k not in ("step", "grad"))
        assert parts == pytest.approx(f["step"], rel=1e-12), name


@pytest.mark.slow
def test_breakdown_part_runs(tmp_path):
    run("tiny", "breakdown", tmp_path)
    rows = _rows(next(tmp_path.glob("*.csv")))
    ms = {r["config"]: float(r["value"]) for r in rows if r["name"] == "step_breakdown_ms"}
    for rho in ("1.0", "0.8"):
        tag = f"smoke@rho={rho}@1core"
        for c in ("step", "attention", "moe", "head", "optimizer", "other"):
            assert f"{tag}@{c}" in ms, (tag, c)
        assert all(ms[f"{tag}@{c}"] > 0 for c in ("step", "attention", "moe", "head"))
    assert "smoke@rho=0.8@1core@engram" in ms and "smoke@rho=1.0@1core@engram" not in ms
    _consistent(rows)


@pytest.mark.slow
def test_profile_attributes_the_traced_ops_to_the_model_parts():
    """``bench.profile`` on the smoke budget's hybrid: every part of the model shows up with
    forward and backward time, and the named parts hold most of the traced time (were the scopes
    lost, everything would land in ``other``)."""
    proc = subprocess.run([sys.executable, "-m", "bench.profile", "--budget", "smoke", "--rho", "0.8",
                           "--steps", "2", "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    ms = r["ops_ms"]
    for part in ("attn_core", "attn_proj", "rope", "router", "moe", "engram", "norm", "head", "loss"):
        assert ms.get(f"{part}/fwd", 0) > 0 and ms.get(f"{part}/bwd", 0) > 0, part
    assert ms.get("optimizer/-", 0) > 0
    assert sum(ms.values()) == pytest.approx(r["ops_ms_total"])
    assert ms.get("other/fwd", 0) + ms.get("other/bwd", 0) < 0.5 * r["ops_ms_total"]
    assert r["step_ms"] > 0


@pytest.mark.slow
def test_matmul_ceiling_collects_every_matmul_of_the_step():
    """``bench.dots`` on the smoke hybrid: the step's matmuls (forward, backward, custom VJPs
    included) do at least the model's counted FLOPs (capacity slots add some), take part of the
    step, and their FLOP count follows the dimension numbers."""
    from bench.dots import dot_flops

    assert dot_flops((2, 3), (3, 4), (((1,), (0,)), ((), ()))) == 2 * 2 * 3 * 4
    assert dot_flops((5, 2, 3), (5, 3, 4), (((2,), (1,)), ((0,), (0,)))) == 2 * 5 * 2 * 3 * 4
    proc = subprocess.run([sys.executable, "-m", "bench.dots", "--budget", "smoke", "--rho", "0.8",
                           "--repeats", "2", "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["dot_calls"] == sum(k["count"] for k in r["kinds"]) > 10
    assert r["model_flops"] <= r["dot_flops"] <= 2.0 * r["model_flops"]
    assert 0 < r["dots_ms"] and 0 < r["dot_share"] < 2
    assert r["ceiling_model_tflops"] == pytest.approx(r["model_flops"] / r["dots_ms"] / 1e9)


@pytest.mark.parametrize("tool", ["bench.breakdown", "bench.profile", "bench.dots"])
def test_step_tools_refuse_bad_input_before_any_work(tool):
    for args, msg in ((["--budget", "gpu-s"], "CPU budgets"), (["--budget", "smoke", "--rho", "1.5"], "--rho"),
                      (["--budget", "smoke", "--core", "999"], "--core 999")):
        proc = subprocess.run([sys.executable, "-m", tool, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr)
