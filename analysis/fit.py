"""Pure fitters for the paper's sparsity-allocation curve (docs/paper.md section 2).

The paper reports validation loss against rho (share of sparse parameters kept in routed experts)
as U-shaped with its optimum near rho 0.75-0.8, from one run per point and no fitted curve. Real
allocation curves are asymmetric (the paper's rises about four times faster towards rho = 1 than
towards 0.4; ours jumps 0.2 nats from rho 0.9 to 1.0 and is nearly flat below), so a parabola
around the minimum is biased towards the flatter side. :func:`fit_u_curve` models the whole curve:

1. Seed effects. When a ``seed`` column is present and seeds are crossed with x, a per-seed offset
   is removed first (an additive two-way fit): a seed that is worse everywhere moves no optimum.
   The pure-error variance s^2 comes from the remaining within-x scatter.
2. Shape test (:mod:`analysis.ushape`): "U-shaped" needs the best valley fit (isotonic regression,
   non-increasing then non-decreasing) to beat the best monotone fit by more than the
   least-favourable critical value at size ``alpha_shape`` (default 0.01): a curve that is
   monotone, flat, or flat at its low end is called U-shaped at most that often. The size is
   the largest that keeps the false-U rate at or below 1%, chosen for power: at 0.005 the test
   missed valleys 4-6 standard errors of a seed mean deep (``results/calibration/``, "Power").
3. Candidate shapes, all ``L* + a (x*-x)_+^p + b (x-x*)_+^q`` with a, b >= 0 over the whole grid:
   the vertex parabola (3 parameters), the two-sided parabola (4) and the two-sided power form
   (p, q in 1.25..6; 6 parameters), each fitted exactly on a 0.005 grid of x* over the data range.
   One is chosen by AIC with the pure-error variance (RSS / s^2 + 2 k).
4. Interval: a seed-level residual bootstrap: residuals of the runs about their x means (seed
   effects removed), rescaled by sqrt(N / dof) so that three seeds per x do not understate the
   noise, are resampled onto the means, and steps 3 (the choice of shape included) are redone;
   the percentile interval of x* is reported. A replicate whose chosen curve does not rise on
   one side puts its optimum at that edge of the grid, so an interval can reach the edge.

Calibration (``python -m analysis.calibrate``; the table and its provenance are in
``results/calibration/``), 95% nominal, 3 seeds per rho on 0.3..1.0, noise 0.002-0.005:
400 draws per family (seed 0; tuned on other draws), coverage / mean width / bias of rho*:
symmetric 0.953 / 0.28 / -0.006; asymmetric, steep towards rho = 1: 0.973 / 0.20 / +0.004;
steep towards small rho: 0.988 / 0.21 / -0.003; optimum 0.02-0.08 inside the upper edge:
0.965 / 0.24 / -0.027; inside the lower edge: 0.970 / 0.24 / +0.026. Flat, monotone and
plateau curves: called U-shaped in 0 of 1200 draws. The slope of :func:`fit_optimum_vs_compute`
(three budgets): 95% intervals cover the true slope in 0.960 of 200 draws. The intervals are
wide (0.2-0.3 in rho at noise 0.002-0.005): that is what three seeds on a 0.1 grid support once
the shape of the curve is not assumed. With one run per x the noise comes from a fitted curve's
few residual dof and the shape test is weak; that setting is not calibrated.

The power-law fitter for memory scaling (docs/paper.md section 3) lives in
:mod:`analysis.powerlaw` and is re-exported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.interpolate import Akima1DInterpolator

from analysis import ushape
from analysis._blas import single_threaded_blas
from analysis.powerlaw import fit_power_law

__all__ = ["fit_u_curve", "fit_power_law", "fit_optimum_vs_compute"]

NAN = float("nan")
PARAMS = ("x_star", "l_star", "a", "b", "p", "q")


def _spline_argmin(xs: np.ndarray, means: np.ndarray) -> float:
    if len(xs) < 3:
        return NAN
    fine = np.linspace(xs[0], xs[-1], 2001)
    vals = Akima1DInterpolator(xs, means)(fine)
    return float(fine[int(np.nanargmin(vals))])


def _remove_seed_effects(x_i, y_i, seed_i):
    """Per-seed offsets of an additive (x, seed) model, centred; None when not estimable."""
    if seed_i is None:
        return None
    seeds, s_inv = np.unique(seed_i, return_inverse=True)
    xs, x_inv = np.unique(x_i, return_inverse=True)
    if len(seeds) < 2 or np.bincount(s_inv).min() < 2:
        return None
    design = np.zeros((len(y_i), len(xs) + len(seeds) - 1))
    design[np.arange(len(y_i)), x_inv] = 1.0
    rows = np.flatnonzero(s_inv > 0)
    design[rows, len(xs) + s_inv[rows] - 1] = 1.0
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return None  # seeds not connected through shared x values
    coef = np.linalg.lstsq(design, y_i, rcond=None)[0]
    eff = np.concatenate([[0.0], coef[len(xs):]])
    eff -= eff.mean()
    return eff[s_inv], len(seeds) - 1


def _empty(level: float) -> dict[str, Any]:
    return {
        "rho_star": NAN, "ci_low": NAN, "ci_high": NAN, "l_star": NAN, "k": NAN,
        "is_u_shaped": False, "reason": "", "profile_ci": (NAN, NAN), "bootstrap_ci": (NAN, NAN),
        "spline_rho_star": NAN, "n_points": 0, "n_runs": 0, "level": level, "dof": 0,
        "x_min_empirical": NAN, "x_range": (NAN, NAN), "window": (NAN, NAN), "model": "", "params": {},
        "rho_star_se": NAN, "sigma": NAN, "seed_effects": False, "shape_stat": NAN,
        "shape_crit": NAN, "bootstrap_method": "", "boot_frac_u": NAN,
        "boot_models": {}, "boot_samples": np.empty((0, 6)), "curve_x": np.empty(0),
        "curve_y": np.empty(0), "band": (np.empty(0), np.empty(0)),
    }


def fit_u_curve(
    df: pd.DataFrame, x: str = "rho", y: str = "val_loss", *, n_boot: int = 1000, seed: int = 0,
    level: float = 0.95, alpha_shape: float = 0.01, seed_col: str | None = "seed",
    penalty: float = 2.0, shape_only: bool = False,
) -> dict[str, Any]:
    """Fits the loss-vs-rho curve and its optimum, never raising on degenerate data.

    Args:
        df: one row per run (several seeds per x allowed); NaN rows are dropped.
        x, y: column names of the allocation ratio and the loss.
        n_boot: bootstrap replicates (0 skips the interval).
        seed: seed of the bootstrap generator.
        level: confidence level of the interval for rho*.
        alpha_shape: size of the shape test (the rate at which a monotone or flat curve is
            called U-shaped, at most).
        seed_col: column naming the training seed; its per-seed offsets are removed when seeds
            are crossed with x (None: never).
        penalty: per-parameter penalty of the shape choice (2 = AIC).
        shape_only: stop after the shape test (``shape_stat``, ``shape_crit``, ``dof`` and
            ``counts`` set, no verdict): what a power study of the test needs.

    Returns:
        A dict: ``rho_star``, ``l_star``, ``ci_low``/``ci_high`` (the bootstrap percentile
        interval), ``is_u_shaped`` and ``reason``; ``model`` (the chosen shape) and ``params``
        (x_star, l_star, a, b, p, q of :func:`analysis.ushape.predict`); ``rho_star_se``
        (bootstrap sd), ``bootstrap_ci`` (= the interval), ``profile_ci`` (the chosen shape's
        profile-likelihood interval, a model-conditional diagnostic), ``spline_rho_star``
        (Akima argmin of the means), ``boot_samples`` [m, 6] of the replicates' params,
        ``boot_models`` (share of replicates per shape), ``curve_x``/``curve_y`` (the chosen
        curve on the x* grid of the fitted window) and ``band`` (its pointwise bootstrap
        interval), ``window`` (the x range fitted), ``sigma`` and ``dof`` (pure error),
        ``shape_stat``/``shape_crit`` (the shape test), ``n_points``, ``n_runs``. When
        ``is_u_shaped`` is False, rho_star and the interval are NaN and ``reason`` says why.
    """
    with single_threaded_blas():
        return _fit_u(df, x, y, n_boot, seed, level, alpha_shape, seed_col, penalty, shape_only)


def _fit_u(df, x, y, n_boot, seed, level, alpha_shape, seed_col, penalty, shape_only=False) -> dict[str, Any]:
    res = _empty(level)
    if x not in df.columns or y not in df.columns:
        res["reason"] = f"missing column(s): need {x!r} and {y!r}"
        return res
    d = pd.DataFrame({"x": pd.to_numeric(df[x], errors="coerce"),
                      "y": pd.to_numeric(df[y], errors="coerce")})
    if seed_col and seed_col in df.columns:
        d["s"] = df[seed_col].astype(str).to_numpy()
    d = d[np.isfinite(d["x"]) & np.isfinite(d["y"])]
    xr, yr = d["x"].to_numpy(float), d["y"].to_numpy(float)
    xs, inv = np.unique(xr, return_inverse=True)
    res.update(n_points=len(xs), n_runs=len(xr))
    if len(xs) < 3:
        res["reason"] = f"needs >= 3 distinct {x} values with finite {y}, got {len(xs)}"
        return res
    counts = np.bincount(inv).astype(float)
    n_sfx = 0
    se = _remove_seed_effects(xr, yr, d["s"].to_numpy() if "s" in d else None)
    if se is not None and len(xr) - len(xs) - se[1] >= 2:
        yr = yr - se[0]
        n_sfx = se[1]
        res["seed_effects"] = True
    means = np.bincount(inv, weights=yr) / counts
    res["x_range"] = (float(xs[0]), float(xs[-1]))
    res["spline_rho_star"] = _spline_argmin(xs, means)
    if np.ptp(means) <= 1e-12 * max(1.0, float(np.abs(means).max())):
        res["reason"] = f"flat: mean {y} is the same at every {x}"
        return res
    i_min = int(np.argmin(means))
    res["x_min_empirical"] = float(xs[i_min])
    bank = None  # built when a fit needs it (not for a shape test alone)
    resid = yr - means[inv]
    dof = len(xr) - len(xs) - n_sfx
    method = "seed-level residuals (within-x scatter) resampled onto the x means"
    if dof < 2:  # one run per x: the noise can only come from a fitted curve
        bank = ushape.ShapeBank(xs, counts)
        two = bank.fit(means[None], 1.0, 0.0, shapes=("two-sided parabola",))
        dof = len(xs) - 4
        if dof < 1:
            if 0 < i_min < len(xs) - 1:
                res.update(is_u_shaped=True, rho_star=float(xs[i_min]), l_star=float(means[i_min]),
                           reason="interior minimum, but no residual dof for a test or interval")
            else:
                res["reason"] = "minimum at the grid edge and no residual dof for a test"
            return res
        fitted = ushape.predict(xs, *(two[k] for k in PARAMS))[0]
        resid = (means - fitted) * np.sqrt(len(xs) / dof)
        resid_idx = np.arange(len(xs))
        s2 = float(np.sum(counts * (means - fitted) ** 2) / dof)
        method = "residuals of a two-sided parabola resampled (one run per x; model-based)"
    else:
        s2 = float(resid @ resid / dof)
        resid = resid * np.sqrt(len(xr) / dof)
        resid_idx = None
    s2 = max(s2, 1e-30)
    res.update(dof=int(dof), sigma=float(np.sqrt(s2)), bootstrap_method=method)

    t = float(ushape.shape_statistic(means[None], counts)[0]) / s2
    crit = ushape.critical_value(tuple(counts), int(dof), alpha_shape)
    res.update(shape_stat=t, shape_crit=crit, counts=tuple(float(c) for c in counts))
    if shape_only:
        res["reason"] = "shape test only"
        return res
    if t <= crit:
        edge = ""
        if i_min in (0, len(xs) - 1):
            edge = f"; the lowest mean is at the grid edge ({x}={xs[i_min]:g})"
        res["reason"] = (f"no interior optimum: a valley fits no better than a monotone curve "
                         f"(shape statistic {t:.1f} <= {crit:.1f}, size {alpha_shape:g}){edge}")
        return res
    bank, fit, win = _fit_window(xs, counts, means, s2, dof, penalty, bank)
    means, counts = means[win], counts[win]
    pt = {k: float(fit[k][0]) for k in PARAMS}
    model = ushape.SHAPES[int(fit["shape"][0])]
    res.update(curve_x=bank.centres, curve_y=fit["curve"][0])
    res.update(model=model, params=pt, l_star=pt["l_star"], window=(float(xs[win][0]),
                                                                   float(xs[win][-1])))
    if model == "parabola":
        res["k"] = pt["a"]
    if not (pt["a"] > 0 and pt["b"] > 0 and xs[win][0] < pt["x_star"] < xs[win][-1]):
        res["reason"] = (f"the best-fitting curve ({model}) has its optimum at the grid edge "
                         "although a valley fits better than a monotone curve")
        return res
    # The profile interval of the most flexible shape carries what the bootstrap cannot: how far
    # x* can move while some two-sided curve still fits (e.g. an optimum between the last two
    # points). The reported interval spans both.
    # Where even that shape lacks fit, its residual variance (not the pure error) scales the
    # profile, so a misfitting shape widens the interval instead of narrowing it.
    m_w = len(means)
    s2_prof = max(s2, float(np.nanmin(fit["profile_power"][0])) / max(m_w - 6, 1))
    prof = _profile_ci(bank, fit["profile_power"][0], s2_prof, dof, level)
    res["profile_ci"] = prof
    lo, hi = NAN, NAN
    if n_boot > 0:
        boot, curves = _bootstrap(bank, means, counts, resid, resid_idx, s2, penalty, n_boot,
                                  seed)
        a = (1 - level) / 2
        res["band"] = tuple(np.quantile(curves, [a, 1 - a], axis=0))
        xb = boot[:, 0]
        res["boot_samples"] = boot
        res["boot_frac_u"] = float(np.mean((xb > xs[0]) & (xb < xs[-1])))
        shapes_b = boot[:, 6].astype(int)
        res["boot_models"] = {s: float(np.mean(shapes_b == i)) for i, s in enumerate(ushape.SHAPES)}
        a = (1 - level) / 2
        lo, hi = (float(v) for v in np.quantile(xb, [a, 1 - a]))
        res["rho_star_se"] = float(np.std(xb))
        res["boot_samples"] = boot[:, :6]
    res["bootstrap_ci"] = (lo, hi)
    if n_boot > 0 and np.isfinite(prof[0]):
        lo, hi = min(lo, prof[0]), max(hi, prof[1])
    note = ""
    if lo <= xs[0] or hi >= xs[-1]:
        note = "; the interval reaches the grid edge (the optimum may lie at or beyond it)"
    res.update(is_u_shaped=True, rho_star=pt["x_star"], ci_low=lo, ci_high=hi,
               reason=f"U-shaped: a valley beats every monotone fit (shape statistic {t:.1f} > "
               f"{crit:.1f}); {model} chosen by AIC{note}")
    return res


def _fit_window(xs, counts, means, s2, dof, penalty, bank, p_lof=0.01, min_points=5):
    """The chosen shape's fit, on the whole grid unless it lacks fit there.

    The candidates describe a minimum and the rise on each side, not every far point: a steep
    far end that no candidate follows (a lack-of-fit F test at p_lof) would pull x* towards it.
    Then the outermost point with the higher mean is dropped, while >= min_points remain.

    Returns:
        (the bank of the window, the fit dict, the window's index array into xs).
    """
    lo, hi = 0, len(xs) - 1
    if bank is None:
        bank = ushape.ShapeBank(xs, counts)
    while True:
        win = np.arange(lo, hi + 1)
        fit = bank.fit(means[None, win], s2, penalty)
        k = ushape.N_PARAMS[ushape.SHAPES[int(fit["shape"][0])]]
        m = len(win)
        lof = stats.f.sf(fit["rss"][0] / max(m - k, 1) / s2, max(m - k, 1), max(dof, 1))
        if lof >= p_lof or m <= min_points:
            return bank, fit, win
        i_min = lo + int(np.argmin(means[win]))
        if means[lo] >= means[hi] and i_min > lo:
            lo += 1
        elif i_min < hi:
            hi -= 1
        else:
            return bank, fit, win
        bank = ushape.ShapeBank(xs[lo:hi + 1], counts[lo:hi + 1])


def _profile_ci(bank, profile, s2, dof, level) -> tuple[float, float]:
    """x* values whose profiled RSS is within s^2 F(1, dof) of the minimum (range of the set)."""
    if not np.all(np.isfinite(profile)):
        return NAN, NAN  # polynomials have no profile over x*
    thresh = profile.min() + s2 * stats.f.ppf(level, 1, max(dof, 1))
    inside = bank.centres[profile <= thresh]
    return float(inside.min()), float(inside.max())


def _bootstrap(bank, means, counts, resid, resid_idx, s2, penalty, n_boot, seed):
    """[n_boot, 7] replicates of (x*, L*, a, b, p, q, shape index) and their curves [n_boot, C].

    Each replicate adds to every x mean the mean of counts[x] residuals drawn from the pooled,
    rescaled residuals, and redoes the shape choice and fit. A replicate whose chosen curve has no
    rise on one side (a = 0 or b = 0) has its optimum at that edge of the grid.
    """
    rng = np.random.default_rng(seed)
    n = len(means)
    out = np.zeros((n_boot, 7))
    curves = np.zeros((n_boot, len(bank.centres)))
    lo_x, hi_x = bank.centres[0], bank.centres[-1]
    for start in range(0, n_boot, 250):
        nb = min(250, n_boot - start)
        if resid_idx is None:
            draws = np.stack([rng.choice(resid, size=(nb, int(c))).mean(axis=1) for c in counts],
                             axis=1)
        else:  # one run per x: one resampled residual per mean
            draws = rng.choice(resid, size=(nb, n))
        f = bank.fit(means[None, :] + draws, s2, penalty)
        xb = np.where(f["a"] <= 0, lo_x, np.where(f["b"] <= 0, hi_x, f["x_star"]))
        out[start:start + nb] = np.column_stack(
            [xb, f["l_star"], f["a"], f["b"], f["p"], f["q"], f["shape"]])
        curves[start:start + nb] = f["curve"]
    return out, curves


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
        fewer than 3 budgets; inflated by the Birge ratio when the budgets scatter more than
        their intervals say), ``b_ci`` (b +- z b_se at ``level``) and ``per_budget``: a DataFrame of budget, compute, rho_star,
        ci_low, ci_high, is_u_shaped, reason.
    """
    out: dict[str, Any] = {"ok": False, "reason": "", "a": NAN, "b": NAN, "b_se": NAN,
                           "b_ci": (NAN, NAN), "per_budget": pd.DataFrame()}
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
    b_se = NAN
    if len(use) >= 3:
        # Birge ratio: budgets scattering about the line more than their intervals allow widen
        # the slope's error (never narrow it).
        chi2 = float(np.sum(w * (r - a - b * lc) ** 2))
        b_se = float(np.sqrt(cov[1, 1] * max(1.0, chi2 / (len(use) - 2))))
    out.update(ok=True, a=float(a), b=float(b), b_se=b_se,
               b_ci=(float(b - z * b_se), float(b + z * b_se)),
               reason=f"weighted fit over {len(use)} budgets")
    return out
