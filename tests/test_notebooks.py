"""The notebooks run top to bottom: on synthetic grids, and on the repository's real results/.

The real-results run must pass whether or not any grid has been committed yet (the notebooks then
print a note instead of figures).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from analysis import synthetic

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_sparsity_allocation.ipynb", "02_memory_scaling.ipynb"]
TRUE_ALPHA = 0.3  # synthetic.write_memory_grid's default law
# Printed aggregate rows: "<i> <budget> <rho> <mean> <std> <sem> <n>" and "<i> <slots> <mean> ..."
ALLOC_ROW = re.compile(r"^\s*\d+\s+(\S+)\s+([0-9.]+)\s+([0-9.]+)\s+\S+\s+\S+\s+(\d+)\s*$", re.M)
MEMORY_ROW = re.compile(r"^\s*\d+\s+(\d+)\s+([0-9.]+)\s+\S+\s+\S+\s+(\d+)\s*$", re.M)


@pytest.fixture(scope="module")
def fake_results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nb_results")
    synthetic.write_rho_grid(root, "alloc", budgets=("small", "medium"), seeds=2)
    synthetic.write_memory_grid(root, "memory")
    # Another curve at budget "small" (a variant grid): listed, never pooled into "alloc"'s curve.
    synthetic.write_rho_grid(root, "muon-small", budgets=("small",), seeds=1, shape="flat",
                             curves=False)
    return root


def _execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{name} is stored with outputs: regenerate it with notebooks/make_notebooks.py"
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def _ok_runs(root: Path, grids) -> pd.DataFrame:
    """The ok rows of the named grids' runs.csv, read with pandas alone (not analysis.load)."""
    df = pd.concat([pd.read_csv(root / g / "runs.csv") for g in grids], ignore_index=True)
    return df[df["status"].astype(str).str.strip().str.lower() == "ok"]


def _check_printed_numbers(name: str, text: str, root: Path) -> None:
    """The grids listed, the run count and every printed mean agree with the CSV files."""
    listed = re.search(r"\((\d+) grid\(s\): \[(.*?)\]\)", text)
    on_disk = sorted(p.parent.name for p in root.glob("*/runs.csv"))
    assert listed and int(listed.group(1)) == len(on_disk), text[:500]
    assert re.findall(r"'([^']+)'", listed.group(2)) == on_disk
    if name.startswith("01"):
        m = re.search(r"(\d+) ok runs from \d+ grid\(s\); ([^ |]+)", text)
        if m is None:
            return
        runs = _ok_runs(root, m.group(2).split(","))
        assert int(m.group(1)) == len(runs)
        rows = ALLOC_ROW.findall(text)
        assert rows, "no aggregate table printed"
        means = runs.groupby([runs["budget"].astype(str), "rho"])["val_loss"].agg(["mean", "count"])
        assert len(rows) == len(means)
        for budget, rho, mean, n in rows:
            ref = means.loc[(budget, float(rho))]
            assert abs(float(mean) - ref["mean"]) <= 5e-5 + 1e-9, (budget, rho, mean, ref["mean"])
            assert int(n) == ref["count"]
    else:
        for block in re.split(r"\n(?=\S+: .*; x = )", text)[1:]:
            grid = block.split(":", 1)[0]
            col = re.match(r"\S+: .*; x = (\S+)", block).group(1)  # the memory-size column
            runs = _ok_runs(root, [grid])
            means = runs.groupby("engram_slots" if col == "None" else col)["val_loss"].agg(
                ["mean", "count"])
            rows = MEMORY_ROW.findall(block)
            assert len(rows) == len(means), block[:500]
            for slots, mean, n in rows:
                ref = means.loc[int(slots)]
                assert abs(float(mean) - ref["mean"]) <= 5e-5 + 1e-9, (grid, slots, mean)
                assert int(n) == ref["count"]
            fit = re.search(r"alpha = ([0-9.]+) \[([0-9.]+), ([0-9.]+)\]", block)
            if fit:
                a, lo, hi = map(float, fit.groups())
                assert lo <= a <= hi, block[:500]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_on_synthetic_grids(name, fake_results, monkeypatch):
    monkeypatch.setenv("ENGRAM_RESULTS", str(fake_results))
    nb = _execute(name)
    text = _text(nb)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "no figure was displayed"
    _check_printed_numbers(name, text, fake_results)
    if name.startswith("01"):
        assert "28 ok runs from 1 grid(s)" in text  # 2 budgets x 7 rho x 2 seeds, no muon-small
    else:
        # the known law is recovered: alpha within 0.03 of the truth, inside its interval
        # (measured: 0.299 [0.283, 0.314])
        a, lo, hi = map(float, re.search(r"alpha = ([0-9.]+) \[([0-9.]+), ([0-9.]+)\]",
                                         text).groups())
        assert abs(a - TRUE_ALPHA) < 0.03 and lo <= TRUE_ALPHA <= hi, (a, lo, hi)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_on_repo_results(name, monkeypatch):
    monkeypatch.delenv("ENGRAM_RESULTS", raising=False)
    text = _text(_execute(name))
    root = ROOT / "results"
    if not any(root.glob("*/runs.csv")):
        assert "yet" in text  # the note that no grid has been committed
        return
    _check_printed_numbers(name, text, root)
