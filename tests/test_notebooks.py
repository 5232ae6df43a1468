"""The notebooks run top to bottom: on synthetic grids, and on the repository's real results/.

The real-results run must pass whether or not any grid has been committed yet (the notebooks then
print a note instead of figures).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis import synthetic

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_sparsity_allocation.ipynb", "02_memory_scaling.ipynb"]


@pytest.fixture(scope="module")
def fake_results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nb_results")
    synthetic.write_rho_grid(root, "alloc", budgets=("small", "medium"), seeds=2)
    synthetic.write_memory_grid(root, "memory")
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


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_on_synthetic_grids(name, fake_results, monkeypatch):
    monkeypatch.setenv("ENGRAM_RESULTS", str(fake_results))
    nb = _execute(name)
    text = _text(nb)
    assert ("rho*" in text) if name.startswith("01") else ("alpha =" in text)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "no figure was displayed"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_on_repo_results(name, monkeypatch):
    monkeypatch.delenv("ENGRAM_RESULTS", raising=False)
    _execute(name)
