"""The accelerator check (``bench.gpucheck``) on the CPU at the smoke budget: its rows, targets and
error rows, and MFU recomputed from the CSV's rows and the peaks (the measured one and the
chip's rated one, here a stand-in H200)."""

from __future__ import annotations

import csv

import pytest

from bench import gpucheck
from bench.common import PEAK_ROWS, Results, Row, rated_mfu_row
from engram_jax.peaks import rated_peak


def _fake_step(cfg, tcfg, batch, *, repeats, inner):
    """Step times without compiling: what the check does with them is under test here."""
    if cfg.attention == "cudnn":
        raise NotImplementedError("cuDNN attention needs a CUDA GPU")
    return 0.01 * (1.0 if cfg.moe.dispatch == "capacity" else 0.9) * (1.02 if cfg.engram else 1.0)


@pytest.fixture(scope="module")
def check_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    h200 = rated_peak("NVIDIA H200", "bfloat16")
    mp = pytest.MonkeyPatch()
    mp.setattr(gpucheck, "rated_peak_for_run", lambda dtype: h200)  # as on an H200
    mp.setattr(gpucheck, "time_step", _fake_step)
    try:
        res = gpucheck.run(("smoke", "gpu-s"), ("base", "dropless", "cudnn", "all"), peak_n=256)
    finally:
        mp.undo()
    path = res.write(out, "test")
    with path.open() as f:
        return res, list(csv.DictReader(f))


def test_rows_targets_and_errors(check_csv):
    res, rows = check_csv
    names = {(r["name"], r["config"]) for r in rows}
    for tag in ("smoke@rho=1.0/base", "smoke@rho=0.8/base", "gpu-s@rho=1.0/dropless"):
        for name in ("train_step_ms", "train_tokens_per_s", "model_flops_per_token", "mfu",
                     "mfu_rated"):
            assert (name, tag) in names, (name, tag)
    by = {(r["name"], r["config"]): r for r in rows}
    hyb = by[("hybrid_over_moe_tokens_per_s", "smoke/base")]
    assert float(hyb["ratio"]) == pytest.approx(1 / 1.02, rel=1e-3) and hyb["status"] == "pass"
    dl = by[("dropless_over_capacity_tokens_per_s", "gpu-s@rho=1.0/dropless")]
    assert float(dl["ratio"]) == pytest.approx(1 / 0.9, rel=1e-3) and dl["status"] == "pass"
    err = [r for r in rows if r["name"] == "error"]  # the stand-in cuDNN attention fails
    assert sorted(r["config"] for r in err) == [
        "gpu-s@rho=0.8/all", "gpu-s@rho=1.0/all", "gpu-s@rho=1.0/cudnn",
        "smoke@rho=0.8/all", "smoke@rho=1.0/all", "smoke@rho=1.0/cudnn"]
    assert all("cuDNN attention needs" in r["unit"] for r in err)
    # the MFU target is held at the largest budget only
    assert by[("mfu_rated", "gpu-s@rho=1.0/base")]["target"] == ">= 0.4"
    assert by[("mfu_rated", "smoke@rho=1.0/base")]["target"] == ""


def test_mfu_recomputed_from_the_rows(check_csv):
    _, rows = check_csv
    by = {(r["name"], r["config"]): float(r["value"]) for r in rows}
    run = rows[-1]["run"]
    measured = by[("reference_peak_tflops", f"run:{run}")] * 1e12
    rated = by[("rated_peak_tflops", f"run:{run}")] * 1e12
    assert rated == pytest.approx(989.4e12)
    tags = [c for (n, c) in by if n == "mfu_rated"]
    assert tags
    for tag in tags:
        flops = by[("train_tokens_per_s", tag)] * by[("model_flops_per_token", tag)]
        assert by[("mfu", tag)] == pytest.approx(flops / measured, rel=2e-3)
        assert by[("mfu_rated", tag)] == pytest.approx(flops / rated, rel=2e-3)


def test_rated_rows_and_peak_rows_kept_per_run(tmp_path):
    assert rated_mfu_row("x", 1e6, 1e9, None) is None
    r = rated_mfu_row("x", 2e6, 1e9, rated_peak("NVIDIA H100 80GB HBM3", "bfloat16"), 2)
    assert r.value == pytest.approx(1e15 / 989.4e12) and r.ratio == r.value
    a = Results(run_id="A")
    a.add(Row("reference_peak_tflops", "run:A", 1.0, "TFLOP/s"),
          Row("rated_peak_tflops", "run:A", 2.0, "TFLOP/s"), Row("mfu", "c", 0.1, "fraction"))
    a.write(tmp_path, "g")
    b = Results(run_id="B")  # replaces A's only measurement: A's peak rows go with it
    b.add(Row("rated_peak_tflops", "run:B", 2.0, "TFLOP/s"), Row("mfu", "c", 0.2, "fraction"))
    path = b.write(tmp_path, "g")
    with path.open() as f:
        left = [(r["name"], r["run"]) for r in csv.DictReader(f)]
    assert all(run == "B" for name, run in left if name in PEAK_ROWS)


def test_cli_rejects_unknown_options():
    with pytest.raises(SystemExit):
        gpucheck.main(["--options", "base,flash"])


@pytest.mark.slow
def test_check_runs_real_steps_on_the_cpu(tmp_path):
    res = gpucheck.run(("smoke",), ("base", "dropless"), repeats=1, inner=1, batch_size=2,
                       peak_n=256)
    names = {(r.name, r.config) for r in res.rows}
    assert ("dropless_over_capacity_tokens_per_s", "smoke@rho=1.0/dropless") in names
    assert ("hybrid_over_moe_tokens_per_s", "smoke/base") in names
    assert not [r for r in res.rows if r.name == "error"]
