"""Calibration of the allocation fitters on synthetic curves with a known optimum.

``python -m analysis.calibrate [--draws N] [--n-boot B] [--seed S] [--out DIR]`` draws N grids
from every family of :data:`analysis.synthetic.FAMILIES` (3 seeds per rho on 0.3..1.0; the noise
cycles through :data:`NOISES`), fits each with :func:`analysis.fit.fit_u_curve` and tabulates,
per family: how often the curve is called U-shaped, the coverage of the 95% interval (a draw
whose curve is called "not U-shaped" counts as a miss), its mean width, and the bias and RMSE of
rho*. For :func:`analysis.fit.fit_optimum_vs_compute` it draws three budgets whose optima move
linearly in log10 compute and tabulates the coverage of the slope's interval. Writes
``u_curve.csv``, ``u_curve_by_noise.csv``, ``optimum_vs_compute.csv`` and ``README.md`` into DIR.

The method's settings were chosen on draws with ``--seed 1000`` (the tuning set); the committed
table uses the default ``--seed 0``, whose draws were never used for tuning. Single process, so
it can share a small machine: run it under ``nice``.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy: tiny matrices, no thread pool wanted

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from analysis.fit import fit_optimum_vs_compute, fit_u_curve  # noqa: E402
from analysis.synthetic import FAMILIES, RHO_GRID, sample_allocation_runs  # noqa: E402

NOISES = (0.002, 0.0035, 0.005)
LEVEL = 0.95


def run_u(families=tuple(FAMILIES), draws: int = 200, n_boot: int = 500, seed: int = 0,
          noises=NOISES, seed_sd: float = 0.0) -> pd.DataFrame:
    """One row per (family, draw): truth, verdict, rho*, interval, covered."""
    rows = []
    for fi, fam in enumerate(families):
        rng = np.random.default_rng([seed, fi])
        for i in range(draws):
            noise = noises[i % len(noises)]
            df, x0 = sample_allocation_runs(fam, rng, noise=noise, seed_sd=seed_sd)
            f = fit_u_curve(df, n_boot=n_boot, seed=i, level=LEVEL)
            u = bool(f["is_u_shaped"])
            rows.append({
                "family": fam, "draw": i, "noise": noise, "has_optimum": x0 is not None,
                "rho_true": np.nan if x0 is None else x0, "is_u": u, "rho_star": f["rho_star"],
                "ci_low": f["ci_low"], "ci_high": f["ci_high"], "model": f["model"],
                "covered": bool(u and x0 is not None and f["ci_low"] <= x0 <= f["ci_high"]),
            })
    return pd.DataFrame(rows)


def summarise_u(per: pd.DataFrame, by=("family",)) -> pd.DataFrame:
    """Coverage, interval width, bias and RMSE of rho*, and the rate of U verdicts."""
    out = []
    for key, g in per.groupby(list(by), sort=False):
        u = g[g["is_u"]]
        err = u["rho_star"] - u["rho_true"]
        opt = bool(g["has_optimum"].iloc[0])
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update({
            "draws": len(g), "has_optimum": opt, "frac_called_u": g["is_u"].mean(),
            "coverage": g["covered"].mean() if opt else np.nan,
            "coverage_se": np.sqrt(g["covered"].mean() * (1 - g["covered"].mean()) / len(g))
            if opt else np.nan,
            "mean_width": (u["ci_high"] - u["ci_low"]).mean() if opt else np.nan,
            "bias": err.mean() if opt else np.nan,
            "rmse": np.sqrt((err**2).mean()) if opt else np.nan,
        })
        out.append(row)
    return pd.DataFrame(out)


def run_compute(draws: int = 200, n_boot: int = 300, seed: int = 0, n_budgets: int = 3,
                noises=NOISES) -> pd.DataFrame:
    """Budgets 10^17.. whose optimum moves by b per 10x compute; coverage of b's interval."""
    rng = np.random.default_rng([seed, 99])
    z = stats.norm.ppf(0.5 + LEVEL / 2)
    rows = []
    for i in range(draws):
        noise = noises[i % len(noises)]
        b_true = rng.uniform(-0.06, 0.06)
        lcs = 17.0 + np.arange(n_budgets)
        frames = []
        for j, lc in enumerate(lcs):
            x0 = 0.65 + b_true * (lc - lcs.mean())
            # The asym-steep-right shape of analysis.synthetic (u^2 e^{s u}) at a chosen rho*.
            s = rng.uniform(2.0, 4.4)
            d = x0 - RHO_GRID[0]
            amp = rng.uniform(0.015, 0.05) / (d * d * np.exp(-s * d))
            df, _ = sample_allocation_runs("flat", rng, noise=noise)
            u = df["rho"].to_numpy() - x0
            df["val_loss"] += amp * u * u * np.exp(s * u) - 0.05 * j
            frames.append(df.assign(budget=f"b{j}", compute=10.0**lc))
        o = fit_optimum_vs_compute(pd.concat(frames, ignore_index=True), n_boot=n_boot, seed=i)
        lo, hi = o["b"] - z * o["b_se"], o["b"] + z * o["b_se"]
        rows.append({"draw": i, "noise": noise, "b_true": b_true, "ok": o["ok"], "b": o["b"],
                     "b_se": o["b_se"], "n_used": int(o["per_budget"]["is_u_shaped"].sum()),
                     "covered": bool(o["ok"] and lo <= b_true <= hi)})
    return pd.DataFrame(rows)


def summarise_compute(per: pd.DataFrame) -> pd.DataFrame:
    ok = per[per["ok"] & np.isfinite(per["b_se"])]
    err = ok["b"] - ok["b_true"]
    return pd.DataFrame([{
        "draws": len(per), "frac_fitted": len(ok) / len(per), "coverage": per["covered"].mean(),
        "coverage_se": np.sqrt(per["covered"].mean() * (1 - per["covered"].mean()) / len(per)),
        "mean_width": (2 * stats.norm.ppf(0.5 + LEVEL / 2) * ok["b_se"]).mean(),
        "bias": err.mean(), "rmse": np.sqrt((err**2).mean()),
    }])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.calibrate", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--draws", type=int, default=400, help="draws per family")
    ap.add_argument("--compute-draws", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="0: the reported set; 1000: tuning set")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--out", default=None, help="write the tables here (default: print only)")
    args = ap.parse_args(argv)
    t0 = time.time()
    per = run_u(args.families, args.draws, args.n_boot, args.seed)
    t_u = time.time() - t0
    table = summarise_u(per)
    by_noise = summarise_u(per, by=("family", "noise"))
    comp = summarise_compute(run_compute(args.compute_draws, min(args.n_boot, 300), args.seed)) \
        if args.compute_draws > 0 else pd.DataFrame()
    wall = time.time() - t0
    with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False))
        print(by_noise.to_string(index=False))
        if len(comp):
            print(comp.to_string(index=False))
    print(f"wall {wall:.0f} s (fit_u_curve part {t_u:.0f} s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "u_curve.csv", index=False, float_format="%.4f")
        by_noise.to_csv(out / "u_curve_by_noise.csv", index=False, float_format="%.4f")
        if len(comp):
            comp.to_csv(out / "optimum_vs_compute.csv", index=False, float_format="%.4f")
        _readme(out, args, wall, table, comp)
    return 0


def _readme(out: Path, args, wall: float, table: pd.DataFrame, comp: pd.DataFrame) -> None:
    cmd = "python -m analysis.calibrate " + " ".join(sys.argv[1:])
    text = f"""# Calibration of the allocation fitters

- command: `{cmd}`
- git commit: {_commit()} (the fitter's code at that commit; the tables were written by it)
- draws: {args.draws} per family for `fit_u_curve`, {args.compute_draws} for
  `fit_optimum_vs_compute`; {args.n_boot} bootstrap replicates per fit
  ({min(args.n_boot, 300)} per budget for `fit_optimum_vs_compute`)
- design: rho = 0.3, 0.4, ..., 1.0, three seeds per rho, independent Gaussian noise with sd
  cycling through {", ".join(f"{n:g}" for n in NOISES)} (a third of the draws each)
- seed {args.seed} (the method was tuned on `--seed 1000`, never on these draws)
- machine: a 2-core CPU shared with other jobs (training runs), single process under `nice`;
  {wall / 60:.1f} min wall

## Families (`analysis/synthetic.py`, `FAMILIES`)
- symmetric: A (cosh(c u) - 1), u = rho - rho*, c in [1, 10] (a parabola for small c, flat
  bottom and steep walls for large c), rise 0.012-0.04 at the nearer edge; rho* in [0.5, 0.8]
- asym-steep-right / asym-steep-left: A u^2 e^{{s u}}, |s| in [2, 4.4] (one side 2-6x steeper at
  |u| = 0.2), rise 0.015-0.05 at the flat side's edge; rho* in [0.55, 0.85] / [0.45, 0.75]
- edge-right / edge-left: rho* 0.02-0.08 inside the last / first grid point, power rises
  (exponents 1.5-3) of 0.02-0.15 at the near edge and 0.02-0.08 at the far edge
- flat; monotone (linear, convex or concave, either direction, 0.01-0.2 nats over the grid);
  plateau (steep on one side, exactly flat over the last 2-5 points: the hardest null)

## Columns
`frac_called_u`: share of draws called U-shaped; `coverage`: share of draws called U-shaped
whose 95% interval holds the true rho* (a "not U-shaped" answer is a miss), with its Monte-Carlo
standard error; `mean_width`, `bias`, `rmse`: of the interval and of rho* over the draws called
U-shaped. `u_curve_by_noise.csv` splits the same draws by noise level.

## fit_u_curve
{_md(table)}

## fit_optimum_vs_compute (three budgets, rho* = 0.65 + b (log10 C - 18), b in [-0.06, 0.06])
Each budget's curve has the asym-steep-right shape. `coverage`: share of draws whose interval
b +- 1.96 b_se holds the true slope (a draw with fewer than three U-shaped budgets, which has
no slope error, is a miss); `frac_fitted`: share of draws with a slope and its error.
{_md(comp) if len(comp) else "(not run)"}
"""
    (out / "README.md").write_text(text)


def _md(t: pd.DataFrame) -> str:
    cols = list(t.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in t.iterrows():
        lines.append("| " + " | ".join(
            f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
