"""Writes the analysis notebooks (nbformat v4, without outputs). Run after editing this file:

    .venv/bin/python notebooks/make_notebooks.py

The notebooks stay thin: every computation is a call into the ``analysis`` package.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the fits are tiny; threads only spin-wait

# Find the repository root (the folder with pyproject.toml and analysis/) from wherever we run.
ROOT = Path.cwd().resolve()
while not ((ROOT / "pyproject.toml").is_file() and (ROOT / "analysis").is_dir()):
    if ROOT.parent == ROOT:
        raise RuntimeError("run this notebook from inside the engram-suite repository")
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))

%matplotlib inline
import matplotlib.pyplot as plt  # noqa: E402
from IPython.display import display  # noqa: E402

from analysis import fit, load, plots, report  # noqa: E402


def show(fig):
    """Shows a figure once (closing it stops inline from drawing it a second time)."""
    if fig is not None:
        display(fig)
        plt.close(fig)

# ENGRAM_RESULTS points the notebook at another results root (the tests feed synthetic grids).
RESULTS = Path(os.environ.get("ENGRAM_RESULTS", ROOT / "results"))
GRIDS = load.find_grids(RESULTS)
print(f"results root: {RESULTS}  ({len(GRIDS)} grid(s): {[g.name for g in GRIDS]})")'''


def sparsity_allocation() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell("""\
# Sparsity allocation: where is the optimum split between experts and Engram memory?

**The paper's claim** (Engram, arXiv 2601.07372; `docs/paper.md` section 2). Hold the
total parameters $P_{tot}$ and the activated parameters $P_{act}$ fixed, and let
$\\rho$ be the share of the sparse parameters $P_{sparse} = P_{tot} - P_{act}$ kept in routed
experts; the other $1-\\rho$ becomes Engram table rows. Validation loss against $\\rho$ is
**U-shaped** with its optimum near $\\rho \\approx 0.75$-$0.8$ at both budgets the paper tried
(2e20 and 6e20 FLOPs), from one run per point, without error bars or a fitted curve. The effect is
small (about 0.8% of the loss), close to run-to-run noise, so seeds and intervals matter."""),
        new_code_cell(SETUP),
        new_markdown_cell("""\
## What the fit does

`analysis.fit.fit_u_curve`, per budget, models the whole curve (the paper's is asymmetric: it
rises about four times more steeply toward $\\rho = 1$ than toward $\\rho = 0.4$):

1. removes per-seed offsets when seeds are crossed with $\\rho$ (a seed that is worse everywhere
   moves no optimum);
2. calls the curve U-shaped only when a valley (falling, then rising) fits better than every
   monotone curve by more than a critical value simulated for the hardest monotone case; otherwise
   the answer is "no interior optimum", with the reason;
3. fits candidate shapes over the whole grid (the vertex parabola, a two-sided parabola, a
   two-sided power form $L^* + a(\\rho^*-\\rho)^p$ / $b(\\rho-\\rho^*)^q$, cubic and quartic
   polynomials) and keeps one by AIC;
4. reports a 95% interval for $\\rho^*$ from a seed-level bootstrap that redoes the shape choice
   in every replicate, widened to the two-sided form's profile interval; its coverage on synthetic
   curves is in `results/calibration/`;
5. cross-checks with the argmin of an Akima spline through the means."""),
        new_code_cell('''\
# Variant grids (muon-*, ablation-*: another model or optimizer at a budget) are other curves,
# compared with their budget's in the README (analysis.paper): they are not pooled here.
alloc = [g for g in GRIDS
         if not load.is_variant_grid(g.name) and load.is_allocation_grid(load.load_runs(g))]
if not alloc:
    print(f"No sparsity-allocation grid under {RESULTS} yet: run `make sweep`, then re-run this "
          "notebook.")
else:
    # All allocation grids pooled: the seeds of one budget may sit in several grids.
    runs = load.load_runs(alloc)
    print(f"{len(runs)} ok runs from {len(alloc)} grid(s); {plots.describe(runs)}")
    display(report.allocation_table(runs, n_boot=300))
    display(load.aggregate(runs, by=("budget", "rho")).round(4))'''),
        new_markdown_cell("""\
## Loss against $\\rho$

Seeds are faint dots, means carry $\\pm$ one standard deviation over seeds, the red line is the
chosen shape with its bootstrap band, the shaded column the interval for $\\rho^*$."""),
        new_code_cell('''\
if alloc:
    show(plots.plot_allocation(runs, n_boot=300))'''),
        new_markdown_cell("""\
## Does the optimum move with compute?

With two or more budgets, `fit_optimum_vs_compute` fits $\\rho^* = a + b\\log_{10} C$, weighting
each budget by its interval width. The paper saw no shift between its two budgets."""),
        new_code_cell('''\
if alloc:
    o = fit.fit_optimum_vs_compute(runs, n_boot=200)
    display(o["per_budget"])
    print(f"rho* = {o['a']:.3f} + {o['b']:.3f} log10(C)" if o["ok"] else o["reason"])'''),
        new_markdown_cell("""\
## Training curves

Validation loss against tokens, one colour per $\\rho$ (seeds averaged). Curves that are still
falling steeply at the end mean the budget is too small for the final losses to be compared."""),
        new_code_cell('''\
for g in alloc:
    fig = plots.plot_curves(load.load_runs(g), load.load_curves(g))
    if fig is None:
        print(f"{g.name}: no curves recorded")
    show(fig)'''),
    ])


def memory_scaling() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell("""\
# Memory scaling: loss against Engram table size

**The paper's claim** (`docs/paper.md` section 3): with the MoE backbone fixed
($P_{tot} \\approx 3$B, $P_{act}$ 568M, 100B tokens) and only the Engram slots growing from
2.6e5 to 1e7, validation loss falls on a straight line in log-log axes, about $-0.028$ per $10\\times$
slots (1.788 to 1.743). Memory adds capacity at no extra compute per token.

**The fit.** `analysis.fit.fit_power_law` fits $L = E + A x^{-\\alpha}$ with a Huber loss on
$\\log L$ (robust to one broken run), L-BFGS-B from a grid of starts, and bootstrap intervals from
resampled runs. $E$ is the loss that unlimited memory would approach at this backbone; the
pure-MoE run (no Engram) is drawn as a reference line and left out of the fit."""),
        new_code_cell(SETUP),
        new_code_cell('''\
memory = [g for g in GRIDS if load.is_memory_grid(load.load_runs(g))]
if not memory:
    print(f"No memory-scaling grid under {RESULTS} yet (a grid whose sweep_key varies an Engram "
          "table size): run one with `make sweep`, then re-run this notebook.")
for g in memory:
    runs = load.load_runs(g)
    col, f = report.memory_fit(runs, n_boot=300)
    print(f"\\n{g.name}: {plots.describe(runs)}; x = {col}")
    display(load.aggregate(runs, by=(col or "engram_slots",)).round(4))
    if f["ok"]:
        print(f"alpha = {f['alpha']:.3f} {report.ci(*f['alpha_ci'])}, "
              f"E = {f['E']:.3f} {report.ci(*f['E_ci'])}, A = {f['A']:.3g}")
        # The paper quotes a log-log slope; compare at the middle of our range.
        x_mid = float(runs.loc[runs[col] > 0, col].pipe(lambda s: (s.min() * s.max()) ** 0.5))
        per_decade = -f["alpha"] * f["A"] * x_mid ** -f["alpha"] * 2.302585
        print(f"dL per 10x memory at x = {x_mid:.3g}: {per_decade:+.4f} (paper: about -0.028)")
    else:
        print(f"no power-law fit: {f['reason']}")'''),
        new_code_cell('''\
for g in memory:
    runs = load.load_runs(g)
    show(plots.plot_memory(runs, n_boot=300))
    show(plots.plot_curves(runs, load.load_curves(g)))'''),
    ])


def main() -> None:
    for name, nb in (("01_sparsity_allocation.ipynb", sparsity_allocation()),
                     ("02_memory_scaling.ipynb", memory_scaling())):
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        for i, cell in enumerate(nb.cells):
            cell.id = f"cell-{i:02d}"  # stable ids keep regenerated notebooks diff-free
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(HERE / name)


if __name__ == "__main__":
    main()
