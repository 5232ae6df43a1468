"""Loading result grids, aggregating seeds, drawing figures and the `python -m analysis` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import load, synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results root with a two-budget rho grid, a memory grid and a monotone grid."""
    root = tmp_path_factory.mktemp("results")
    synthetic.write_rho_grid(root, "alloc", budgets=("small", "medium"), seeds=3)
    synthetic.write_memory_grid(root, "memory")
    synthetic.write_rho_grid(root, "mono", shape="monotone", seeds=2, curves=False)
    return root


def test_load_runs_and_aggregate(results):
    df = load.load_runs(results / "alloc")
    assert len(df) == 2 * 7 * 3 and (df["status"] == "ok").all()
    assert np.allclose(df["compute"], df["flops_per_token"] * df["tokens_seen"])
    both = load.load_runs([results / "alloc", results / "mono" / "runs.csv"])
    assert set(both["grid"]) == {"alloc", "mono"}
    agg = load.aggregate(df)
    assert list(agg.columns) == ["budget", "rho", "mean", "std", "sem", "n"]
    assert len(agg) == 14 and (agg["n"] == 3).all()
    assert np.allclose(agg["sem"], agg["std"] / np.sqrt(3))
    assert load.budgets_by_compute(df) == ["small", "medium"]


def test_status_filter_and_tolerance(tmp_path):
    gdir = synthetic.write_rho_grid(tmp_path, "g", seeds=1, curves=False)
    df = pd.read_csv(gdir / "runs.csv")
    df.loc[0, "status"], df.loc[1, "status"] = "error", "diverged"
    df = df.drop(columns=["grid", "device_kind"]).assign(extra_col=1, budget="")
    df.to_csv(gdir / "runs.csv", index=False)
    ok = load.load_runs(gdir)
    # no grid column: the directory's name; an empty budget (a base-preset grid): its own label
    assert len(ok) == 5 and set(ok["grid"]) == {"g"} and set(ok["budget"]) == {"grid:g"}
    assert len(load.load_runs(gdir, keep_all=True)) == 7


@pytest.mark.parametrize("column", ["seed", "budget"])
def test_missing_identifying_column_is_an_error(tmp_path, column):
    """Without seed or budget, rows of unrelated runs could be averaged or pooled: refused."""
    gdir = synthetic.write_rho_grid(tmp_path, "g", seeds=1, curves=False)
    pd.read_csv(gdir / "runs.csv").drop(columns=[column]).to_csv(gdir / "runs.csv", index=False)
    with pytest.raises(load.ResultsError, match=f"lacks required column.*{column}"):
        load.load_runs(gdir)


def test_trial_without_seed_is_an_error(tmp_path):
    gdir = synthetic.write_rho_grid(tmp_path, "g", seeds=1, curves=False)
    df = pd.read_csv(gdir / "runs.csv")
    df["seed"] = df["seed"].astype(object)
    df.loc[2, "seed"] = ""
    df.to_csv(gdir / "runs.csv", index=False)
    with pytest.raises(load.ResultsError, match=f"{df.loc[2, 'trial_id']}.*no integer seed"):
        load.load_runs(gdir)


def test_base_grids_are_not_pooled(tmp_path):
    for name in ("a", "b"):
        gdir = synthetic.write_rho_grid(tmp_path, name, seeds=1, curves=False)
        pd.read_csv(gdir / "runs.csv").assign(budget="").to_csv(gdir / "runs.csv", index=False)
    df = load.load_runs([tmp_path / "a", tmp_path / "b"])
    assert df.groupby("budget")["grid"].nunique().max() == 1


def test_missing_and_malformed(tmp_path):
    with pytest.raises(load.ResultsError, match="no runs.csv"):
        load.load_runs(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"trial_id": ["a"], "status": ["ok"], "loss": [1.0]}).to_csv(bad / "runs.csv")
    with pytest.raises(load.ResultsError, match="rho"):
        load.load_runs(bad)


def test_curves_and_grid_kind(results):
    c = load.load_curves(results / "alloc")
    assert {"trial_id", "step", "tokens", "train_loss", "val_loss", "lr"} <= set(c.columns)
    assert c["trial_id"].nunique() == 42 and c["val_loss"].isna().any()
    assert load.load_curves(results / "mono").empty
    assert load.is_memory_grid(load.load_runs(results / "memory"))
    assert not load.is_memory_grid(load.load_runs(results / "alloc"))
    assert load.find_grids(results) == [results / n for n in ("alloc", "memory", "mono")]


def test_a_sweep_of_an_engram_switch_is_not_a_memory_grid():
    """An ablation sweeps an Engram key ("engram.gate") at fixed tables: no memory size varies."""
    ablation = pd.DataFrame({"rho": [0.8] * 4, "sweep_key": ["engram.gate"] * 4,
                             "engram_slots": [27544] * 4, "params_engram_tables": [110176] * 4,
                             "params_overencoding_tables": [0] * 4})
    assert not load.is_memory_grid(ablation) and load.is_allocation_grid(ablation)
    sizes = ablation.assign(sweep_key="engram.table_sizes", engram_slots=[4062, 16024] * 2)
    assert load.is_memory_grid(sizes) and load.memory_column(sizes) == "engram_slots"


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.stat().st_size > 20_000, f"{path} is suspiciously small"
    img = mpimg.imread(path)
    assert img.std() > 0.05, f"{path} looks blank"


def test_make_all_writes_figures(results, tmp_path):
    from analysis import plots

    written = plots.make_all(results, tmp_path, n_boot=50)
    names = {p.name for p in written}
    for stem in ("alloc_allocation", "alloc_curves", "memory_memory_scaling", "memory_curves",
                 "mono_allocation"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        _check_png(tmp_path / f"{stem}.png")
        assert (tmp_path / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    assert "mono_curves.png" not in names  # that grid has no curves: skipped, not an error
    # Budget "small" has runs in two grids (alloc, mono): one pooled figure; "medium" only in one.
    assert "small_allocation_pooled.png" in names and "medium_allocation_pooled.png" not in names
    _check_png(tmp_path / "small_allocation_pooled.png")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_fit(results):
    r = _cli("fit", str(results / "alloc"), str(results / "memory"), str(results / "mono"),
             "--n-boot", "50")
    assert r.returncode == 0, r.stderr
    assert "rho*" in r.stdout and "rho* vs compute" in r.stdout
    assert "alpha =" in r.stdout
    assert "edge" in r.stdout  # the monotone grid is reported as such
    assert "== pooled: alloc, mono" in r.stdout  # both hold budget "small": also fitted pooled


def test_cli_plots(results, tmp_path):
    out = tmp_path / "figs"
    r = _cli("plots", "--results", str(results), "--out", str(out), "--n-boot", "50")
    assert r.returncode == 0, r.stderr
    assert (out / "alloc_allocation.png").stat().st_size > 20_000
    empty = _cli("plots", "--results", str(tmp_path / "empty"))
    assert empty.returncode == 0 and "nothing to plot" in empty.stdout
    bad = tmp_path / "badres" / "g"
    bad.mkdir(parents=True)
    (bad / "runs.csv").write_text("trial_id,status\na,ok\n")
    r = _cli("plots", "--results", str(tmp_path / "badres"))
    assert r.returncode != 0 and "lacks required column" in r.stderr


def test_unreadable_or_incomplete_curves_are_named(tmp_path):
    gdir = synthetic.write_rho_grid(tmp_path, "g", seeds=1)
    cdir = gdir / "curves"
    n_good = len(list(cdir.glob("*.csv")))
    assert n_good > 0
    (cdir / "half.csv").write_bytes(b"\xff\xfe\x00garbage\x00\n\x01")
    (cdir / "empty.csv").write_text("")
    (cdir / "odd.csv").write_text("step,loss\n1,2.0\n")
    with pytest.warns(load.ResultsWarning) as rec:
        c = load.load_curves(gdir)
    named = " ".join(str(w.message) for w in rec)
    for f in ("half.csv", "empty.csv", "odd.csv"):
        assert f in named, named
    assert c["trial_id"].nunique() == n_good


def test_learning_rate_grids_are_not_allocation_curves(tmp_path):
    """A train.lr sweep at rho = 1 must not be pooled into its budget's allocation curve."""
    from analysis import synthetic
    from analysis.plots import make_all

    grid = synthetic.write_rho_grid(tmp_path, "alloc", budgets=("small",), curves=False)
    runs = load.load_runs(grid)
    lr = runs[runs["rho"] == 1.0].copy()
    lr["grid"], lr["sweep_key"] = "lr", "train.lr"
    lr["lr"] = [1e-3, 2e-3, 4e-3][: len(lr)]
    lr["sweep_value"] = lr["lr"].map(str)
    (tmp_path / "lr").mkdir()
    lr.drop(columns=["compute", "source_dir"], errors="ignore").to_csv(tmp_path / "lr" / "runs.csv", index=False)
    lr_runs = load.load_runs(tmp_path / "lr")
    assert load.setting_sweep_key(lr_runs) == "train.lr"
    assert not load.is_allocation_grid(lr_runs) and load.is_allocation_grid(runs)
    written = {p.name for p in make_all(tmp_path, tmp_path / "fig", n_boot=20)}
    assert "lr_lr.png" in written and "alloc_allocation.png" in written
    assert not any("pooled" in n for n in written)  # the lr rows joined no allocation curve
