"""Pure fitters for the paper's sparsity-allocation curve (engram-paper.md section 2).

The paper reports validation loss against rho (share of sparse parameters kept in routed experts)
as U-shaped with its optimum near rho 0.75-0.8, from one run per point and no fitted curve. Here
the optimum is estimated with its uncertainty, and "no U-shape" is a first-class answer:

* a vertex-form parabola ``L = L* + k (x - x*)^2`` fitted by least squares to the runs around the
  empirical minimum of the per-x means (the parabola is only a local model of the minimum);
* a profile-likelihood interval for x* (RSS profiled over x*, F threshold);
* a run-level bootstrap interval (resample runs within each x, redo the whole procedure);
* an Akima-spline argmin of the means as a model-light cross-check.

Checked on synthetic data (tests/test_fit.py): with a parabolic truth the 95% profile interval
covers the true optimum in 95% of 200 repetitions. A curve that rises faster on the low-rho side
than the high side (as the paper's does towards rho -> 0) biases the local parabola's rho* towards
the flatter side by ~0.01 and lowers coverage (~70% in a cubic-asymmetry check); the spline argmin
is the model-light check for that.

The power-law fitter for memory scaling (section 3) lives in :mod:`analysis.powerlaw` and is
re-exported here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.interpolate import Akima1DInterpolator

from analysis.powerlaw import fit_power_law

__all__ = ["fit_u_curve", "fit_power_law", "fit_optimum_vs_compute"]

NAN = float("nan")


def _vertex_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Least-squares parabola in vertex form. Returns (x*, L*, k, rss).

    L* + k (x - x*)^2 is the quadratic a + b x + c x^2 with c = k, x* = -b / 2c, so the linear
    least-squares solution is the vertex-form least-squares solution; it is closed form, which
    keeps thousands of bootstrap refits cheap.
    """
    c, b, a = np.polyfit(x, y, 2)
    rss = float(np.sum((np.polyval([c, b, a], x) - y) ** 2))
    if c == 0:
        return NAN, NAN, 0.0, rss
    xs = -b / (2 * c)
    return float(xs), float(a - b * b / (4 * c)), float(c), rss


def _profile_rss(x: np.ndarray, y: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """RSS of the best parabola with its vertex fixed at each centre and k >= 0.

    With x* fixed the model is linear in (L*, k); k < 0 is clipped to 0 (a flat line) because a
    vertex that is a maximum is no candidate for the optimum.
    """
    z = (x[None, :] - centres[:, None]) ** 2  # [C, n]
    zc = z - z.mean(axis=1, keepdims=True)
    yc = y - y.mean()
    szz = np.sum(zc * zc, axis=1)
    szy = zc @ yc
    syy = float(yc @ yc)
    k = np.where(szz > 0, szy / np.where(szz > 0, szz, 1.0), 0.0)
    return np.where(k > 0, syy - k * szy, syy)


def _profile_ci(x, y, x_star, rss_min, level) -> tuple[float, float]:
    """Profile-likelihood interval for x*; +-inf where the set reaches the scan limits."""
    dof = len(x) - 3
    span = float(x.max() - x.min())
    centres = np.linspace(x.min() - 3 * span, x.max() + 3 * span, 6001)
    rss = _profile_rss(x, y, centres)
    rss_min = min(rss_min, float(rss.min()))
    thresh = rss_min * (1 + stats.f.ppf(level, 1, dof) / dof)
    inside = rss <= thresh + 1e-15 * max(1.0, thresh)
    i0 = int(np.argmin(np.abs(centres - x_star)))
    if not inside[i0]:
        inside[i0] = True  # grid resolution: the vertex itself always belongs to its interval
    lo = i0
    while lo > 0 and inside[lo - 1]:
        lo -= 1
    hi = i0
    while hi < len(centres) - 1 and inside[hi + 1]:
        hi += 1

    def edge(i_in: int, i_out: int) -> float:
        # Linear interpolation of the threshold crossing between neighbouring scan points.
        r0, r1 = rss[i_in], rss[i_out]
        t = 0.0 if r1 == r0 else (thresh - r0) / (r1 - r0)
        return float(centres[i_in] + np.clip(t, 0, 1) * (centres[i_out] - centres[i_in]))

    low = -math.inf if lo == 0 else edge(lo, lo - 1)
    high = math.inf if hi == len(centres) - 1 else edge(hi, hi + 1)
    return low, high


def _spline_argmin(xs: np.ndarray, means: np.ndarray) -> float:
    if len(xs) < 3:
        return NAN
    fine = np.linspace(xs[0], xs[-1], 2001)
    vals = Akima1DInterpolator(xs, means)(fine)
    return float(fine[int(np.nanargmin(vals))])


def _window(xs: np.ndarray, i_min: int, neighbours: int) -> tuple[float, float]:
    """x-range of the min and its neighbours, widened to >= 3 distinct x (all if few)."""
    if len(xs) <= 2 * neighbours + 1:
        return float(xs[0]), float(xs[-1])
    lo, hi = max(0, i_min - neighbours), min(len(xs) - 1, i_min + neighbours)
    while hi - lo < 2:
        lo, hi = max(0, lo - 1), min(len(xs) - 1, hi + 1)
    return float(xs[lo]), float(xs[hi])


def _estimate(x: np.ndarray, y: np.ndarray, neighbours: int) -> tuple[float, float, float]:
    """The point estimate as a function of the runs: (x*, L*, k), x* NaN if not an interior U."""
    xs, inv = np.unique(x, return_inverse=True)
    means = np.bincount(inv, weights=y) / np.bincount(inv)
    i_min = int(np.argmin(means))
    if len(xs) < 3 or i_min in (0, len(xs) - 1):
        return NAN, NAN, NAN
    lo, hi = _window(xs, i_min, neighbours)
    m = (x >= lo) & (x <= hi)
    xv, lv, k, _ = _vertex_fit(x[m], y[m])
    if not (k > 0 and xs[0] < xv < xs[-1]):
        return NAN, NAN, NAN
    return xv, lv, k


def _empty(level: float) -> dict[str, Any]:
    return {
        "rho_star": NAN, "ci_low": NAN, "ci_high": NAN, "l_star": NAN, "k": NAN,
        "is_u_shaped": False, "reason": "", "profile_ci": (NAN, NAN), "bootstrap_ci": (NAN, NAN),
        "spline_rho_star": NAN, "n_points": 0, "n_runs": 0, "level": level, "dof": 0,
        "x_min_empirical": NAN, "x_vertex": NAN, "window": (NAN, NAN), "x_range": (NAN, NAN),
        "bootstrap_method": "", "boot_frac_u": NAN, "boot_samples": np.empty((0, 3)),
    }


def fit_u_curve(
    df: pd.DataFrame, x: str = "rho", y: str = "val_loss", *, n_boot: int = 1000, seed: int = 0,
    level: float = 0.95, neighbours: int = 2,
) -> dict[str, Any]:
    """Fits the U-shaped loss-vs-rho curve and its optimum, never raising on degenerate data.

    Args:
        df: one row per run (several seeds per x allowed); NaN rows are dropped.
        x, y: column names of the allocation ratio and the loss.
        n_boot: bootstrap replicates (0 skips the bootstrap).
        seed: seed of the bootstrap generator.
        level: confidence level of both intervals.
        neighbours: x values on each side of the empirical minimum used by the parabola.

    Returns:
        A dict: ``rho_star`` (vertex x*), ``l_star``, ``k`` (curvature), ``ci_low``/``ci_high``
        (the profile interval, or the bootstrap one where no residual dof exist), ``profile_ci``,
        ``bootstrap_ci``, ``spline_rho_star``, ``is_u_shaped`` and ``reason``, ``n_points``
        (distinct x), ``n_runs``, plus diagnostics (``window``, ``x_min_empirical``,
        ``x_vertex``, ``dof``, ``boot_frac_u``, ``boot_samples`` [m, 3] of (x*, L*, k)).
        When ``is_u_shaped`` is False, rho_star and the intervals are NaN and ``reason`` says why.
    """
    res = _empty(level)
    if x not in df.columns or y not in df.columns:
        res["reason"] = f"missing column(s): need {x!r} and {y!r}"
        return res
    d = pd.DataFrame({"x": pd.to_numeric(df[x], errors="coerce"),
                      "y": pd.to_numeric(df[y], errors="coerce")})
    d = d[np.isfinite(d["x"]) & np.isfinite(d["y"])]
    xr, yr = d["x"].to_numpy(float), d["y"].to_numpy(float)
    xs, inv = np.unique(xr, return_inverse=True)
    res.update(n_points=len(xs), n_runs=len(xr))
    if len(xs) < 3:
        res["reason"] = f"needs >= 3 distinct {x} values with finite {y}, got {len(xs)}"
        return res
    counts = np.bincount(inv)
    means = np.bincount(inv, weights=yr) / counts
    res["x_range"] = (float(xs[0]), float(xs[-1]))
    res["spline_rho_star"] = _spline_argmin(xs, means)
    if np.ptp(means) <= 1e-12 * max(1.0, float(np.abs(means).max())):
        res["reason"] = f"flat: mean {y} is the same at every {x}"
        return res
    i_min = int(np.argmin(means))
    res["x_min_empirical"] = float(xs[i_min])
    if i_min in (0, len(xs) - 1):
        res["reason"] = (f"minimum at the grid edge ({x}={xs[i_min]:g}): monotone over "
                         f"[{xs[0]:g}, {xs[-1]:g}], optimum not bracketed")
        return res
    lo, hi = _window(xs, i_min, neighbours)
    res["window"] = (lo, hi)
    m = (xr >= lo) & (xr <= hi)
    wx, wy = xr[m], yr[m]
    xv, lv, k, rss = _vertex_fit(wx, wy)
    res.update(x_vertex=xv, k=k, dof=len(wx) - 3)
    if not k > 0:
        res["reason"] = f"fitted curvature k={k:.3g} <= 0 around the minimum: no U-shape"
        return res
    if not xs[0] < xv < xs[-1]:
        res["reason"] = f"fitted optimum {x}*={xv:.3g} lies at or beyond the grid edge"
        return res

    prof = (NAN, NAN)
    if len(wx) > 3:
        prof = _profile_ci(wx, wy, xv, rss, level)
    boot, method = _bootstrap(xr, yr, inv, counts, wx, wy, neighbours, n_boot, seed)
    res["bootstrap_method"] = method
    bci = (NAN, NAN)
    if len(boot):
        ok = np.isfinite(boot[:, 0])
        res["boot_frac_u"] = float(ok.mean())
        res["boot_samples"] = boot[ok]
        if ok.sum() >= 10:
            a = (1 - level) / 2
            bci = tuple(float(v) for v in np.quantile(boot[ok, 0], [a, 1 - a]))
    res.update(profile_ci=prof, bootstrap_ci=bci, l_star=lv)

    if len(wx) <= 3:
        res.update(is_u_shaped=True, rho_star=xv, ci_low=bci[0], ci_high=bci[1],
                   reason="interior minimum and k > 0, but no residual dof for a profile interval")
        return res
    if not (np.isfinite(prof[0]) and np.isfinite(prof[1])):
        res["reason"] = (f"curvature not significant: the {level:.0%} profile interval for {x}* "
                         "is unbounded (a monotone trend fits about as well)")
        return res
    note = ""
    if prof[0] < xs[0] or prof[1] > xs[-1]:
        note = "; interval extends past the grid"
    res.update(is_u_shaped=True, rho_star=xv, ci_low=prof[0], ci_high=prof[1],
               reason=f"U-shaped: interior minimum, k > 0, bounded {level:.0%} interval{note}")
    return res


def _bootstrap(xr, yr, inv, counts, wx, wy, neighbours, n_boot, seed):
    """Bootstrap replicates of (x*, L*, k); NaN rows where a replicate has no interior U.

    With several runs per x, runs are resampled within each x and the whole procedure (window
    choice included) is redone. With one run per x that resampling is the identity, so residuals
    of the window fit are resampled instead (a weaker, model-based bootstrap).
    """
    if n_boot <= 0:
        return np.empty((0, 3)), "none"
    rng = np.random.default_rng(seed)
    out = np.full((n_boot, 3), NAN)
    if counts.min() >= 2:
        groups = [np.flatnonzero(inv == g) for g in range(len(counts))]
        for b in range(n_boot):
            idx = np.concatenate([rng.choice(g, size=len(g)) for g in groups])
            out[b] = _estimate(xr[idx], yr[idx], neighbours)
        return out, "runs resampled within each x"
    if len(wx) <= 3:
        return np.empty((0, 3)), "none (one run per x and no residual dof)"
    coef = np.polyfit(wx, wy, 2)
    fit = np.polyval(coef, wx)
    resid = (wy - fit) * np.sqrt(len(wx) / (len(wx) - 3))  # undo the shrinkage of fitted residuals
    lo_x, hi_x = float(np.min(xr)), float(np.max(xr))
    for b in range(n_boot):
        xv, lv, k, _ = _vertex_fit(wx, fit + rng.choice(resid, size=len(wx)))
        if k > 0 and lo_x < xv < hi_x:
            out[b] = (xv, lv, k)
    return out, "residuals of the window fit resampled (one run per x)"


def fit_optimum_vs_compute(
    df: pd.DataFrame, *, x: str = "rho", y: str = "val_loss", n_boot: int = 300, seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Fits rho* = a + b log10(C) across compute budgets, weighted by the rho* interval widths.

    Args:
        df: runs with ``budget``, ``x``, ``y`` and ``compute`` (FLOPs per trial) columns.
        x, y, n_boot, seed, level: passed to :func:`fit_u_curve` for each budget.

    Returns:
        ``ok``, ``reason``, ``a``, ``b`` (change of rho* per 10x compute), ``b_se`` (NaN with
        fewer than 3 budgets) and ``per_budget``: a DataFrame of budget, compute, rho_star,
        ci_low, ci_high, is_u_shaped, reason.
    """
    out: dict[str, Any] = {"ok": False, "reason": "", "a": NAN, "b": NAN, "b_se": NAN,
                           "per_budget": pd.DataFrame()}
    if "budget" not in df.columns or "compute" not in df.columns:
        out["reason"] = "needs 'budget' and 'compute' (flops_per_token * tokens_seen) columns"
        return out
    rows = []
    for budget, g in df.groupby("budget", sort=False):
        f = fit_u_curve(g, x, y, n_boot=n_boot, seed=seed, level=level)
        rows.append({"budget": budget, "compute": float(g["compute"].median()),
                     "rho_star": f["rho_star"], "ci_low": f["ci_low"], "ci_high": f["ci_high"],
                     "is_u_shaped": f["is_u_shaped"], "reason": f["reason"]})
    per = pd.DataFrame(rows).sort_values("compute").reset_index(drop=True)
    out["per_budget"] = per
    if len(per) < 2:
        out["reason"] = f"needs >= 2 budgets to relate rho* to compute, got {len(per)}"
        return out
    use = per[per["is_u_shaped"] & np.isfinite(per["ci_low"]) & np.isfinite(per["ci_high"])
              & (per["compute"] > 0)]
    if len(use) < 2:
        out["reason"] = f"needs >= 2 budgets with a U-shaped fit and an interval, got {len(use)}"
        return out
    if use["compute"].nunique() < 2:
        out["reason"] = "the budgets share one compute value; rho* vs compute is undefined"
        return out
    z = stats.norm.ppf(0.5 + level / 2)
    sd = ((use["ci_high"] - use["ci_low"]) / (2 * z)).clip(lower=1e-6).to_numpy()
    lc, r = np.log10(use["compute"].to_numpy()), use["rho_star"].to_numpy()
    w = 1 / sd**2
    design = np.column_stack([np.ones_like(lc), lc])
    cov = np.linalg.inv(design.T @ (design * w[:, None]))  # known-variance weighted LS
    a, b = cov @ (design.T @ (w * r))
    out.update(ok=True, a=float(a), b=float(b),
               b_se=float(np.sqrt(cov[1, 1])) if len(use) >= 3 else NAN,
               reason=f"weighted fit over {len(use)} budgets")
    return out
