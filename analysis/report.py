"""Fit summaries as tables: shared by the CLI and the notebooks."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis import load
from analysis.fit import fit_power_law, fit_u_curve


def ci(lo: float, hi: float) -> str:
    """Formats an interval, "-" when it is undefined."""
    if math.isnan(lo) or math.isnan(hi):
        return "-"
    return f"[{lo:.3f}, {hi:.3f}]"


def num(v: float, fmt: str = ".4f") -> str:
    """Formats a number, "-" for NaN."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def allocation_table(runs: pd.DataFrame, *, n_boot: int = 1000, level: float = 0.95
                     ) -> pd.DataFrame:
    """One row per budget (smallest compute first): rho*, its interval, the shape, L*, verdict.

    Args:
        runs: the ok runs of one rho grid.
        n_boot, level: passed to :func:`analysis.fit.fit_u_curve`.
    """
    rows = []
    for budget in load.budgets_by_compute(runs):
        d = runs[runs["budget"] == budget]
        f = fit_u_curve(d, n_boot=n_boot, level=level)
        rows.append({
            "budget": budget, "n_rho": f["n_points"], "runs": f["n_runs"],
            "seeds": d["seed"].nunique(), "rho*": num(f["rho_star"], ".3f"),
            f"CI{level:.0%}": ci(f["ci_low"], f["ci_high"]), "model": f["model"] or "-",
            "L*": num(f["l_star"]) if f["is_u_shaped"] else "-",
            "spline rho*": num(f["spline_rho_star"], ".3f"),
            "U-shaped": "yes" if f["is_u_shaped"] else "no", "reason": f["reason"],
        })
    return pd.DataFrame(rows)


def memory_fit(runs: pd.DataFrame, *, n_boot: int = 500, level: float = 0.95
               ) -> tuple[str | None, dict[str, Any]]:
    """The power-law fit of a memory grid over its memory column (runs with memory > 0).

    Returns:
        (column name or None, the :func:`analysis.fit.fit_power_law` dict).
    """
    col = load.memory_column(runs)
    if col is None:
        return None, fit_power_law([], [], n_boot=0)
    d = runs[runs[col] > 0]
    return col, fit_power_law(d[col], d["val_loss"], n_boot=n_boot, level=level)
