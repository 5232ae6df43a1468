"""Fit summaries as tables: shared by the CLI and the notebooks."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis import load
from analysis.fit import fit_power_law, fit_u_curve


# Printed precision of an estimate with an interval: the interval's width to two significant
# digits, so one unit of the last digit is 1-10% of the width. Bootstrap percentiles and the
# optima of ill-conditioned fits move by less than that between CPUs (BLAS and optimizer
# rounding), and by far more when a committed result really changes. The README check
# (analysis.readme.same) allows one unit of the last printed digit, so a number that sits on a
# rounding boundary may flip either way.
WIDTH_DIGITS = 2
MAX_DECIMALS = 4


def decimals(lo: float, hi: float, *, most: int = MAX_DECIMALS) -> int:
    """Decimals that print the width ``hi - lo`` to ``WIDTH_DIGITS`` significant digits.

    Args:
        lo, hi: the interval's ends.
        most: the cap, used too when the width is zero or undefined.
    """
    w = abs(hi - lo)
    if not math.isfinite(w) or w == 0:
        return most
    return int(min(most, max(0, WIDTH_DIGITS - 1 - math.floor(math.log10(w)))))


def ci(lo: float, hi: float, *, sign: bool = False, digits: int | None = None) -> str:
    """Formats an interval at the precision its width supports, "-" when it is undefined.

    Args:
        lo, hi: the ends.
        sign: print a leading "+" on positive ends.
        digits: fixed decimals instead of the width's.
    """
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "-"
    d = decimals(lo, hi) if digits is None else digits
    f = f"{'+' if sign else ''}.{d}f"
    return f"[{lo:{f}}, {hi:{f}}]"


def est(v: float, lo: float, hi: float, *, sign: bool = False) -> str:
    """An estimate and its interval, both at the precision the interval supports:
    ``"0.14 [0.03, 0.35]"``; the estimate alone (4 decimals) when there is no interval."""
    if v is None or not math.isfinite(v):
        return "-"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:{'+' if sign else ''}.4f}"
    d = decimals(lo, hi)
    return f"{v:{'+' if sign else ''}.{d}f} {ci(lo, hi, sign=sign, digits=d)}"


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
            "seeds": d["seed"].nunique(),
            "rho*": num(f["rho_star"], f".{decimals(f['ci_low'], f['ci_high'], most=3)}f"),
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
