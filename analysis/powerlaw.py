"""Saturating power law ``L = E + A x^-alpha``, loss against memory (docs/paper.md section 3).

The paper shows validation loss falling as a straight line in log-log against Engram slots
(~ -0.028 per 10x slots at a fixed MoE backbone). Fitting the three-parameter law on log L with a
Huber loss (the Chinchilla-style recipe, Hoffmann et al. 2022, appendix D.2) keeps one bad run
from dragging the exponent; L-BFGS-B from a grid of starts avoids the many poor local minima of
the E/alpha trade-off.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from scipy.optimize import minimize

from analysis._blas import single_threaded_blas

NAN = float("nan")
ALPHA_MAX = 3.0
HUBER_DELTA = 1e-3


def power_law(x: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    """Evaluates E + A x^-alpha."""
    return E + A * np.asarray(x, float) ** (-alpha)


def _objective(theta: np.ndarray, logu: np.ndarray, logy: np.ndarray, delta: float):
    """Summed Huber loss of r = log(E + A u^-alpha) - log y and its gradient in theta.

    theta = (log E, log A_u, alpha) with u = x / x_ref; exp keeps E and A positive. The loss is
    divided by delta^2 so that L-BFGS-B's absolute tolerances mean something at r ~ 1e-3.
    """
    log_e, log_a, alpha = theta
    e = np.exp(log_e)
    t = np.exp(log_a - alpha * logu)  # A u^-alpha
    pred = e + t
    r = np.log(pred) - logy
    ar = np.abs(r)
    loss = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum() / delta**2
    dr = np.clip(r, -delta, delta) / delta**2
    grad = np.array([
        np.sum(dr * e / pred),
        np.sum(dr * t / pred),
        np.sum(dr * (-t * logu) / pred),
    ])
    return float(loss), grad


def _minimise(logu, logy, starts, delta, bounds, maxiter=2000):
    best = None
    for s in starts:
        r = minimize(_objective, s, args=(logu, logy, delta), jac=True, method="L-BFGS-B",
                     bounds=bounds, options={"maxiter": maxiter, "ftol": 1e-14, "gtol": 1e-10})
        if np.all(np.isfinite(r.x)) and (best is None or r.fun < best.fun):
            best = r
    return best


def _starts(u: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """A grid over (E, alpha); A_u set so the curve passes near the data for that pair."""
    out = []
    for frac, alpha in itertools.product((1e-3, 0.5, 0.9, 0.98), (0.05, 0.2, 0.5, 1.0, 2.0)):
        e = frac * y.min()
        a = max(float(np.mean((y - e) * u**alpha)), 1e-8 * y.max())
        out.append(np.array([np.log(e), np.log(a), alpha]))
    return out


def fit_power_law(
    x, y, *, n_boot: int = 500, seed: int = 0, level: float = 0.95, delta: float = HUBER_DELTA,
    min_points: int = 4,
) -> dict[str, Any]:
    """Fits L = E + A x^-alpha with a Huber loss on log L, with bootstrap intervals.

    Args:
        x: memory sizes (e.g. Engram slots), shape [N]; must be > 0.
        y: losses, shape [N]; must be > 0. NaN pairs are dropped; repeated x (seeds) are fine.
        n_boot: bootstrap replicates resampling points (0 skips the intervals).
        seed: seed of the bootstrap generator.
        level: confidence level of the percentile intervals.
        delta: Huber threshold on the log-loss residual.
        min_points: fewest finite points accepted (3 parameters need >= 4 for any check).

    Returns:
        ``E``, ``A``, ``alpha`` (A in the units of x), ``E_ci``, ``A_ci``, ``alpha_ci`` (low,
        high), ``ok``, ``reason``, ``n_points``, ``loss`` (the Huber objective / delta^2),
        ``boot_samples`` [m, 3] of (E, A, alpha). ``ok`` is False, with NaNs, when the data
        cannot support the fit.
    """
    with single_threaded_blas():
        return _fit(x, y, n_boot, seed, level, delta, min_points)


def _fit(x, y, n_boot, seed, level, delta, min_points) -> dict[str, Any]:
    res: dict[str, Any] = {"E": NAN, "A": NAN, "alpha": NAN, "E_ci": (NAN, NAN),
                           "A_ci": (NAN, NAN), "alpha_ci": (NAN, NAN), "ok": False, "reason": "",
                           "n_points": 0, "loss": NAN, "boot_samples": np.empty((0, 3))}
    try:
        x = np.asarray(x, float).ravel()
        y = np.asarray(y, float).ravel()
    except (TypeError, ValueError):
        res["reason"] = "x and y must be numeric arrays"
        return res
    if x.shape != y.shape:
        res["reason"] = f"x and y differ in length ({x.size} vs {y.size})"
        return res
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    res["n_points"] = int(x.size)
    if np.any(x <= 0) or np.any(y <= 0):
        res["reason"] = "x and y must be > 0 for a power law in log space (drop the x=0 baseline)"
        return res
    if x.size < min_points or np.unique(x).size < min_points:
        res["reason"] = (f"needs >= {min_points} points at distinct x for 3 parameters, got "
                         f"{np.unique(x).size} distinct of {x.size}")
        return res
    if np.ptp(y) <= 1e-12 * y.max():
        res["reason"] = "y is constant: no power-law decay to fit"
        return res

    x_ref = float(np.exp(np.mean(np.log(x))))  # conditions A: u = x / x_ref is O(1)
    logu, logy = np.log(x / x_ref), np.log(y)
    bounds = [(np.log(1e-6 * y.min()), np.log(y.max())),
              (np.log(1e-10 * y.max()), np.log(1e4 * y.max())), (1e-4, ALPHA_MAX)]
    best = _minimise(logu, logy, _starts(x / x_ref, y), delta, bounds)
    if best is None:
        res["reason"] = "optimiser failed from every start"
        return res

    def natural(theta):
        return np.exp(theta[0]), np.exp(theta[1]) * x_ref ** theta[2], theta[2]

    e, a, alpha = natural(best.x)
    res.update(E=float(e), A=float(a), alpha=float(alpha), loss=float(best.fun), ok=True,
               reason="ok")
    if alpha >= ALPHA_MAX - 1e-6 or alpha <= 1e-3:
        res["reason"] = f"ok, but alpha={alpha:.3g} sits at its bound (0, {ALPHA_MAX:g}]"

    if n_boot > 0:
        rng = np.random.default_rng(seed)
        # Replicates start at the full-data optimum (they sit near it); one that lands on a
        # bound is retried from the whole grid of starts. Retries are budgeted: on nearly flat
        # data most replicates hit a bound, and retrying each one cost minutes for a wide interval
        # that the first replicates already show.
        all_starts = _starts(x / x_ref, y)
        samples = []
        retries = max(10, n_boot // 10)
        for _ in range(n_boot):
            idx = rng.integers(0, x.size, x.size)
            if np.unique(x[idx]).size < 3:
                continue
            # Replicates get fewer iterations than the main fit: they start at its optimum.
            b = _minimise(logu[idx], logy[idx], [best.x], delta, bounds, maxiter=300)
            if (b is None or not 1e-3 < b.x[2] < ALPHA_MAX - 1e-6) and retries > 0:
                retries -= 1
                b = _minimise(logu[idx], logy[idx], all_starts, delta, bounds, maxiter=300)
            if b is not None:
                samples.append(natural(b.x))
        if len(samples) >= 10:
            s = np.array(samples)
            q = [(1 - level) / 2, (1 + level) / 2]
            res["E_ci"], res["A_ci"], res["alpha_ci"] = (
                tuple(float(v) for v in np.quantile(s[:, j], q)) for j in range(3))
            res["boot_samples"] = s
    return res
