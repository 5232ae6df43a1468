"""Diagnostics of the allocation mechanism: is a regime's memory/computation trade-off the paper's?

The paper's allocation curve (docs/paper.md section 2) is shallow: its best rho gains 0.8% of the
loss over the pure MoE, and its memory, at a fixed backbone, buys about 0.028 nats per decade of
Engram slots (section 3). A small regime can only test the paper's allocation law if its memory
behaves like that. Three diagnostics, each a grid with three seeds, measure it
(``sweeps/grids/diag-*``):

a. What makes the left arm appear: L(0.3) - L(0.8) in a reference arm (``diag-a-<budget>-base``)
   and in arms that change one thing (``diag-a-<budget>-<arm>``: batch size at equal tokens, peak
   learning rate, corpus). Positive: the low-rho end is worse, a left arm exists.
b. The cost of the left arm alone (``diag-b-<budget>-experts``): the pure MoE with routed experts
   removed and nothing in their place, L(E) - L(E_0) per expert count. This is what the memory
   must buy back at the rho that keeps E experts.
c. The value of memory (``diag-c-<budget>-memory``): the pure MoE plus one Engram layer whose
   tables grow; nats per decade of slots, -dL / dlog10(slots), from a least-squares line through
   every run, beside the paper's 0.028.

:func:`mechanism_table` sets the two ratios that place a regime against the paper side by side:
memory's value per decade and the relative gain of the best rho, (L(1.0) - L(best)) / L(1.0).

``python -m analysis.diagnose [--results results]`` prints every table.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis import load
from analysis.paper import _grid, welch
from analysis.report import est

NAN = float("nan")
# docs/paper.md section 3 (memory scaling: ~1.788 -> ~1.743 over 2.58e5 -> 1e7 slots) and
# section 2 (allocation at 6e20: 1.7248 at rho = 1 -> 1.7109 at rho ~ 0.8).
PAPER_NATS_PER_DECADE = 0.028
PAPER_RELATIVE_GAIN = (1.7248 - 1.7109) / 1.7248
LOW_RHO, HIGH_RHO = 0.3, 0.8


# ------------------------------------------------------------------------ (a) the left arm
ARM_LABELS = {
    "base": "reference (the budget's allocation-grid training)",
    "batch8": "4x the optimizer steps at equal tokens (batch 8 instead of 32)",
    "lr3e-3": "peak learning rate 3e-3 instead of 1.6e-2",
    "pystdlib": "corpus pystdlib instead of the reference's",
    "dropless": "dropless dispatch: no routed assignment dropped (capacity 1.25 in the reference)",
}


def left_arm(results: str | Path, budget: str = "cpu-3e12", level: float = 0.95) -> pd.DataFrame:
    """Diagnostic (a): one row per arm grid ``diag-a-<budget>-*``, reference first.

    Columns: ``arm``, ``label``, ``grid``, ``corpus``, ``L_high`` / ``L_low`` (seed means at
    rho = 0.8 / 0.3) with their seed counts, ``diff`` = L(0.3) - L(0.8) with its Welch interval
    (``lo``, ``hi``), and ``diff_vs_base``: the arm's difference minus the reference's.
    """
    rows = []
    prefix = f"diag-a-{budget}-"
    names = sorted((g.name for g in load.find_grids(results) if g.name.startswith(prefix)),
                   key=lambda n: (n != prefix + "base", n))
    for name in names:
        d = _grid(results, name)
        if d is None:
            continue
        hi_, lo_ = d.loc[np.isclose(d["rho"], HIGH_RHO), "val_loss"], d.loc[np.isclose(d["rho"], LOW_RHO), "val_loss"]
        w = welch(lo_.to_numpy(), hi_.to_numpy(), level)
        arm = name.removeprefix(prefix)
        rows.append({"arm": arm, "label": ARM_LABELS.get(arm, arm), "grid": name,
                     "corpus": str(d["corpus"].iloc[0]) if "corpus" in d else "",
                     "L_high": hi_.mean() if len(hi_) else NAN, "n_high": len(hi_),
                     "L_low": lo_.mean() if len(lo_) else NAN, "n_low": len(lo_),
                     "diff": w["diff"], "lo": w["lo"], "hi": w["hi"]})
    out = pd.DataFrame(rows)
    if len(out):
        base = out.loc[out["arm"] == "base", "diff"]
        out["diff_vs_base"] = out["diff"] - (base.iloc[0] if len(base) else NAN)
    return out


# ------------------------------------------------------------------- (b) the cost of experts
def expert_cost(results: str | Path, budget: str = "cpu-3e12", level: float = 0.95,
                dispatch: str = "") -> pd.DataFrame:
    """Diagnostic (b): one row per routed-expert count of ``diag-b-<budget>-experts``, most
    experts first: the seed mean and L(E) - L(E_0) with its Welch interval; where diagnostic (a)'s
    reference arm has the allocation that keeps E experts (rho = 0.8 or 0.3), what its tables buy
    back: L(E, no memory) - L(rho) with its interval (``buys``).

    ``dispatch="dropless"`` reads the dropless reruns instead: ``diag-b-<budget>-experts-dropless``
    against diagnostic (a)'s dropless arm ``diag-a-<budget>-dropless``, so that neither side of
    what the tables buy back drops routed work.
    """
    d = _grid(results, f"diag-b-{budget}-experts" + (f"-{dispatch}" if dispatch else ""))
    if d is None:
        return pd.DataFrame()
    e0 = int(d["n_routed"].max())
    ref = d.loc[d["n_routed"] == e0, "val_loss"].to_numpy()
    alloc = _grid(results, f"diag-a-{budget}-{dispatch or 'base'}")
    rows = []
    for n, g in sorted(d.groupby("n_routed"), key=lambda t: -t[0]):
        v = g["val_loss"].to_numpy()
        w = welch(v, ref, level)
        row = {"n_routed": int(n), "L": v.mean(), "sd": v.std(ddof=1) if len(v) > 1 else NAN,
               "seeds": len(v), "cost": w["diff"], "cost_lo": w["lo"], "cost_hi": w["hi"],
               "rho": NAN, "L_rho": NAN, "buys": NAN, "buys_lo": NAN, "buys_hi": NAN}
        if alloc is not None:
            a = alloc[alloc["n_routed"] == n]
            if len(a):
                b = welch(v, a["val_loss"].to_numpy(), level)
                row.update(rho=float(a["rho"].iloc[0]), L_rho=a["val_loss"].mean(),
                           buys=b["diff"], buys_lo=b["lo"], buys_hi=b["hi"])
        rows.append(row)
    return pd.DataFrame(rows)


# -------------------------------------------------------------------- (c) the value of memory
def nats_per_decade(slots, loss, level: float = 0.95) -> dict[str, float]:
    """-dL/dlog10(slots) from an ordinary least-squares line through every run.

    Args:
        slots: Engram slots (table rows) per run, > 0.
        loss: validation loss per run.
        level: confidence level of the t interval of the slope.

    Returns:
        ``value`` (nats gained per decade of slots), ``lo``, ``hi``, ``n`` (runs), ``decades``
        (log10 of the largest over the smallest size), ``sizes`` (distinct sizes).
    """
    x = np.log10(np.asarray(slots, float))
    y = np.asarray(loss, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {"value": NAN, "lo": NAN, "hi": NAN, "n": int(x.size), "sizes": int(np.unique(x).size),
           "decades": float(np.ptp(x)) if x.size else NAN}
    if np.unique(x).size < 2:
        return out
    r = stats.linregress(x, y)
    out["value"] = -float(r.slope)
    if x.size > 2:
        h = float(stats.t.ppf((1 + level) / 2, x.size - 2)) * float(r.stderr)
        out["lo"], out["hi"] = -float(r.slope) - h, -float(r.slope) + h
    return out


def memory_value(results: str | Path, grid: str, level: float = 0.95) -> dict[str, float] | None:
    """:func:`nats_per_decade` of a memory grid's runs (those with Engram slots), or None."""
    d = _grid(results, grid)
    if d is None or "engram_slots" not in d:
        return None
    d = d[d["engram_slots"] > 0]
    return nats_per_decade(d["engram_slots"], d["val_loss"], level) | {"grid": grid}


# ----------------------------------------------------------------------- mechanism ratios
@dataclass(frozen=True)
class Regime:
    """A regime as the mechanism table reads it: its memory grid and its allocation runs.

    ``allocation`` grids are pooled; ``pure_moe`` names a grid whose largest-expert runs are the
    rho = 1.0 point when the allocation grids lack it (diagnostic (b) holds it).
    """

    name: str
    memory: str | None
    allocation: tuple[str, ...]
    pure_moe: str | None = None
    note: str = ""


REGIMES = (
    Regime("cpu-1e12 ladder (pysrc, vocab 512)", "memory-engram-cpu-1e12", ("cpu-1e12",)),
    Regime("cpu-3e12 ladder (pysrc, vocab 512)", None, ("cpu-3e12",)),
    Regime("cpu-1e13 ladder (pysrc, vocab 512)", None, ("cpu-1e13",)),
    Regime("cpu-3e12 shape on pywheels-v1 (diagnostics)", "diag-c-cpu-3e12-memory",
           ("diag-a-cpu-3e12-base",), pure_moe="diag-b-cpu-3e12-experts",
           note="rho 1.0 / 0.8 / 0.3 only"),
    Regime("cpu-3e12 shape on pywheels-v1, dropless (diagnostics)", None,
           ("diag-a-cpu-3e12-dropless",), pure_moe="diag-b-cpu-3e12-experts-dropless",
           note="rho 1.0 / 0.8 / 0.3 only; no capacity drops"),
    Regime("candidate: the cpu-3e12 shape with 8 heads per order (pywheels-v1)",
           "cand-cpu-3e12-pe-memory", ("cand-cpu-3e12-pe",), pure_moe="diag-b-cpu-3e12-experts"),
    Regime("candidate: cpu2k-5e12 (pywheels-v1)", "cand-cpu2k-5e12-memory", ("cpu2k-5e12",)),
    # The paper-shaped ladder: the candidate's regime with 32 routed experts; memory's value is
    # measured at its middle rung (diag-c-ladder2k-5e12-memory).
    Regime("ladder2k-2e12 (pywheels-v1)", None, ("ladder2k-2e12",)),
    Regime("ladder2k-2e12, dropless (pywheels-v1)", None, ("ladder2k-2e12-dropless",),
           note="rho 1.0 / 0.8 / 0.6 / 0.4 / 0.3; no capacity drops"),
    Regime("ladder2k-5e12 (pywheels-v1)", "diag-c-ladder2k-5e12-memory", ("ladder2k-5e12",)),
    Regime("ladder2k-2e13 (pywheels-v1)", None, ("ladder2k-2e13",)),
)


def relative_gain(runs: pd.DataFrame, level: float = 0.95) -> dict[str, float]:
    """(L(1.0) - L(best)) / L(1.0) over the seed means of an allocation curve, with a Welch
    interval of the difference divided by L(1.0); ``best_rho`` is the rho of the lowest mean."""
    means = runs.groupby("rho")["val_loss"].mean()
    out = {"value": NAN, "lo": NAN, "hi": NAN, "best_rho": NAN, "L1": NAN, "n_rho": len(means)}
    if 1.0 not in means.index or len(means) < 2:
        return out
    best = float(means.drop(1.0).idxmin())
    l1 = float(means.loc[1.0])
    w = welch(runs.loc[runs["rho"] == 1.0, "val_loss"].to_numpy(),
              runs.loc[runs["rho"] == best, "val_loss"].to_numpy(), level)
    out.update(best_rho=best, L1=l1, value=w["diff"] / l1, lo=w["lo"] / l1, hi=w["hi"] / l1)
    return out


def regime_shape(runs: pd.DataFrame) -> str:
    """The regime's shape read back from its runs: vocabulary, layers, d_model, the Engram's hash
    heads per order and memory width d_mem (over d_model), and training tokens per active
    parameter (of the rho = 1 run, or the first run when there is none)."""
    import json

    if runs is None or "config_json" not in runs or runs.empty:
        return "-"
    rows = runs[runs["rho"] == 1.0] if (runs["rho"] == 1.0).any() else runs
    cfg = json.loads(rows.iloc[0]["config_json"])
    parts = [f"V {cfg['vocab_size']}", f"{cfg['n_layers']} x {cfg['d_model']}"]
    engrams = [json.loads(c).get("engram") for c in runs["config_json"]]
    e = next((x for x in engrams if x), None)
    if e:
        d_mem = (e["max_ngram"] - 1) * e["heads_per_ngram"] * e["d_head"]
        frac = cfg["d_model"] / d_mem
        parts.append(f"Engram {e['heads_per_ngram']} heads/order, d_mem {d_mem}"
                     f" = d/{frac:.3g}")
    tpp = float(rows.iloc[0]["tokens_seen"]) / float(rows.iloc[0]["params_active"])
    parts.append(f"{tpp:.0f} tokens/P_act")
    return ", ".join(parts)


def mechanism_table(results: str | Path, regimes=REGIMES, level: float = 0.95) -> pd.DataFrame:
    """One row per regime with data, then the paper: memory's value (nats per decade of slots)
    and the relative gain of the best rho, each with its interval and its ratio to the paper's."""
    rows = []
    for r in regimes:
        mem = memory_value(results, r.memory, level) if r.memory else None
        frames = [g for g in (_grid(results, n) for n in r.allocation) if g is not None]
        alloc = pd.concat(frames, ignore_index=True) if frames else None
        if alloc is not None and r.pure_moe:
            moe = _grid(results, r.pure_moe)
            if moe is not None:
                top = moe[moe["n_routed"] == moe["n_routed"].max()].assign(rho=1.0)
                alloc = pd.concat([alloc, top], ignore_index=True)
        gain = relative_gain(alloc, level) if alloc is not None else None
        if mem is None and (gain is None or not math.isfinite(gain["value"])):
            continue
        shape_runs = alloc if alloc is not None else _grid(results, r.memory)
        rows.append({"regime": r.name, "note": r.note, "shape": regime_shape(shape_runs),
                     "npd": mem["value"] if mem else NAN, "npd_lo": mem["lo"] if mem else NAN,
                     "npd_hi": mem["hi"] if mem else NAN,
                     "npd_decades": mem["decades"] if mem else NAN,
                     "gain": gain["value"] if gain else NAN, "gain_lo": gain["lo"] if gain else NAN,
                     "gain_hi": gain["hi"] if gain else NAN,
                     "best_rho": gain["best_rho"] if gain else NAN})
    rows.append({"regime": "paper (6e20; memory scaling at a 568M-active backbone)", "note": "",
                 "shape": "V 129k, Engram 8 heads/order, d_mem = d/2, ~100 tokens/P_act",
                 "npd": PAPER_NATS_PER_DECADE, "npd_lo": NAN, "npd_hi": NAN, "npd_decades": 1.59,
                 "gain": PAPER_RELATIVE_GAIN, "gain_lo": NAN, "gain_hi": NAN, "best_rho": 0.8})
    t = pd.DataFrame(rows)
    t["npd_ratio"] = t["npd"] / PAPER_NATS_PER_DECADE
    t["gain_ratio"] = t["gain"] / PAPER_RELATIVE_GAIN
    return t


# -------------------------------------------------------------------------------- Markdown
def _x(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.1f}x"


def mechanism_markdown(t: pd.DataFrame) -> str:
    lines = ["| regime | shape | memory's value: nats per decade of slots [95%] | vs paper "
             "| relative gain of the best rho [95%] | best rho | vs paper |",
             "|---|---|---|---|---|---|---|"]
    for r in t.itertuples():
        npd = est(r.npd, r.npd_lo, r.npd_hi)
        if math.isfinite(r.npd) and not math.isfinite(r.npd_lo):
            npd = f"{r.npd:.3f}"
        if math.isfinite(r.npd_decades):
            npd += f" ({r.npd_decades:.1f} decades)"
        gain = "-" if not math.isfinite(r.gain) else (
            f"{100 * r.gain:.1f}% [{100 * r.gain_lo:.1f}%, {100 * r.gain_hi:.1f}%]"
            if math.isfinite(r.gain_lo) else f"{100 * r.gain:.1f}%")
        note = f" ({r.note})" if r.note else ""
        best = "-" if not math.isfinite(r.best_rho) else f"{r.best_rho:.1f}"
        lines.append(f"| {r.regime}{note} | {r.shape} | {npd} | {_x(r.npd_ratio)} | {gain} | {best} "
                     f"| {_x(r.gain_ratio)} |")
    return "\n".join(lines)


def left_arm_markdown(t: pd.DataFrame) -> str:
    if t.empty:
        return "Not run yet."
    lines = ["| arm | corpus | L(0.8) (seeds) | L(0.3) (seeds) | L(0.3) - L(0.8) [95%] "
             "| against the reference |", "|---|---|---|---|---|---|"]
    for r in t.itertuples():
        vs = "-" if r.arm == "base" or not math.isfinite(r.diff_vs_base) else f"{r.diff_vs_base:+.4f}"
        lines.append(f"| {r.label} | {r.corpus} | {r.L_high:.4f} ({r.n_high}) | {r.L_low:.4f} "
                     f"({r.n_low}) | {est(r.diff, r.lo, r.hi, sign=True)} | {vs} |")
    return "\n".join(lines)


def expert_cost_markdown(t: pd.DataFrame) -> str:
    if t.empty:
        return "Not run yet."
    lines = ["| routed experts | val loss (seeds) | cost L(E) - L(E0) [95%] | rho keeping E "
             "| L(rho) with its tables | the tables buy back [95%] |",
             "|---|---|---|---|---|---|"]
    for r in t.itertuples():
        sd = f" ± {r.sd:.4f}" if math.isfinite(r.sd) else ""
        cost = "-" if r.cost == 0 and not math.isfinite(r.cost_lo) else est(r.cost, r.cost_lo, r.cost_hi, sign=True)
        has = math.isfinite(r.rho)
        lines.append(f"| {r.n_routed} | {r.L:.4f}{sd} ({r.seeds}) | {cost} "
                     f"| {f'{r.rho:.1f}' if has else '-'} | {f'{r.L_rho:.4f}' if has else '-'} "
                     f"| {est(r.buys, r.buys_lo, r.buys_hi, sign=True) if has else '-'} |")
    return "\n".join(lines)


def memory_markdown(m: dict[str, float] | None) -> str:
    if m is None:
        return "Not run yet."
    return (f"`{m['grid']}`: memory buys {est(m['value'], m['lo'], m['hi'])} nats per decade of "
            f"Engram slots (least squares over {m['n']} runs at {m['sizes']} sizes, "
            f"{m['decades']:.1f} decades); the paper: {PAPER_NATS_PER_DECADE:g}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.diagnose", description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--budget", default="cpu-3e12", help="the budget of the diag-* grids")
    a = ap.parse_args(argv)
    print("== (a) what makes the left arm appear\n" + left_arm_markdown(left_arm(a.results, a.budget)))
    print("\n== (b) the cost of the left arm alone\n" + expert_cost_markdown(expert_cost(a.results, a.budget)))
    print("\n== (b) without capacity drops (dropless dispatch)\n"
          + expert_cost_markdown(expert_cost(a.results, a.budget, dispatch="dropless")))
    print("\n== (c) the value of memory\n" + memory_markdown(memory_value(a.results, f"diag-c-{a.budget}-memory")))
    print("\n== mechanism ratios\n" + mechanism_markdown(mechanism_table(a.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
