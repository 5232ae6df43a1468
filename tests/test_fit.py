"""The fitters recover known optima and exponents from noisy synthetic data, and say 'no' plainly.

Statistical tests use fixed seeds, so they are deterministic; the thresholds leave room for the
Monte-Carlo error of a few dozen repetitions (a 95% interval covering 38/40 on average; >= 0.8
asked). The full calibration is ``python -m analysis.calibrate`` (results/calibration/).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import ushape
from analysis.calibrate import run_u, summarise_u
from analysis.fit import fit_optimum_vs_compute, fit_power_law, fit_u_curve
from analysis.synthetic import FAMILIES

RHOS = np.round(np.arange(0.4, 1.001, 0.1), 2)
TRUE_RHO = 0.78


def u_data(rng, *, seeds=3, k=0.3, noise=0.002, x_star=TRUE_RHO, rhos=RHOS) -> pd.DataFrame:
    x = np.repeat(rhos, seeds)
    y = 1.8 + k * (x - x_star) ** 2 + rng.normal(0, noise, x.size)
    return pd.DataFrame({"rho": x, "val_loss": y, "seed": np.tile(np.arange(seeds), len(rhos))})


def test_u_fit_recovers_optimum():
    f = fit_u_curve(u_data(np.random.default_rng(0)), n_boot=200)
    assert f["is_u_shaped"], f["reason"]
    assert abs(f["rho_star"] - TRUE_RHO) < 0.03
    assert f["ci_low"] < f["rho_star"] < f["ci_high"]
    assert f["bootstrap_ci"][0] < f["bootstrap_ci"][1]
    assert abs(f["spline_rho_star"] - TRUE_RHO) < 0.06
    assert abs(f["l_star"] - 1.8) < 0.003 and f["model"] in ushape.SHAPES
    assert (f["n_points"], f["n_runs"]) == (7, 21)
    assert f["params"]["a"] > 0 and f["params"]["b"] > 0 and f["seed_effects"]


def asym_data(rng, x_star=0.8, noise=0.0025, seeds=3, seed_sd=0.0):
    # The paper's shape: four times steeper towards rho = 1 than towards small rho.
    x = np.repeat(np.round(np.arange(0.3, 1.001, 0.1), 2), seeds)
    u = x - x_star
    y = 1.71 + np.where(u < 0, 0.09 * (-u) ** 2, 0.35 * u**2)
    s = np.tile(np.arange(seeds), len(x) // seeds)
    y = y + rng.normal(0, noise, x.size) + rng.normal(0, seed_sd, seeds)[s]
    return pd.DataFrame({"rho": x, "val_loss": y, "seed": s})


def test_asymmetric_optimum_inside_interval():
    f = fit_u_curve(asym_data(np.random.default_rng(10)), n_boot=300)
    assert f["is_u_shaped"], f["reason"]
    assert f["ci_low"] <= 0.8 <= f["ci_high"] and abs(f["rho_star"] - 0.8) < 0.06


def test_seed_offsets_are_removed():
    # A seed that is worse at every rho (as seed 0 of cpu-small is) moves no optimum.
    f = fit_u_curve(asym_data(np.random.default_rng(11), seed_sd=0.02), n_boot=300)
    assert f["seed_effects"] and f["sigma"] < 0.004
    assert f["is_u_shaped"] and f["ci_low"] <= 0.8 <= f["ci_high"]


def test_issue_smoke_means_bracket_the_best_point():
    # Smoke shape at 5M tokens: the jump at rho = 1 must not drag rho* below the best point 0.8.
    rng = np.random.default_rng(12)
    mu = {1.0: 1.8255, 0.8: 1.7252, 0.5: 1.7320, 0.3: 1.7439}
    df = pd.DataFrame([(r, s, m + rng.normal(0, 0.003)) for r, m in mu.items()
                       for s in range(3)], columns=["rho", "seed", "val_loss"])
    f = fit_u_curve(df, n_boot=300)
    assert f["is_u_shaped"], f["reason"]
    assert f["ci_low"] <= 0.8 <= f["ci_high"]


def test_fast_calibration():
    # A small version of results/calibration/: every U family covered, no null called U.
    per = run_u(tuple(FAMILIES), draws=15, n_boot=150, seed=7)
    table = summarise_u(per).set_index("family")
    u = table[table["has_optimum"]]
    # The stated level with a binomial allowance: a 95% interval misses this often by chance in
    # fewer than 1 of 1000 families.
    assert (u["coverage"] >= _binomial_floor(15)).all(), u[["coverage", "frac_called_u"]]
    assert (table.loc[~table["has_optimum"], "frac_called_u"] == 0).all()


def test_u_fit_interval_coverage():
    rng = np.random.default_rng(1)
    reps = 40
    covered = sum(
        (f := fit_u_curve(u_data(rng), n_boot=50, seed=i))["is_u_shaped"]
        and f["ci_low"] <= TRUE_RHO <= f["ci_high"]
        for i in range(reps)
    )
    assert covered / reps >= _binomial_floor(reps), f"95% interval covered the truth in {covered}/{reps}"


def _binomial_floor(n: int, level: float = 0.95, alpha: float = 1e-3) -> float:
    """The coverage below which a true ``level`` interval falls with probability < ``alpha``."""
    from scipy.stats import binom

    return float(binom.ppf(alpha, n, level)) / n


def test_fast_compute_calibration():
    # A small version of results/calibration/compute_*.csv: the slope's 95% interval covers the
    # true slope at the stated level, within the binomial allowance of 20 draws.
    from analysis.calibrate import run_compute, summarise_compute

    table = summarise_compute(run_compute(draws=20, n_boot=100, seed=5))
    assert table["coverage"].iloc[0] >= _binomial_floor(20), table


def test_u_fit_one_run_per_point_uses_residual_bootstrap():
    # The paper's setting: one run per rho, no seeds.
    # With one run per x the noise comes from a fitted curve's few residual dof, so the shape
    # test is weak: it needs a curve that is clear against the noise.
    f = fit_u_curve(u_data(np.random.default_rng(2), seeds=1, noise=0.0003,
                           rhos=np.round(np.arange(0.3, 1.001, 0.1), 2)), n_boot=200)
    assert f["is_u_shaped"], f["reason"]
    assert "residual" in f["bootstrap_method"]
    assert abs(f["rho_star"] - TRUE_RHO) < 0.05


@pytest.mark.parametrize("shape", ["monotone", "flat", "flat_noisy"])
def test_no_fake_optimum(shape):
    rng = np.random.default_rng(3)
    x = np.repeat(RHOS, 3)
    y = {"monotone": 1.8 + 0.05 * (1 - x) + rng.normal(0, 0.001, x.size),
         "flat": np.full(x.size, 1.8),
         "flat_noisy": 1.8 + rng.normal(0, 0.002, x.size)}[shape]
    f = fit_u_curve(pd.DataFrame({"rho": x, "val_loss": y}), n_boot=100)
    assert not f["is_u_shaped"]
    assert f["reason"]
    assert math.isnan(f["rho_star"]) and math.isnan(f["ci_low"]) and math.isnan(f["ci_high"])


def test_edge_optimum_is_flagged():
    f = fit_u_curve(u_data(np.random.default_rng(4), x_star=1.05, noise=0.0005), n_boot=50)
    assert not f["is_u_shaped"]
    assert "edge" in f["reason"]
    assert f["x_min_empirical"] == 1.0


@pytest.mark.parametrize("df", [
    pd.DataFrame({"rho": [0.5, 0.8], "val_loss": [1.8, 1.7]}),
    pd.DataFrame({"rho": [0.5, 0.8, 0.9], "val_loss": [1.8, np.nan, np.nan]}),
    pd.DataFrame({"rho": [], "val_loss": []}),
    pd.DataFrame({"other": [1, 2, 3]}),
])
def test_degenerate_inputs_never_raise(df):
    f = fit_u_curve(df, n_boot=20)
    assert f["is_u_shaped"] is False and f["reason"]


def test_three_points_exact_parabola():
    # Three distinct x, one run each: a U with no residual dof, so no interval to report.
    f = fit_u_curve(pd.DataFrame({"rho": [0.6, 0.8, 1.0], "val_loss": [1.82, 1.80, 1.81]}))
    assert f["is_u_shaped"] and math.isnan(f["ci_low"]) and "dof" in f["reason"]


def power_data(rng, E=1.5, A=30.0, alpha=0.3, noise=0.002, n=9):
    x = np.logspace(4, 8, n)
    return x, (E + A * x ** -alpha) * np.exp(rng.normal(0, noise, n))


def test_power_law_recovers_parameters():
    x, y = power_data(np.random.default_rng(5))
    f = fit_power_law(x, y, n_boot=100)
    assert f["ok"], f["reason"]
    assert abs(f["alpha"] - 0.3) < 0.03
    assert abs(f["E"] - 1.5) < 0.03
    assert 20 < f["A"] < 45
    assert f["alpha_ci"][0] <= f["alpha"] <= f["alpha_ci"][1]


def test_power_law_is_robust_to_one_outlier():
    x, y = power_data(np.random.default_rng(6), noise=0.001, n=12)
    y[5] *= 1.05  # one broken run
    f = fit_power_law(x, y, n_boot=0)
    assert f["ok"] and abs(f["alpha"] - 0.3) < 0.05


@pytest.mark.parametrize("x, y, why", [
    ([1e4, 1e5, 1e6], [2.0, 1.9, 1.8], "needs"),
    ([0, 1e4, 1e5, 1e6, 1e7], [2.1, 2.0, 1.9, 1.8, 1.75], "> 0"),
    ([1e4, 1e5, 1e6, 1e7], [2.0, -1.0, 1.8, 1.7], "> 0"),
    ([1e4, 1e5, 1e6, 1e7], [1.8, 1.8, 1.8, 1.8], "constant"),
    ([1e4, 1e5], [2.0], "differ"),
    ([1e4, 1e4, 1e4, 1e4, 1e4], [2.0, 1.9, 1.8, 1.8, 1.9], "distinct"),
])
def test_power_law_degenerate(x, y, why):
    f = fit_power_law(x, y, n_boot=10)
    assert f["ok"] is False and why in f["reason"]


def test_optimum_vs_compute():
    rng = np.random.default_rng(7)
    frames = []
    for budget, c, x_star in (("s", 1e17, 0.74), ("m", 1e18, 0.78), ("l", 1e19, 0.82)):
        d = u_data(rng, x_star=x_star, noise=0.001)
        frames.append(d.assign(budget=budget, compute=c))
    o = fit_optimum_vs_compute(pd.concat(frames), n_boot=50)
    assert o["ok"], o["reason"]
    assert o["b_se"] > 0 and o["b_ci"][0] < o["b"] < o["b_ci"][1]
    assert o["b_ci"][0] <= 0.04 <= o["b_ci"][1]  # the true slope is inside its interval
    assert abs(o["b"] - 0.04) < 2.5 * o["b_se"]  # and the estimate agrees with its own error
    assert list(o["per_budget"]["budget"]) == ["s", "m", "l"]
    one = fit_optimum_vs_compute(frames[0], n_boot=20)
    assert not one["ok"] and ">= 2 budgets" in one["reason"]
