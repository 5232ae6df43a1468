"""The paper's comparisons beyond the allocation curve, at one CPU budget of the ladder.

docs/paper.md sections 3 and 4, each from committed grids named by convention
(``results/<kind>-<budget>[-<change>]``):

* **Engram against OverEncoding** (``memory-engram-<b>``, ``memory-overencoding-<b>``): loss
  against table parameters for both on the same backbone, each fitted as ``L = E + A x^-alpha``
  (:func:`analysis.fit.fit_power_law`, bootstrap intervals), the difference at each size with a
  Welch interval over seeds, and the pure MoE without memory (``<b>``'s rho = 1 trials) as the
  baseline both should beat. One figure.
* **Ablations** (``ablation-<b>-<change>``): each change against the reference Engram (the
  ``engram.gate = true`` arm of ``ablation-<b>-gate``), in the paper's form: the change of the mean
  validation loss in nats and in pooled seed standard deviations, with a Welch 95% interval,
  beside the paper's ordering. The per-branch gate is ablated on its own 4-branch reference
  (``ablation-<b>-hc4-gate``).
* **Optimizer** (``muon-<b>`` beside ``<b>``): the allocation curve's answers
  (:func:`analysis.ladder.ladder_report`) with Muon and with AdamW: does rho* move?

Every function takes the results root and returns None (or an empty table) when the grids it
needs are missing, so the README says "not run yet" rather than failing. No JAX here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from analysis import load
from analysis.powerlaw import fit_power_law, power_law
from analysis.report import est

NAN = float("nan")
MEMORY_COLUMNS = ("params_engram_tables", "params_overencoding_tables")


def _grid(results: Path, name: str) -> pd.DataFrame | None:
    p = Path(results) / name / "runs.csv"
    if not p.exists():
        return None
    d = load.load_runs(p)
    return d if len(d) else None


def _flag(v: Any) -> bool:
    """A swept boolean as runs.csv stores it ("True"/"False", or a parsed bool)."""
    return str(v).strip().lower() in ("true", "1", "yes")


def welch(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Mean of ``a`` minus mean of ``b`` with a Welch t interval and the pooled seed sd.

    Returns:
        ``diff``, ``lo``, ``hi`` (NaN with fewer than two values on either side), ``sd`` (pooled
        standard deviation), ``diff_sd`` (diff / sd).
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else NAN
    out = {"diff": diff, "lo": NAN, "hi": NAN, "sd": NAN, "diff_sd": NAN}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = a.var(ddof=1), b.var(ddof=1)
    sd = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    se2 = va / len(a) + vb / len(b)
    out["sd"] = sd
    out["diff_sd"] = diff / sd if sd > 0 else NAN
    if se2 > 0:
        dof = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
        h = float(stats.t.ppf((1 + level) / 2, dof)) * math.sqrt(se2)
        out["lo"], out["hi"] = diff - h, diff + h
    else:
        out["lo"] = out["hi"] = diff
    return out


# ---------------------------------------------------------------- Engram against OverEncoding

def memory_params(runs: pd.DataFrame) -> pd.Series:
    """Table parameters of each run: Engram tables plus OverEncoding tables (0 where absent)."""
    total = pd.Series(0.0, index=runs.index)
    for col in MEMORY_COLUMNS:
        if col in runs.columns:
            total = total + runs[col].fillna(0).astype(float)
    return total


def memory_comparison(results: str | Path, budget: str = "cpu-1e12", *, n_boot: int = 500,
                      level: float = 0.95) -> dict[str, Any] | None:
    """Engram and OverEncoding at equal table parameters on the budget's pure-MoE backbone.

    Returns:
        None when either arm's grid is missing; else ``arms`` ({"Engram", "OverEncoding"}: the
        runs with an ``x`` column (table parameters) and ``fit``, the power-law dict),
        ``table`` (one row per size: x of each arm, mean, sd and seeds of each, the difference
        Engram - OverEncoding with a Welch interval) and ``baseline`` (the budget's rho = 1
        losses, the same backbone without memory; None when that grid is missing).
    """
    arms = {"Engram": _grid(results, f"memory-engram-{budget}"),
            "OverEncoding": _grid(results, f"memory-overencoding-{budget}")}
    if any(v is None for v in arms.values()):
        return None
    out: dict[str, Any] = {"budget": budget, "arms": {}}
    for name, d in arms.items():
        d = d.assign(x=memory_params(d))
        d = d[d["x"] > 0]
        out["arms"][name] = {"runs": d, "fit": fit_power_law(d["x"], d["val_loss"],
                                                             n_boot=n_boot, level=level)}
    # Sizes pair by rank: the arms are built to match in table parameters (<1%), not exactly.
    e = out["arms"]["Engram"]["runs"]
    o = out["arms"]["OverEncoding"]["runs"]
    xe, xo = sorted(e["x"].unique()), sorted(o["x"].unique())
    rows = []
    for i in range(max(len(xe), len(xo))):
        ve = e.loc[e["x"] == xe[i], "val_loss"].to_numpy() if i < len(xe) else np.array([])
        vo = o.loc[o["x"] == xo[i], "val_loss"].to_numpy() if i < len(xo) else np.array([])
        w = welch(ve, vo, level)
        rows.append({"x_engram": xe[i] if i < len(xe) else NAN,
                     "x_overencoding": xo[i] if i < len(xo) else NAN,
                     "engram_mean": ve.mean() if len(ve) else NAN,
                     "engram_sd": ve.std(ddof=1) if len(ve) > 1 else NAN, "engram_n": len(ve),
                     "oe_mean": vo.mean() if len(vo) else NAN,
                     "oe_sd": vo.std(ddof=1) if len(vo) > 1 else NAN, "oe_n": len(vo),
                     "diff": w["diff"], "diff_lo": w["lo"], "diff_hi": w["hi"]})
    out["table"] = pd.DataFrame(rows)
    base = _grid(results, budget)
    if base is not None:
        base = base[(base["rho"] == 1.0) & base["seed"].isin(pd.concat([e, o])["seed"].unique())]
    out["baseline"] = base if base is not None and len(base) else None
    return out


def _pm(mean: float, sd: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "-"
    return f"{mean:.4f} ± {sd:.4f} ({n})" if n > 1 else f"{mean:.4f} (1)"


def _interval(v: float, lo: float, hi: float) -> str:
    return est(v, lo, hi, sign=True)


def memory_markdown(cmp: dict[str, Any] | None, level: float = 0.95) -> str:
    """The comparison as a Markdown table and the two power laws."""
    if cmp is None:
        return "Not run yet."
    lines = ["| table params (Engram / OverEncoding) | Engram val loss (seeds) "
             "| OverEncoding val loss (seeds) | Engram - OverEncoding [95%] |",
             "|---|---|---|---|"]
    for r in cmp["table"].itertuples():
        xs = " / ".join("-" if not math.isfinite(x) else f"{x / 1e3:,.0f}k"
                        for x in (r.x_engram, r.x_overencoding))
        lines.append(f"| {xs} | {_pm(r.engram_mean, r.engram_sd, r.engram_n)} "
                     f"| {_pm(r.oe_mean, r.oe_sd, r.oe_n)} "
                     f"| {_interval(r.diff, r.diff_lo, r.diff_hi)} |")
    lines.append("")
    if cmp["baseline"] is not None:
        b = cmp["baseline"]["val_loss"]
        lines.append(f"The same backbone without memory ({cmp['budget']}, rho = 1.0, seeds "
                     f"{', '.join(str(s) for s in sorted(cmp['baseline']['seed']))}): "
                     f"{_pm(b.mean(), b.std(ddof=1) if len(b) > 1 else NAN, len(b))}.")
        lines.append("")
    lines += ["| arm | L = E + A x^-alpha: alpha [95%] | E [95%] | points |", "|---|---|---|---|"]
    for name, arm in cmp["arms"].items():
        f = arm["fit"]
        if f["ok"]:
            lines.append(f"| {name} | {est(f['alpha'], *f['alpha_ci'])} "
                         f"| {est(f['E'], *f['E_ci'])} | {f['n_points']} |")
        else:
            lines.append(f"| {name} | no fit: {f['reason']} | - | {f['n_points']} |")
    return "\n".join(lines)


def plot_memory_comparison(cmp: dict[str, Any]):
    """Loss against table parameters, both arms on log-log axes with their power laws and
    bootstrap bands, the memory-free backbone as a dashed line."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from analysis import style

    colours = {"Engram": style.FIT, "OverEncoding": style.DATA}
    with style.context():
        fig, ax = plt.subplots(figsize=(style.COLUMN_WIDTH, style.COLUMN_WIDTH * style.ASPECT + 0.25))
        for name, arm in cmp["arms"].items():
            d, f, c = arm["runs"], arm["fit"], colours[name]
            ax.plot(d["x"], d["val_loss"], "o", ms=2, color=c, alpha=0.35, mec="none")
            agg = d.groupby("x")["val_loss"].agg(["mean", "std"]).reset_index()
            ax.errorbar(agg["x"], agg["mean"], yerr=agg["std"].fillna(0), fmt="o", ms=3, lw=0.8,
                        color=c)
            xx = np.logspace(np.log10(d["x"].min()), np.log10(d["x"].max()), 200)
            if f["ok"]:
                bs = f["boot_samples"]
                if len(bs) >= 10:
                    pred = power_law(xx[None, :], bs[:, 0, None], bs[:, 1, None], bs[:, 2, None])
                    ax.fill_between(xx, *np.quantile(pred, [0.025, 0.975], axis=0), color=c,
                                    alpha=0.15, lw=0)
                lo, hi = f["alpha_ci"]
                ax.plot(xx, power_law(xx, f["E"], f["A"], f["alpha"]), color=c, lw=1,
                        label=f"{name}: $\\alpha$ = {f['alpha']:.2f} [{lo:.2f}, {hi:.2f}]")
            else:
                ax.plot([], [], "o", color=c, label=f"{name}: no fit ({f['reason']})")
        if cmp["baseline"] is not None:
            ax.axhline(cmp["baseline"]["val_loss"].mean(), ls="--", lw=0.7, color="0.4",
                       label=f"no memory ({cmp['budget']}, rho = 1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.MaxNLocator(5))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3f"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("n-gram table parameters")
        ax.set_ylabel("validation loss")
        seeds = pd.concat([a["runs"] for a in cmp["arms"].values()])["seed"].nunique()
        ax.set_title(f"Engram vs OverEncoding | {cmp['budget']} | {seeds} seeds", fontsize=7)
        ax.legend(fontsize=5.5, loc="lower left")  # the curves fall to the right
        fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------- ablations

@dataclass(frozen=True)
class Ablation:
    """One change against a reference Engram: the grid (``{b}`` is the budget), the swept key and
    value that select the changed arm (None: every row of the grid), and the paper's finding."""

    change: str
    grid: str
    select: tuple[str, bool] | None
    paper: str
    reference: str = "reference"


# The paper (docs/paper.md section 4): removing, in order of harm, per-branch gating on the
# multi-branch backbone (largest), token compression, the context-aware gate (each large), the
# short convolution (marginal); 4-grams at a fixed table budget slightly worse; the first layer
# worse than the second (the gate's query has seen no attention); two layers slightly better than
# the best single one (1.768 against 1.770).
ABLATIONS = (
    Ablation("per-branch gates -> one shared gate (hc_mult = 4)", "ablation-{b}-hc4-gate",
             ("engram.gate_per_branch", False), "worse: the largest regression (1st)",
             reference="hc4"),
    Ablation("no token compression", "ablation-{b}-compress", None, "worse: large (2nd)"),
    Ablation("no context-aware gate", "ablation-{b}-gate", ("engram.gate", False),
             "worse: large (3rd)"),
    Ablation("no short convolution", "ablation-{b}-conv", None, "worse: marginal (4th)"),
    Ablation("Engram at layer 0 only (before any attention)", "ablation-{b}-layer0", None,
             "worse (layer 1 of 12 against layer 2)"),
    Ablation("Engram at layers 0 and 1 (tables split)", "ablation-{b}-layers01", None,
             "slightly better (1.768 against 1.770)"),
    Ablation("4-grams added at the same table budget", "ablation-{b}-4gram", None,
             "slightly worse"),
)
REFERENCES = {"reference": ("ablation-{b}-gate", ("engram.gate", True)),
              "hc4": ("ablation-{b}-hc4-gate", ("engram.gate_per_branch", True))}


def _select(d: pd.DataFrame, sel: tuple[str, bool] | None) -> pd.DataFrame:
    if sel is None:
        return d
    key, value = sel
    m = (d["sweep_key"].astype(str) == key) & (d["sweep_value"].map(_flag) == value)
    return d[m]


def ablation_table(results: str | Path, budget: str = "cpu-1e12", *, level: float = 0.95
                   ) -> pd.DataFrame:
    """One row per ablation whose grid and reference have finished trials.

    Columns: change, n (seeds of the change), reference (its name), loss and reference mean
    (with sds), diff (change - reference, nats) and its Welch interval, diff_sd (in pooled seed
    sds), verdict (worse / better / within noise, by the interval), paper.
    """
    refs = {}
    for name, (grid, sel) in REFERENCES.items():
        d = _grid(results, grid.format(b=budget))
        refs[name] = None if d is None else _select(d, sel)["val_loss"].to_numpy()
    rows = []
    for a in ABLATIONS:
        d = _grid(results, a.grid.format(b=budget))
        ref = refs[a.reference]
        if d is None or ref is None or not len(ref):
            continue
        v = _select(d, a.select)["val_loss"].to_numpy()
        if not len(v):
            continue
        w = welch(v, ref, level)
        verdict = ("within noise" if not math.isfinite(w["lo"]) or w["lo"] <= 0 <= w["hi"]
                   else "worse" if w["lo"] > 0 else "better")
        rows.append({"change": a.change, "reference": a.reference, "n": len(v),
                     "loss": v.mean(), "loss_sd": v.std(ddof=1) if len(v) > 1 else NAN,
                     "ref_loss": ref.mean(), "ref_sd": ref.std(ddof=1) if len(ref) > 1 else NAN,
                     "ref_n": len(ref), "diff": w["diff"], "diff_lo": w["lo"], "diff_hi": w["hi"],
                     "diff_sd": w["diff_sd"], "verdict": verdict, "paper": a.paper})
    return pd.DataFrame(rows)


def ablation_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "Not run yet."
    lines = ["| change against the reference Engram | val loss (seeds) | reference (seeds) "
             "| change [95%] | in seed sd | ours | paper |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        sd = f"{r.diff_sd:+.1f}" if math.isfinite(r.diff_sd) else "-"
        lines.append(f"| {r.change} | {_pm(r.loss, r.loss_sd, r.n)} "
                     f"| {_pm(r.ref_loss, r.ref_sd, r.ref_n)} "
                     f"| {_interval(r.diff, r.diff_lo, r.diff_hi)} | {sd} | {r.verdict} "
                     f"| {r.paper} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- optimizer

def optimizer_comparison(results: str | Path, budget: str = "cpu-1e12", *, n_boot: int = 1000,
                         level: float = 0.95) -> pd.DataFrame:
    """The allocation answers of ``<b>`` (AdamW) and ``muon-<b>`` side by side (one row each,
    the columns of ``ladder_report``'s per-budget table plus ``optimizer`` and ``trials``);
    empty when the Muon grid has no finished trial."""
    from analysis.ladder import ladder_report

    rows = []
    for opt, grid in (("AdamW", budget), ("Muon", f"muon-{budget}")):
        d = _grid(results, grid)
        if d is None:
            if opt == "Muon":
                return pd.DataFrame()
            continue
        per = ladder_report(d, n_boot=n_boot, level=level)["per_budget"]
        if per.empty:
            continue
        rows.append(per.iloc[0].to_dict() | {"optimizer": opt, "grid": grid, "trials": len(d)})
    return pd.DataFrame(rows)


def optimizer_markdown(table: pd.DataFrame) -> str:
    if table.empty or "Muon" not in set(table["optimizer"]):
        return "Not run yet."
    lines = ["| optimizer | grid | trials | L(1.0) | best rho | L(best) | gain [95%] "
             "| rho* [95%] |", "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        rho = est(r.rho_star, r.ci_low, r.ci_high) if r.is_u_shaped else "no interior optimum"
        gain = (est(r.gain, r.gain_lo, r.gain_hi) if r.n_seeds >= 2
                else f"{r.gain:.4f} (one seed)")
        lines.append(f"| {r.optimizer} | {r.grid} | {r.trials} | {r.L1:.4f} | {r.best_rho:.1f} "
                     f"| {r.L_best:.4f} | {gain} | {rho} |")
    return "\n".join(lines)


def make_figures(results: str | Path, out: str | Path, *, n_boot: int = 500) -> list[Path]:
    """The Engram-vs-OverEncoding figure of every budget that has both arms."""
    from analysis.plots import save

    written: list[Path] = []
    for gdir in load.find_grids(results):
        if not gdir.name.startswith("memory-engram-"):
            continue
        budget = gdir.name.removeprefix("memory-engram-")
        cmp = memory_comparison(results, budget, n_boot=n_boot)
        if cmp is not None:
            written += save(plot_memory_comparison(cmp), out, f"memory-engram-vs-overencoding-{budget}")
    return written
