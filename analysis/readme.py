"""The README's results tables, generated from the committed results: ``python -m analysis readme``.

Every number in the README's generated blocks comes from ``results/<grid>/runs.csv`` through the
fits of this package; nothing is typed by hand. A block is delimited by
``<!-- generated:NAME -->`` and ``<!-- end:NAME -->``; ``--check`` regenerates them in memory and
exits 1 if the README differs. Fitted numbers are printed at the precision their intervals
support and compared within one unit of their last printed digit (:func:`same`), so the check
passes on any machine that runs the same code (a fit's last digits differ between CPUs) and fails
when a committed result changes.

Blocks: ``mechanism`` and ``diagnostics`` (:mod:`analysis.diagnose`: how close a regime's
memory/computation trade-off is to the paper's), ``ladder`` (the budgets, with measured trial
times), ``ladder-results`` (the allocation
law across the paper-regime ladder), ``lr`` (the learning-rate checks), ``cpu-small`` and
``memory`` (the earlier, undertrained grids), ``overencoding``, ``ablations`` and ``optimizer``
(the paper's other comparisons, :mod:`analysis.paper`).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import load
from analysis.fit import fit_u_curve
from analysis.ladder import LADDER, LADDER_2K, ladder_report, report_markdown
from analysis.report import est, memory_fit

N_BOOT = 1000
_BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end:(?P=name) -->)",
                    re.S)


def _grid(results: Path, name: str) -> pd.DataFrame | None:
    p = results / name / "runs.csv"
    return load.load_runs(p) if p.exists() else None


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def block_ladder(results: Path) -> str:
    """The budgets: shape, regime, corpus, the measured time of a trial (median wall time of the
    budget's committed trials, which ran two at a time on the 2-core machine), the planned time
    of a trial and of the whole grid, and for GPU budgets the memory plan of a trial (per device,
    at the grid's lowest rho, ``engram_jax.memory.memory_plan``)."""
    from engram_jax.allocation import BUDGETS, allocate, expected_trial_s
    from engram_jax.config import TrainConfig
    from engram_jax.memory import memory_plan

    lines = ["| budget | device | corpus | total | P_tot | P_act | P_tot/P_act | tokens/trial "
             "| tokens/P_act | C = 6 P_act D | epochs | trials | measured s/trial (trials) "
             "| planned s/trial | planned h/grid | memory plan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in BUDGETS.values():
        c = b.base().param_counts()
        D = b.tokens()
        runs = [r for r in (_grid(results, b.name), _grid(results, f"lr-{b.name}")) if r is not None]
        walls = pd.concat([r["wall_s"] for r in runs]) if runs else pd.Series(dtype=float)
        measured = f"{walls.median():.0f} ({len(walls)})" if len(walls) else "-"
        n = len(b.rhos) * len(b.seeds)
        t = expected_trial_s(b)
        mem = "-"
        if b.device == "gpu":
            tcfg = TrainConfig(**{**b.train_overrides(), "seed": 0})
            plan = memory_plan(allocate(b.base(), min(b.rhos), b.engram), tcfg)
            mem = f"{plan['total'] / 2**30:.0f} GiB"
        lines.append(
            f"| {b.name} | {b.device} | `{b.corpus}` | {_si(c['total'])} | {_si(c['p_tot'])} "
            f"| {_si(c['active'])} | {c['p_tot'] / c['active']:.1f} | {_si(D)} | {D / c['active']:.3g} "
            f"| {6 * c['active'] * D:.2g} | {D / b.corpus_tokens:.2g} "
            f"| {n} | {measured} | {t:.0f} | {n * t / 3600:.2g} | {mem} |")
    return "\n".join(lines)


def _ladder_results(results: Path, ladder: tuple[str, ...]) -> str:
    frames = [r for r in (_grid(results, n) for n in ladder) if r is not None]
    if not frames:
        return "No trial of the ladder has finished yet."
    runs = pd.concat(frames, ignore_index=True)
    from engram_jax.allocation import BUDGETS

    n = runs.loc[runs["status"] == "ok", "budget"].value_counts()
    counts = ", ".join(f"{b}: {n.get(b, 0)} of {len(BUDGETS[b].rhos) * len(BUDGETS[b].seeds)} "
                       "trials" for b in ladder)
    return f"Finished: {counts}.\n\n" + report_markdown(ladder_report(runs, n_boot=N_BOOT))


def block_ladder_results(results: Path) -> str:
    """The allocation law across the vocabulary-512 ladder (the contrast)."""
    return _ladder_results(results, LADDER)


def block_ladder2k_results(results: Path) -> str:
    """The allocation law across the paper-shaped ladder."""
    return _ladder_results(results, LADDER_2K)


def _rho1_by_rate(results: Path, b: str) -> pd.DataFrame:
    """Every finished rho = 1.0 trial of budget ``b`` with its peak rate and seed: the rate sweep
    (``lr-<b>``), its extra seeds (``lr-<b>-seeds``) and the allocation grid (``<b>``, at the
    budget's rate). A (rate, seed) pair met twice is one configuration: its first row is kept."""
    frames = [g for g in (_grid(results, n) for n in (f"lr-{b}", f"lr-{b}-seeds", b)) if g is not None]
    if not frames:
        return pd.DataFrame(columns=["lr", "seed", "val_loss"])
    d = pd.concat(frames, ignore_index=True)
    d = d[(d["status"] == "ok") & (d["rho"] == 1.0)]
    return d.drop_duplicates(["lr", "seed"])[["lr", "seed", "val_loss"]]


# The learning-rate checks: (label, budget, rho = 1.0 grid, low-rho grid). The ladder's low rho
# is 0.7; the candidates' is the lowest of their allocation grids.
LR_CHECKS = (
    *((b, b, f"lr-{b}", f"lr-{b}-rho0.7") for b in LADDER),
    ("cpu2k-5e12", "cpu2k-5e12", "lr-cpu2k-5e12", "lr-cpu2k-5e12-rho0.4"),
    *((b, b, f"lr-{b}", f"lr-{b}-rho0.3") for b in LADDER_2K),
    ("cpu-3e12, 8 heads/order (pywheels-v1)", None, None, "cand-cpu-3e12-pe-lr"),
)


def block_lr(results: Path) -> str:
    """Per budget and peak rate: the one-seed loss at rho = 1.0 and at a low rho, and, where a
    rate has at least two seeds at rho = 1.0 (``lr-<b>-seeds``, the allocation grid), their
    mean ± sd."""
    lines = ["| budget | peak lr | val loss at rho = 1.0 | val loss at a low rho (rho) "
             "| rho = 1.0, mean ± sd over seeds (n) |",
             "|---|---|---|---|---|"]
    any_row = False
    for label, b, g1, glow in LR_CHECKS:
        one = _grid(results, g1) if g1 else None
        low = _grid(results, glow)
        if one is None and low is None:
            continue
        seeds = _rho1_by_rate(results, b) if b else pd.DataFrame({"lr": [], "val_loss": []})
        rates = sorted((set(one["lr"]) if one is not None else set())
                       | (set(low["lr"]) if low is not None else set()))
        best1 = one.loc[one["val_loss"].idxmin(), "lr"] if one is not None else None
        bestl = low.loc[low["val_loss"].idxmin(), "lr"] if low is not None else None
        for lr in rates:
            v1 = one.loc[one["lr"] == lr, "val_loss"] if one is not None else pd.Series(dtype=float)
            vl = low.loc[low["lr"] == lr] if low is not None else pd.DataFrame()
            vs = seeds.loc[np.isclose(seeds["lr"], lr), "val_loss"]
            cell1 = f"{v1.iloc[0]:.4f}" + (" (best)" if lr == best1 else "") if len(v1) else "-"
            celll = (f"{vl['val_loss'].iloc[0]:.4f} ({vl['rho'].iloc[0]:g})"
                     + (" (best)" if lr == bestl else "")) if len(vl) else "-"
            cells = f"{vs.mean():.4f} ± {vs.std(ddof=1):.4f} ({len(vs)})" if len(vs) >= 2 else "-"
            lines.append(f"| {label} | {lr:g} | {cell1} | {celll} | {cells} |")
            any_row = True
    return "\n".join(lines) if any_row else "No learning-rate grid has finished yet."


def block_cpu_small(results: Path) -> str:
    frames = [r for r in (_grid(results, "cpu-small"), _grid(results, "cpu-small-seeds")) if r is not None]
    if not frames:
        return "No cpu-small grid in results/."
    runs = pd.concat(frames, ignore_index=True)
    lines = ["| rho | routed experts | Engram slots | val loss (mean ± std over seeds) | seeds |",
             "|---|---|---|---|---|"]
    for rho, g in sorted(runs.groupby("rho"), key=lambda t: -t[0]):
        lines.append(f"| {rho:.1f} | {int(g['n_routed'].iloc[0])} | {int(g['engram_slots'].iloc[0]):,} "
                     f"| {g['val_loss'].mean():.4f} ± {g['val_loss'].std(ddof=1):.4f} | {len(g)} |")
    f = fit_u_curve(runs, n_boot=N_BOOT)
    lines += ["", "Fit (`python -m analysis fit results/cpu-small results/cpu-small-seeds`): " + (
        f"rho* = {est(f['rho_star'], f['ci_low'], f['ci_high'])} (95% interval; {f['model']})"
        if f["is_u_shaped"] else f['reason']) + "."]
    return "\n".join(lines)


def block_memory(results: Path) -> str:
    runs = _grid(results, "memory-cpu-small")
    if runs is None:
        return "No memory grid in results/."
    lines = ["| Engram slots | total params | val loss |", "|---|---|---|"]
    for r in runs.sort_values("engram_slots").itertuples():
        lines.append(f"| {int(r.engram_slots):,} | {_si(r.params_total)} | {r.val_loss:.4f} |")
    col, f = memory_fit(runs, n_boot=500)
    lines += ["", (f"L = E + A x^-alpha over {col}: alpha = {est(f['alpha'], *f['alpha_ci'])}, "
                   f"E = {est(f['E'], *f['E_ci'])} (bootstrap 95% intervals; "
                   f"{f['n_points']} points, one seed)") if f["ok"] else f"no power-law fit: {f['reason']}"]
    return "\n".join(lines)


# The budget of the paper's comparisons beyond the allocation curve (sweeps/grids/memory-*,
# ablation-*, muon-*): the smallest rung of the ladder, where ~70 trials cost about an hour.
PAPER_BUDGET = "cpu-1e12"


def block_overencoding(results: Path) -> str:
    from analysis.paper import memory_comparison, memory_markdown

    return memory_markdown(memory_comparison(results, PAPER_BUDGET, n_boot=500))


def block_ablations(results: Path) -> str:
    from analysis.paper import ablation_markdown, ablation_table

    return ablation_markdown(ablation_table(results, PAPER_BUDGET))


def block_optimizer(results: Path) -> str:
    from analysis.paper import optimizer_comparison, optimizer_markdown

    return optimizer_markdown(optimizer_comparison(results, PAPER_BUDGET, n_boot=N_BOOT))


def block_mechanism(results: Path) -> str:
    from analysis import diagnose

    return diagnose.mechanism_markdown(diagnose.mechanism_table(results))


def block_diagnostics(results: Path) -> str:
    from analysis import diagnose

    return "\n\n".join([
        "(a) What makes the left arm appear: L(0.3) - L(0.8), one change at a time "
        "(`sweeps/grids/diag-a-cpu-3e12-*.yaml`; Welch 95% intervals over seeds):",
        diagnose.left_arm_markdown(diagnose.left_arm(results)),
        "(b) The cost of the left arm alone: routed experts removed, nothing in their place "
        "(`diag-b-cpu-3e12-experts.yaml`), and what the reference's tables buy back at the rho "
        "that keeps as many experts:",
        diagnose.expert_cost_markdown(diagnose.expert_cost(results)),
        "The same without capacity drops (`diag-b-cpu-3e12-experts-dropless.yaml`, against "
        "diagnostic (a)'s dropless arm): every routed assignment reaches its expert on both sides:",
        diagnose.expert_cost_markdown(diagnose.expert_cost(results, dispatch="dropless")),
        "(c) The value of memory at the same backbone (`diag-c-cpu-3e12-memory.yaml`): "
        + diagnose.memory_markdown(diagnose.memory_value(results, "diag-c-cpu-3e12-memory")),
    ])


BLOCKS: dict[str, Callable[[Path], str]] = {
    "ladder": block_ladder, "ladder-results": block_ladder_results,
    "ladder2k-results": block_ladder2k_results, "lr": block_lr,
    "cpu-small": block_cpu_small, "memory": block_memory, "overencoding": block_overencoding,
    "ablations": block_ablations, "optimizer": block_optimizer,
    "mechanism": block_mechanism, "diagnostics": block_diagnostics,
}


def render(text: str, results: Path) -> str:
    """``text`` with every generated block rebuilt from ``results``."""
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise ValueError(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return m.group(1) + BLOCKS[name](results).rstrip("\n") + "\n" + m.group(4)
    return _BLOCK.sub(sub, text)


_NUM = re.compile(r"[-+]?\d[\d,]*\.?\d*(?:e[-+]?\d+)?")


def same(a: str, b: str) -> bool:
    """Equal text; integers equal, decimals within one unit of their last printed digit.

    This is the check's stated tolerance. It holds across machines because every number that
    comes out of a fit is printed at the precision its interval supports
    (:func:`analysis.report.est`): rounding in BLAS or in an optimizer's path moves such a number
    by a small share of one printed unit, a changed result by many units.
    """
    if _NUM.sub("#", a) != _NUM.sub("#", b):
        return False
    for x, y in zip(_NUM.findall(a), _NUM.findall(b)):
        if x == y:
            continue
        if "." not in x or "." not in y:
            return False  # counts and integers must match exactly
        fx, fy = float(x.replace(",", "")), float(y.replace(",", ""))
        mant, _, exp = x.lower().partition("e")
        unit = 10 ** (int(exp or 0) - len(mant.split(".")[1]))
        if not math.isclose(fx, fy, abs_tol=1.01 * unit, rel_tol=1e-12):
            return False
    return True


def stale_blocks(text: str, new: str) -> list[str]:
    """Names of the generated blocks of ``text`` whose body is not :func:`same` as in ``new``
    (``new`` is ``text`` rendered afresh)."""
    old_blocks = {m.group("name"): m.group("body") for m in _BLOCK.finditer(text)}
    return [m.group("name") for m in _BLOCK.finditer(new)
            if not same(old_blocks.get(m.group("name"), ""), m.group("body"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis readme", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--results", default="results")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README is not up to date")
    a = ap.parse_args(argv)
    path = Path(a.readme)
    text = path.read_text()
    if not _BLOCK.search(text):
        print(f"error: {path} has no <!-- generated:NAME --> blocks", file=sys.stderr)
        return 2
    with np.errstate(all="ignore"):
        new = render(text, Path(a.results))
    if a.check:
        bad = stale_blocks(text, new)
        if bad:
            print(f"{path} is out of date in block(s) {', '.join(bad)}: run "
                  "`python -m analysis readme` (make readme)", file=sys.stderr)
            return 1
        print(f"{path}: every generated block matches results/")
        return 0
    path.write_text(new)
    print(f"rewrote the generated blocks of {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
