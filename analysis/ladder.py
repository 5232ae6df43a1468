"""The budget ladder's answers: how the allocation curve and its optimum move with compute.

docs/paper.md section 2 measures the allocation curve at two budgets (2e20 and 6e20 FLOPs) and
calls the optimum "stable". Here, for every budget of a ladder of allocation grids:

* ``rho*`` with its interval from :func:`analysis.fit.fit_u_curve`, or its plain answer "no
  interior optimum";
* the gain of the best measured point over the pure MoE, ``L(1.0) - L(best)``, with a seed-level
  bootstrap interval and in units of the seed standard deviation (pooled over rho), and the same
  gain relative to ``L(1.0)`` (the paper's is 0.8%: 1.7248 -> 1.7109 at 6e20);
* the tail slope, ``dL/drho`` of the means at rho <= 0.6 (least squares, same bootstrap): where a
  U must turn up. Positive while moving more of the sparse budget into Engram still helps; a
  slope that falls toward zero across budgets is a curve flattening before any interior optimum;

and across budgets (compute ``C = 6 P_act D``, the paper's convention, with ``P_act`` the pure
MoE's active parameters and ``D`` the training tokens):

* ``rho*`` against ``log10 C`` with an interval on the slope (:func:`fit_optimum_vs_compute`);
* loss against ``C`` at rho = 1 and at each budget's best rho, and the gain against ``C``, each a
  power law ``y = a C^b`` fitted in log-log space, with intervals from a bootstrap that resamples
  seeds within every (budget, rho) cell, so the whole chain (means, best rho, fit) is redone;
* that gain law extrapolated to the paper's budgets, beside the paper's measured gains, with the
  decades the fit spans and the decades it is carried beyond them. Over seven decades an
  extrapolation from one decade says little: its interval is the honest part.

The laws need ``MIN_LAW_BUDGETS`` budgets with at least two seeds each: a power law through two
points fits them exactly, so nothing would test its form.

No JAX here: everything comes from ``runs.csv`` tables.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import pandas as pd

from analysis.fit import fit_optimum_vs_compute, fit_u_curve
from analysis.report import ci, decimals, est

# The paper's gains of the best rho over rho = 1 (docs/paper.md section 2.4): 1.7248 -> 1.7109 at
# 6e20 [paper, text]; ~1.829 -> ~1.8155 at 2e20 [read off the figure].
PAPER_GAINS = {2e20: 1.829 - 1.8155, 6e20: 1.7248 - 1.7109}
# The paper-regime CPU ladder (engram_jax.allocation.BUDGETS), smallest compute first: vocabulary
# 512 on pysrc, one narrow Engram head per order. The contrast to the paper-shaped ladder below.
LADDER = ("cpu-1e12", "cpu-3e12", "cpu-1e13")
# The paper-shaped ladder: vocabulary 2048 on pywheels-v1, the paper's Engram shape (8 heads per
# order, d_mem = d_model / 2), 100 tokens per active parameter.
LADDER_2K = ("ladder2k-2e12", "ladder2k-5e12", "ladder2k-2e13")
# Every ladder by the name of its figure (results/figures/<name>.png) and README block.
LADDERS = {"ladder": LADDER, "ladder2k": LADDER_2K}
# The low-rho tail of a curve: where a U must turn up. Its slope dL/drho is > 0 while moving more
# of the sparse budget into Engram still lowers the loss and < 0 once it raises it.
TAIL_RHO = 0.6
# Budgets (each with >= 2 seeds) before any law in C is fitted or extrapolated.
MIN_LAW_BUDGETS = 3
NAN = float("nan")


def allocation_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished allocation-grid trials (a rho, no swept key) with ``C`` = 6 P_act(rho=1) D."""
    d = runs[(runs["status"] == "ok") & runs["rho"].notna()].copy()
    if "sweep_key" in d.columns:
        keys = d["sweep_key"].map(lambda v: "" if pd.isna(v) else str(v))
        d = d[keys.isin(["", "rho"])]  # not lr or memory sweeps
    if d.empty:
        return d.assign(C=pd.Series(dtype=float))
    base_active = d[d["rho"] == 1.0].groupby("budget")["params_active"].median()
    fallback = d.groupby("budget")["params_active"].median()
    act = d["budget"].map(base_active).fillna(d["budget"].map(fallback))
    d["C"] = 6.0 * act * d["tokens_seen"]
    return d.reset_index(drop=True)


def _budget_rngs(budgets, seed: int) -> dict[str, np.random.Generator]:
    """One bootstrap generator per budget, seeded by ``seed`` and the budget's name, so that a
    budget's intervals do not move when another budget's rows change."""
    return {b: np.random.default_rng([seed, zlib.crc32(str(b).encode())]) for b in budgets}


def _curve_stats(rho: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    """One budget's curve (mean loss per rho, rho ascending): L(1.0), the best rho, L(best), the
    gain L(1.0) - L(best), the gain relative to L(1.0) and the tail slope (the least-squares slope
    dL/drho of the means at rho <= TAIL_RHO)."""
    one = loss[rho == 1.0]
    l1 = float(one[0]) if len(one) else NAN
    i = int(np.nanargmin(loss))  # the first of equal minima, the lowest rho
    tail = rho <= TAIL_RHO + 1e-9
    slope = float(np.polyfit(rho[tail], loss[tail], 1)[0]) if np.unique(rho[tail]).size >= 2 else NAN
    gain = l1 - float(loss[i])
    return {"L1": l1, "best_rho": float(rho[i]), "L_best": float(loss[i]), "gain": gain,
            "rel_gain": gain / l1, "tail_slope": slope}


def _gains(d: pd.DataFrame) -> pd.DataFrame:
    """:func:`_curve_stats` of every budget's seed-mean curve, a row per budget."""
    means = d.groupby(["budget", "rho"])["val_loss"].mean().reset_index()
    return pd.DataFrame([{"budget": b} | _curve_stats(g["rho"].to_numpy(), g["val_loss"].to_numpy())
                         for b, g in means.groupby("budget")])


def _bootstrap(d: pd.DataFrame, budgets, rngs: dict[str, np.random.Generator], n_boot: int
               ) -> dict[str, np.ndarray]:
    """:func:`_curve_stats` of ``n_boot`` resampled curves: in every replicate each (budget, rho)
    cell's seeds are drawn with replacement from that budget's generator (cells in rho order).
    Returns an array [n_boot, len(budgets)] per statistic, budgets in the given order."""
    out = {k: np.full((n_boot, len(budgets)), NAN) for k in
           ("L1", "best_rho", "L_best", "gain", "rel_gain", "tail_slope")}
    for j, b in enumerate(budgets):
        cells = [(float(r), g["val_loss"].to_numpy()) for r, g in d[d["budget"] == b].groupby("rho")]
        rho = np.array([r for r, _ in cells])
        rng = rngs[b]
        for i in range(n_boot):
            loss = np.array([float(np.mean(v[rng.integers(0, len(v), len(v))])) for _, v in cells])
            for k, x in _curve_stats(rho, loss).items():
                out[k][i, j] = x
    return out


def _loglog(C: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(log10 a, b) of y = a C^b by least squares in log-log space; NaN if any y <= 0."""
    if len(C) < 2 or np.any(~np.isfinite(y)) or np.any(y <= 0):
        return NAN, NAN
    b, loga = np.polyfit(np.log10(C), np.log10(y), 1)
    return float(loga), float(b)


def ladder_report(runs: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                  extrapolate_to: tuple[float, ...] = (2e20, 6e20)) -> dict[str, Any]:
    """Every answer of the ladder from a runs table (several grids pooled).

    Args:
        runs: rows of ``analysis.load.load_runs`` over the ladder's allocation grids.
        n_boot: bootstrap replicates (seeds resampled within each budget and rho).
        seed, level: bootstrap generator seed and interval level.
        extrapolate_to: compute values at which the gain law is evaluated.

    Returns:
        ``per_budget`` (DataFrame: budget, C, n_rho, n_seeds, L1, best_rho, L_best, gain and its
        interval, seed_sd, gain_sd (gain / seed_sd), tail_slope (dL/drho of the means at
        rho <= TAIL_RHO) and its interval (tail_lo, tail_hi), rho_star, ci_low, ci_high, is_u_shaped,
        reason, l_star, dl_star (L(rho*) - L(1.0) or, without an interior optimum, L(best) -
        L(1.0)) and dl_star_sd (that in seed standard deviations)), ``fits`` (per budget, the
        fit_u_curve dicts), ``optimum_vs_compute`` (fit_optimum_vs_compute), ``laws`` ({"L1",
        "L_best", "gain"}: log10 a, b, and their intervals), ``extrapolation`` (DataFrame: C,
        gain and interval, the paper's gain) and ``gain_trend`` (a sentence).
    """
    d = allocation_runs(runs)
    out: dict[str, Any] = {"per_budget": pd.DataFrame(), "fits": {}, "laws": {},
                           "optimum_vs_compute": {}, "extrapolation": pd.DataFrame(),
                           "gain_trend": "no budgets"}
    if d.empty:
        return out
    z_lo, z_hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    budgets = d.groupby("budget")["C"].median().sort_values()
    point = _gains(d).set_index("budget").loc[budgets.index]
    boot = _bootstrap(d, budgets.index, _budget_rngs(budgets.index, seed), n_boot)

    rows = []
    for j, (b, C) in enumerate(budgets.items()):
        g = d[d["budget"] == b]
        f = fit_u_curve(g, n_boot=n_boot, seed=seed, level=level)
        out["fits"][b] = f
        sd = float(np.sqrt(g.groupby("rho")["val_loss"].var(ddof=1).dropna().mean()))
        gains, rels, tails = boot["gain"][:, j], boot["rel_gain"][:, j], boot["tail_slope"][:, j]
        tails = tails[np.isfinite(tails)]
        p = point.loc[b]
        dl = (f["l_star"] - p["L1"]) if f["is_u_shaped"] else (p["L_best"] - p["L1"])
        rows.append({
            "budget": b, "C": float(C), "n_rho": g["rho"].nunique(),
            "n_seeds": int(g.groupby("rho")["seed"].nunique().min()),
            "L1": p["L1"], "best_rho": p["best_rho"], "L_best": p["L_best"], "gain": p["gain"],
            "gain_lo": float(np.percentile(gains, z_lo)) if n_boot else NAN,
            "gain_hi": float(np.percentile(gains, z_hi)) if n_boot else NAN,
            "rel_gain": p["rel_gain"],
            "rel_gain_lo": float(np.percentile(rels, z_lo)) if n_boot else NAN,
            "rel_gain_hi": float(np.percentile(rels, z_hi)) if n_boot else NAN,
            "seed_sd": sd, "gain_sd": p["gain"] / sd if sd > 0 else NAN,
            "tail_slope": p["tail_slope"],
            "tail_lo": float(np.percentile(tails, z_lo)) if len(tails) else NAN,
            "tail_hi": float(np.percentile(tails, z_hi)) if len(tails) else NAN,
            "rho_star": f["rho_star"], "ci_low": f["ci_low"], "ci_high": f["ci_high"],
            "is_u_shaped": f["is_u_shaped"], "reason": f["reason"], "l_star": f["l_star"],
            "dl_star": dl, "dl_star_sd": dl / sd if sd > 0 else NAN,
        })
    per = pd.DataFrame(rows)
    out["per_budget"] = per
    out["optimum_vs_compute"] = fit_optimum_vs_compute(
        d.assign(compute=d["C"]), n_boot=n_boot, seed=seed, level=level)

    # Laws across budgets use only budgets with at least two seeds: one seed has no seed interval,
    # and its point would make the law's interval look narrower than the data allow.
    # And at least MIN_LAW_BUDGETS of them: through two points any power law fits exactly.
    use = (per["n_seeds"] >= 2).to_numpy()
    out["law_budgets"] = list(per.loc[use, "budget"])
    if use.sum() < MIN_LAW_BUDGETS:
        use = np.zeros_like(use)
    Cs = per["C"].to_numpy()[use]
    out["law_decades"] = float(np.log10(Cs.max() / Cs.min())) if len(Cs) else NAN
    for key in ("L1", "L_best", "gain"):
        est = _loglog(Cs, per[key].to_numpy()[use])
        reps = (np.array([_loglog(Cs, bt[use]) for bt in boot[key]]) if n_boot
                else np.empty((0, 2)))
        ok = reps[np.all(np.isfinite(reps), axis=1)] if len(reps) else reps
        law = {"log10_a": est[0], "b": est[1], "n_boot_ok": len(ok), "n_boot": n_boot,
               "b_ci": (float(np.percentile(ok[:, 1], z_lo)), float(np.percentile(ok[:, 1], z_hi)))
               if len(ok) else (NAN, NAN), "boot": ok}
        out["laws"][key] = law

    gain = out["laws"]["gain"]
    ext = []
    for C in extrapolate_to:
        pred = 10 ** (gain["boot"][:, 0] + gain["boot"][:, 1] * math.log10(C)) if len(gain["boot"]) else np.array([])
        ext.append({"C": C, "gain": 10 ** (gain["log10_a"] + gain["b"] * math.log10(C))
                    if math.isfinite(gain["b"]) else NAN,
                    "lo": float(np.percentile(pred, z_lo)) if len(pred) else NAN,
                    "hi": float(np.percentile(pred, z_hi)) if len(pred) else NAN,
                    "paper": PAPER_GAINS.get(C, NAN),
                    "decades": math.log10(C / Cs.max()) if len(Cs) else NAN,
                    "fit_decades": out["law_decades"]})
    out["extrapolation"] = pd.DataFrame(ext)
    out["gain_trend"] = _trend(per, gain, level)
    return out


def _trend(per: pd.DataFrame, gain: dict, level: float) -> str:
    n = int((per["n_seeds"] >= 2).sum())
    if n < 2:
        return "one budget: no trend"
    if n < MIN_LAW_BUDGETS:
        return f"{n} budgets: no law fitted (it needs {MIN_LAW_BUDGETS})"
    if not math.isfinite(gain["b"]):
        return "the gain is not positive at every budget: no power law"
    lo, hi = gain["b_ci"]
    share = gain["n_boot_ok"] / max(gain["n_boot"], 1)
    word = ("grows" if lo > 0 else "shrinks" if hi < 0 else "neither grows nor shrinks significantly")
    d = decimals(lo, hi)
    return (f"Engram's gain {word} with compute: gain ~ C^{gain['b']:.{d}f} "
            f"({level:.0%} interval of the exponent {ci(lo, hi)}; "
            f"{share:.0%} of bootstrap replicates had a positive gain at every budget)")


def _unfit(reason: Any) -> bool:
    """Too few points to fit (a budget whose grid is still running): no answer yet, which is
    not the answer "no interior optimum"."""
    return str(reason).startswith(("needs ", "missing "))


def report_markdown(rep: dict[str, Any]) -> str:
    """The ladder's answers as Markdown tables (the README's results section is built from it)."""
    per = rep["per_budget"]
    if per.empty:
        return "no allocation grids with finished trials"
    lines = ["| budget | C = 6 P_act D | rho values x seeds | L(1.0) | best rho | L(best) "
             "| gain L(1.0) - L(best) [95%] | relative gain [95%] | seed sd "
             f"| tail slope dL/drho at rho <= {TAIL_RHO:g} [95%] "
             "| rho* [95%] | L(rho*) - L(1.0) in seed sd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in per.itertuples():
        why = str(r.reason).removeprefix("no interior optimum: ")
        rho = (est(r.rho_star, r.ci_low, r.ci_high) if r.is_u_shaped
               else f"not fitted yet ({why})" if _unfit(r.reason) else f"no interior optimum ({why})")
        seeds = r.n_seeds >= 2 and math.isfinite(r.seed_sd)
        gain = (est(r.gain, r.gain_lo, r.gain_hi) if seeds
                else f"{r.gain:.4f} (one seed: no interval)")
        rel = (f"{100 * r.rel_gain:.1f}% [{100 * r.rel_gain_lo:.1f}%, {100 * r.rel_gain_hi:.1f}%]"
               if seeds else f"{100 * r.rel_gain:.1f}%")
        tail = ("-" if not math.isfinite(r.tail_slope) else
                est(r.tail_slope, r.tail_lo, r.tail_hi, sign=True) if seeds
                else f"{r.tail_slope:+.4f}")
        lines.append(
            f"| {r.budget} | {r.C:.3g} | {r.n_rho} x {r.n_seeds} | {r.L1:.4f} | {r.best_rho:.1f} "
            f"| {r.L_best:.4f} | {gain} | {rel} | {f'{r.seed_sd:.4f}' if seeds else '-'} | {tail} "
            f"| {rho} | {f'{r.dl_star_sd:+.1f}' if seeds else '-'} |")
    if len(rep.get("law_budgets", [])) < 2:
        return "\n".join(lines + ["", "Across budgets: nothing to fit until a second budget has "
                                       "finished trials of at least two seeds."])
    ovc = rep["optimum_vs_compute"]
    lines += ["", "rho* against compute: " + (
        f"rho* = {ovc['a']:.3f} + {est(ovc['b'], *ovc['b_ci'])} log10 C (the slope's 95% "
        "interval in brackets, per decade)" if ovc.get("ok") and
        math.isfinite(ovc.get("b_se", NAN)) else
        (f"slope {ovc['b']:.3f} per decade (no interval: {ovc['reason']})" if ovc.get("ok")
         else f"not fitted ({ovc.get('reason', '')})"))]
    if not len(rep["extrapolation"]) or not math.isfinite(rep.get("law_decades", NAN)):
        return "\n".join(lines + ["", f"Laws in C: not fitted. {len(rep['law_budgets'])} budgets "
                                       "have finished trials of at least two seeds; a power law "
                                       f"needs {MIN_LAW_BUDGETS}, since through two points any "
                                       "fits exactly."])
    lines += ["", "| law (y = a C^b) | b | 95% interval of b |", "|---|---|---|"]
    names = {"L1": "loss at rho = 1.0", "L_best": "loss at the best rho", "gain": "gain"}
    for k, law in rep["laws"].items():
        d = decimals(*law["b_ci"])
        lines.append(f"| {names[k]} | {law['b']:.{d}f} | {ci(*law['b_ci'])} |")
    lines += ["", rep["gain_trend"] + ".", "",
              "| C | extrapolated gain [95%] | decades the fit spans | decades beyond the ladder "
              "| paper |", "|---|---|---|---|---|"]
    for r in rep["extrapolation"].itertuples():
        lines.append(f"| {r.C:.0e} | {_small(r.gain)} [{_small(r.lo)}, {_small(r.hi)}] "
                     f"| {r.fit_decades:.2f} | {r.decades:.1f} | {r.paper:.4f} |")
    return "\n".join(lines)


def _small(x: float) -> str:
    """A loss difference: four decimals, or two significant digits below 1e-3 (so that a gain
    extrapolated to 1e-6 does not read as zero)."""
    return f"{x:.4f}" if x == 0 or not math.isfinite(x) or abs(x) >= 1e-3 else f"{x:.1e}"


def plot_ladder(runs: pd.DataFrame, rep: dict[str, Any]):
    """Three panels: (a) every budget's allocation curve on one axes (seed means with standard
    errors, fitted curves, rho* with its interval), (b) rho* against C with the fitted line,
    (c) the gain against C with its power law, extrapolated to the paper's budgets beside the
    paper's gains. Returns the (unsaved) figure."""
    import matplotlib.pyplot as plt

    from analysis import style

    d = allocation_runs(runs)
    per = rep["per_budget"]
    with style.context():
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(style.FULL_WIDTH, style.FULL_WIDTH * 0.34))
        colours = plt.get_cmap(style.CMAP)(np.linspace(0.1, 0.85, max(len(per), 1)))
        for colour, r in zip(colours, per.itertuples()):
            g = d[d["budget"] == r.budget].groupby("rho")["val_loss"]
            m, se = g.mean(), g.sem()
            a.errorbar(m.index, m.values, yerr=se.values, fmt="o", ms=2.5, color=colour, capsize=1.5,
                       lw=0.8, label=f"{r.budget} (C = {r.C:.2g})")
            f = rep["fits"][r.budget]
            if f["is_u_shaped"]:
                a.plot(f["curve_x"], f["curve_y"], color=colour, lw=0.9)
                a.errorbar([f["rho_star"]], [f["l_star"]],
                           xerr=[[f["rho_star"] - f["ci_low"]], [f["ci_high"] - f["rho_star"]]],
                           fmt="D", ms=3, color=colour, capsize=1.5, lw=0.8)
        a.set_xlabel(r"allocation ratio $\rho$")
        a.set_ylabel("validation loss")
        a.set_title("(a) allocation curves", fontsize=7)
        a.legend(fontsize=5.5, loc="upper left")

        u = per[per["is_u_shaped"]]
        b.errorbar(u["C"], u["rho_star"], yerr=[u["rho_star"] - u["ci_low"], u["ci_high"] - u["rho_star"]],
                   fmt="D", ms=3, color=style.OPTIMUM, capsize=2, lw=0.8, label=r"$\rho^*$ [95%]")
        unfit = per["reason"].map(_unfit).astype(bool)
        edge = per[~per["is_u_shaped"] & ~unfit]
        if len(edge):  # where the loss is lowest when no valley fits: at the grid's edge, so far
            b.plot(edge["C"], edge["best_rho"], "v", ms=3.5, mfc="none", color="0.35", lw=0,
                   label="no interior optimum:\nlowest mean")
        for r in per[unfit].itertuples():
            b.annotate("not fitted\nyet", (r.C, 0.55), fontsize=5, ha="center", color="0.4")
        ovc = rep["optimum_vs_compute"]
        if ovc.get("ok"):
            xx = np.logspace(np.log10(per["C"].min()) - 0.1, np.log10(per["C"].max()) + 0.1, 50)
            b.plot(xx, ovc["a"] + ovc["b"] * np.log10(xx), color=style.FIT, lw=0.9,
                   label=f"slope {ovc['b']:+.3f}/decade")
        b.axhspan(0.75, 0.8, color="0.85", lw=0, zorder=0, label="paper: 0.75-0.8")
        b.set_xscale("log")
        b.set_xlim(per["C"].min() / 3, per["C"].max() * 3)
        b.xaxis.set_minor_formatter(plt.NullFormatter())
        b.set_ylim(0.25, 1.05)
        b.set_xlabel("compute C = 6 $P_{act}$ D (FLOPs)")
        b.set_ylabel(r"$\rho^*$")
        b.set_title(r"(b) optimum against compute", fontsize=7)
        b.legend(fontsize=5.5)

        seeded = per[(per["n_seeds"] >= 2) & np.isfinite(per["seed_sd"])]
        c.errorbar(seeded["C"], seeded["gain"],
                   yerr=[seeded["gain"] - seeded["gain_lo"], seeded["gain_hi"] - seeded["gain"]],
                   fmt="o", ms=3, color=style.DATA, capsize=2, lw=0.8, label="ladder [95%]")
        one = per.drop(seeded.index)
        if len(one):  # a budget with one seed so far: a point without an interval, drawn open
            c.plot(one["C"], one["gain"], "o", ms=3, mfc="none", color=style.DATA, lw=0,
                   label="ladder, one seed")
        law, ext = rep["laws"]["gain"], rep["extrapolation"]
        if math.isfinite(law["b"]) and len(ext):
            xx = np.logspace(np.log10(per["C"].min()) - 0.2, np.log10(ext["C"].max()) + 0.1, 100)
            c.plot(xx, 10 ** (law["log10_a"] + law["b"] * np.log10(xx)), color=style.FIT, lw=0.9,
                   label=f"gain ~ C^{law['b']:.2f}")
            c.errorbar(ext["C"], ext["gain"], yerr=[ext["gain"] - ext["lo"], ext["hi"] - ext["gain"]],
                       fmt="s", ms=2.5, color=style.FIT, capsize=2, lw=0.6, mfc="white",
                       label="extrapolated [95%]")
        c.plot(list(PAPER_GAINS), list(PAPER_GAINS.values()), "*", color=style.OPTIMUM, ms=6,
               label="paper")
        c.set_xscale("log")
        c.set_yscale("log")
        c.set_xlabel("compute C (FLOPs)")
        c.set_ylabel(r"gain $L(1.0) - L(\rho_{best})$")
        c.set_title("(c) Engram's gain against compute", fontsize=7)
        c.legend(fontsize=5.5)
        fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.ladder GRID_DIR ... [--out results/figures]``: print the answers,
    save ``ladder.pdf/png``."""
    import argparse

    from analysis import load, plots

    ap = argparse.ArgumentParser(prog="python -m analysis.ladder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grids", nargs="+", help="results/<grid> directories of the ladder's budgets")
    ap.add_argument("--out", default=None, help="save the figure here (e.g. results/figures)")
    ap.add_argument("--n-boot", type=int, default=1000)
    a = ap.parse_args(argv)
    try:
        runs = load.load_runs(a.grids)
    except load.ResultsError as e:
        print(f"error: {e}", flush=True)
        return 2
    rep = ladder_report(runs, n_boot=a.n_boot)
    print(report_markdown(rep))
    if a.out:
        for p in plots.save(plot_ladder(runs, rep), a.out, "ladder"):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
