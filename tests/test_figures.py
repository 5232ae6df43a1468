"""``make plots`` writes exactly the committed figures, and the same bytes every time
(docs/design.md section 10)."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from analysis import load, plots, synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURES = "results/figures"


def _git_files(*paths: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def committed_grids() -> list[str]:
    """The grids whose runs.csv is committed (a running grid's untracked table is left out)."""
    return sorted(Path(f).parent.name for f in _git_files("results/*/runs.csv")
                  if len(Path(f).parts) == 3)


def test_plan_lists_exactly_the_committed_figures():
    committed = sorted(Path(f).name for f in _git_files(FIGURES))
    planned = plots.figure_files(ROOT / "results", grids=committed_grids())
    assert len(planned) == len(set(planned)), "two figures share a file name"
    missing, extra = sorted(set(planned) - set(committed)), sorted(set(committed) - set(planned))
    assert not missing and not extra, (
        f"make plots would write {missing} (not committed) and not write {extra} (committed): "
        "run `make plots` and commit results/figures/")


def test_plan_matches_what_make_all_writes(tmp_path):
    synthetic.write_rho_grid(tmp_path, "alloc", budgets=("small", "medium"), seeds=2)
    synthetic.write_rho_grid(tmp_path, "alloc-seeds", budgets=("small",), seeds=1)
    synthetic.write_memory_grid(tmp_path, "memory")
    written = [p.name for p in plots.make_all(tmp_path, tmp_path / "fig", n_boot=10)]
    assert written == plots.figure_files(tmp_path)
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == sorted(written)


def test_only_draws_the_named_figures_and_refuses_unknown_names(tmp_path, capsys):
    from analysis.__main__ import main

    synthetic.write_rho_grid(tmp_path, "alloc", budgets=("small", "medium"), seeds=2)
    synthetic.write_memory_grid(tmp_path, "memory")
    written = [p.name for p in plots.make_all(tmp_path, tmp_path / "fig", n_boot=10,
                                              only=["memory_*"])]
    assert written and all(n.startswith("memory_") for n in written)
    assert written == [f for f in plots.figure_files(tmp_path) if f.startswith("memory_")]
    rc = main(["plots", "--results", str(tmp_path), "--out", str(tmp_path / "none"),
               "--only", "memory_*", "--only", "ladder-typo"])
    assert rc == 2 and "no planned figure matches 'ladder-typo'" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # refused before drawing anything


def _band_figure(eps: float = 0.0) -> plt.Figure:
    """A fitted curve with a band, as the allocation and memory figures draw them."""
    x = np.linspace(0.3, 1.0, 200)
    y = 2.5 + 0.3 * (x - 0.75) ** 2
    fig, ax = plt.subplots(figsize=(3.3, 2.4))
    ax.fill_between(x, y - 0.01 * (1 + eps), y + 0.01, alpha=0.5, lw=0)
    ax.plot(x, y * (1 + eps), lw=1)
    ax.plot([0.75], [2.5], "D", label=f"optimum {0.75:.3f}")
    ax.legend()
    return fig


def _png_chunks(data: bytes) -> list[bytes]:
    pos, kinds = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kinds.append(data[pos + 4:pos + 8])
        pos += 12 + n
    return kinds


def test_saved_files_carry_no_timestamp(tmp_path):
    pdf, png = plots.save(_band_figure(), tmp_path, "band")
    assert b"/CreationDate" not in pdf.read_bytes()
    assert b"tIME" not in _png_chunks(png.read_bytes())


def test_same_figure_same_bytes(tmp_path):
    a = plots.save(_band_figure(), tmp_path / "a", "band")
    b = plots.save(_band_figure(), tmp_path / "b", "band")
    for p, q in zip(a, b):
        assert p.read_bytes() == q.read_bytes(), p.name


@pytest.mark.parametrize("eps", [1e-10, 3e-9])
def test_last_digit_differences_draw_the_same_pixels(tmp_path, eps):
    """Fits that differ in their last digits (another CPU's rounding) give the same files. Without
    the rounding in save() both sizes change the PDF (its coordinates have ten decimals) and 3e-9
    changes pixels of the PNG."""
    a = plots.save(_band_figure(0.0), tmp_path / "a", "band")
    b = plots.save(_band_figure(eps), tmp_path / "b", "band")
    for p, q in zip(a, b):
        assert p.read_bytes() == q.read_bytes(), p.name


def test_significant_rounds_values_and_keeps_zeros_and_nans():
    v = plots._significant(np.array([2.123456789, 1.5e7 + 3.3, 0.0, np.nan, -0.000123456789]))
    np.testing.assert_array_equal(v[[0, 1, 4]], [2.12346, 15000000.0, -0.000123457])
    assert v[2] == 0.0 and np.isnan(v[3])


def test_real_figure_renders_twice_identically(tmp_path):
    """A committed grid's memory-scaling figure (power law, bootstrap band), drawn twice."""
    runs = load.load_runs(ROOT / "results" / "memory-smoke")
    a = plots.save(plots.plot_memory(runs, n_boot=12), tmp_path / "a", "m")
    b = plots.save(plots.plot_memory(runs, n_boot=12), tmp_path / "b", "m")
    for p, q in zip(a, b):
        assert p.read_bytes() == q.read_bytes(), p.name


def _committed_matplotlib() -> str | None:
    """The matplotlib version that wrote the committed PNGs (their Software text chunk)."""
    pngs = sorted((ROOT / FIGURES).glob("*.png"))
    if not pngs:
        return None
    m = re.search(rb"Matplotlib version([\w.]+)", pngs[0].read_bytes()[:4096])
    return m.group(1).decode() if m else None


def _committed_fonttools() -> str | None:
    """The fonttools version that subset the committed PDFs' fonts (their Creator entry)."""
    versions = {m.group(1).decode() if m else None
                for m in (re.search(rb"/Creator \([^)]*fonttools ([\w.]+)\)", p.read_bytes())
                          for p in sorted((ROOT / FIGURES).glob("*.pdf")))}
    if len(versions) > 1:
        pytest.fail(f"the committed PDFs mix fonttools versions {sorted(map(str, versions))}: "
                    "regenerate every figure (`make plots`) and commit results/figures/")
    return versions.pop() if versions else None


def test_pdfs_name_the_fonttools_that_subset_their_fonts(tmp_path):
    import fontTools

    (pdf, _) = plots.save(_band_figure(), tmp_path, "f")
    assert f"fonttools {fontTools.version})".encode() in pdf.read_bytes()
    assert b"CreationDate" not in pdf.read_bytes()


@pytest.mark.slow
def test_make_plots_reproduces_the_committed_bytes(tmp_path):
    """``python -m analysis plots`` on a copy of the committed results writes the committed
    figures byte for byte (about a minute). Figures are byte-stable for one set of package
    versions on x86-64; elsewhere this is skipped."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("figures are pinned to the x86-64 kernels")
    if _committed_matplotlib() != matplotlib.__version__:
        pytest.skip(f"committed figures come from matplotlib {_committed_matplotlib()}, "
                    f"this is {matplotlib.__version__}")
    import fontTools

    if (ft := _committed_fonttools()) != fontTools.version:
        pytest.skip(f"committed PDFs embed fonts subset by fonttools {ft}, "
                    f"this is {fontTools.version}")
    grids = set(committed_grids())
    for f in _git_files("results"):
        parts = Path(f).parts
        if len(parts) > 2 and parts[1] in grids:
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / f, tmp_path / f)
    out = subprocess.run([sys.executable, "-m", "analysis", "plots", "--results",
                          str(tmp_path / "results"), "--out", str(tmp_path / "fig")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    differ = [f for f in _git_files(FIGURES)
              if zlib.crc32((ROOT / f).read_bytes())
              != zlib.crc32((tmp_path / "fig" / Path(f).name).read_bytes())]
    assert not differ, f"make plots no longer writes the committed bytes of {differ}"
