"""Paper-style figures from result grids: allocation U-curves, memory scaling, training curves.

The backend is left to the caller (the CLI picks Agg; notebooks use inline). Every figure is
written as PDF (for the paper) and PNG (for a quick look) by :func:`save`;
:func:`make_all` regenerates all of them from every ``results/<grid>/runs.csv`` (``make plots``),
following :func:`plan`, which lists them without drawing.

Figures are byte-stable (docs/design.md section 10): :func:`save` writes no time stamps and snaps
every drawn line and band to six significant digits, far below a pixel, so that fits differing in
their last digits draw the same pixels; bootstrap bands use fixed seeds.
"""

from __future__ import annotations

import fnmatch
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.collections import PolyCollection

from analysis import load, style
from analysis.fit import fit_power_law, fit_u_curve
from analysis.powerlaw import power_law

RHO_LABEL = r"$\rho$ (share of sparse params in routed experts)"


def describe(df: pd.DataFrame, budget: str | None = None) -> str:
    """One-line provenance for a title: grid, budget, device and number of seeds."""
    d = df if budget is None else df[df["budget"] == budget]
    grid = ",".join(sorted(d["grid"].astype(str).unique()))
    dev = ",".join(sorted(d["device_kind"].dropna().astype(str).unique())) \
        if "device_kind" in d.columns else "?"
    seeds = d["seed"].nunique()
    parts = [grid] + ([f"budget {budget}"] if budget is not None else [])
    return " | ".join(parts + [dev or "?", f"{seeds} seed{'s' * (seeds != 1)}"])


def _panels(n: int):
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    width = style.COLUMN_WIDTH if ncols == 1 else style.FULL_WIDTH
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(width, nrows * width / ncols * style.ASPECT + 0.25))
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def _seeds_and_means(ax, d: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Individual seeds as faint dots, the per-x mean +- std as error bars."""
    ax.plot(d[x], d[y], "o", ms=2, color=style.DATA, alpha=0.25, mec="none", zorder=2)
    agg = load.aggregate(d, by=(x,), y=y)
    ax.errorbar(agg[x], agg["mean"], yerr=agg["std"].fillna(0), fmt="o", color=style.DATA,
                ms=3, lw=0.8, zorder=3, label="mean $\\pm$ std over seeds")
    return agg


NOTE_COLOUR = "#7a2a20"


def _note(ax, text: str) -> None:
    """A warning as a handle-less legend entry, so legend placement keeps it off the data."""
    ax.plot([], [], " ", label=textwrap.fill(text, 44))


def allocation_panel(ax, d: pd.DataFrame, fit: dict, *, y: str = "val_loss") -> None:
    """Loss against rho for one budget: seeds, means, fitted curve, bootstrap band and optimum."""
    agg = _seeds_and_means(ax, d, "rho", y)
    if len(agg) >= 3:  # the spline cross-check, lightly, so the fitted curve stays the message
        from scipy.interpolate import Akima1DInterpolator
        xx = np.linspace(agg["rho"].min(), agg["rho"].max(), 200)
        ax.plot(xx, Akima1DInterpolator(agg["rho"], agg["mean"])(xx), ":", color="0.55",
                lw=0.7, zorder=1, label="Akima spline of means")
    if fit["is_u_shaped"]:
        xx = fit["curve_x"]
        if len(fit["band"][0]):
            ax.fill_between(xx, *fit["band"], color=style.BAND, alpha=0.5, lw=0, zorder=1,
                            label="bootstrap band")
        ax.plot(xx, fit["curve_y"], color=style.FIT, lw=1.1, zorder=4,
                label=f"{fit['model']} fit")
        x0, x1 = agg["rho"].min(), agg["rho"].max()
        ax.axvspan(max(fit["ci_low"], x0 - 0.05), min(fit["ci_high"], x1 + 0.05),
                   color=style.OPTIMUM, alpha=0.12, lw=0, zorder=0)
        ax.plot([fit["rho_star"]], [fit["l_star"]], "D", color=style.OPTIMUM, ms=3.5, zorder=5,
                label=f"$\\rho^*$ = {fit['rho_star']:.3f}, {fit['level']:.0%} CI "
                f"[{fit['ci_low']:.3f}, {fit['ci_high']:.3f}]")
    else:
        _note(ax, f"no U-shape: {fit['reason']}")
    ax.set_xlabel(RHO_LABEL)
    ax.set_ylabel("validation loss")
    ax.margins(x=0.05, y=0.12)


KEEP = ("$\\rho^*$", "no U-shape", "no power-law")  # entries every panel keeps


def _legend(ax, keep_all: bool, loc: str = "best", anchor=None) -> None:
    """Legend placed away from the data; later panels keep only their own optimum entry."""
    handles, labels = ax.get_legend_handles_labels()
    if not keep_all:
        pairs = [(h, lab) for h, lab in zip(handles, labels) if lab.startswith(KEEP)]
        handles, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    if handles:
        leg = ax.legend(handles, labels, loc=loc, bbox_to_anchor=anchor, fontsize=6, handlelength=1.5)
        for t in leg.get_texts():
            if t.get_text().startswith(KEEP[1:]):
                t.set_color(NOTE_COLOUR)


def plot_allocation(df: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> plt.Figure:
    """Figure (a): validation loss against rho, one panel per budget.

    Args:
        df: runs of one rho grid (several budgets allowed).
        n_boot, seed: bootstrap settings of the fit.

    Returns:
        The figure (not saved).
    """
    budgets = load.budgets_by_compute(df)
    with style.context():
        fig, axes = _panels(len(budgets))
        for ax, b in zip(axes, budgets):
            d = df[df["budget"] == b]
            allocation_panel(ax, d, fit_u_curve(d, n_boot=n_boot, seed=seed))
            ax.set_title(describe(df, b), fontsize=7)
        for i, ax in enumerate(axes):
            _legend(ax, keep_all=i == 0)
        fig.tight_layout()
    return fig


def plot_memory(df: pd.DataFrame, *, n_boot: int = 500, seed: int = 0) -> plt.Figure | None:
    """Figure (b): loss against Engram memory on log-log axes with the power-law fit.

    Returns:
        The figure, or None when the grid does not vary memory.
    """
    col = load.memory_column(df)
    if col is None:
        return None
    with style.context():
        fig, axes = _panels(1)
        ax = axes[0]
        d = df[df[col] > 0]
        _seeds_and_means(ax, d, col, "val_loss")
        f = fit_power_law(d[col], d["val_loss"], n_boot=n_boot, seed=seed)
        xx = np.logspace(np.log10(d[col].min()), np.log10(d[col].max()), 200)
        if f["ok"]:
            bs = f["boot_samples"]
            if len(bs) >= 10:
                pred = power_law(xx[None, :], bs[:, 0, None], bs[:, 1, None], bs[:, 2, None])
                ax.fill_between(xx, *np.quantile(pred, [0.025, 0.975], axis=0),
                                color=style.BAND, alpha=0.5, lw=0, label="bootstrap band")
            lo, hi = f["alpha_ci"]
            ax.plot(xx, power_law(xx, f["E"], f["A"], f["alpha"]), color=style.FIT,
                    label=f"$E + A\\,x^{{-\\alpha}}$, E = {f['E']:.3f}\n"
                    f"$\\alpha$ = {f['alpha']:.3f} [{lo:.3f}, {hi:.3f}]")
        else:
            _note(ax, f"no power-law fit: {f['reason']}")
        base = df.loc[df[col] == 0, "val_loss"]
        if len(base):
            ax.axhline(base.mean(), ls="--", lw=0.7, color="0.4", label="no Engram (MoE)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # A narrow loss range on a log axis gets no major ticks by default: use plain ones.
        ax.yaxis.set_major_locator(ticker.MaxNLocator(5))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3f"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel({"engram_slots": "Engram table rows (slots)",
                       "params_overencoding_tables": "OverEncoding table parameters"}.get(
                          col, "Engram table parameters"))
        ax.set_ylabel("validation loss")
        ax.set_title(describe(df), fontsize=7)
        # Loss falls left to right, so the upper right is free below the baseline line
        # ("best" would ignore the axhline).
        _legend(ax, keep_all=True, loc="upper right", anchor=(1.0, 0.92))
        fig.tight_layout()
    return fig


def _curve_data(runs: pd.DataFrame, curves: pd.DataFrame):
    """The evaluated curve points joined to their setting, the setting's column, the memory
    column (None for rho) and the settings' values; None when there is nothing to draw."""
    mem = load.memory_column(runs) if load.is_memory_grid(runs) else None
    key = mem or "rho"
    c = curves.dropna(subset=["val_loss", "tokens"])
    c = c.merge(runs[["trial_id", "budget", key]], on="trial_id")
    if c.empty:
        return None
    vals = np.sort(runs[key].dropna().unique())
    if not len(vals):  # no rho or memory size to colour by (the multi-branch ablation)
        return None
    return c, key, mem, vals


def plot_curves(runs: pd.DataFrame, curves: pd.DataFrame) -> plt.Figure | None:
    """Figure (c): validation loss against tokens, one colour per rho (or memory size).

    Seeds of one setting are averaged at each evaluation point, so each colour is one line.

    Returns:
        The figure, or None when the grid has no evaluated curve points.
    """
    cd = _curve_data(runs, curves)
    if cd is None:
        return None
    c, key, mem, vals = cd
    label = "Engram slots" if mem else r"$\rho$"
    pos = vals[vals > 0]
    if mem:
        norm = matplotlib.colors.LogNorm(pos.min(), max(pos.max(), pos.min() * 1.01))
    else:
        norm = matplotlib.colors.Normalize(vals.min(), max(vals.max(), vals.min() + 1e-9))
    cmap = plt.get_cmap(style.CMAP)
    budgets = [b for b in load.budgets_by_compute(runs) if b in set(c["budget"])]
    with style.context():
        fig, axes = _panels(len(budgets))
        for ax, b in zip(axes, budgets):
            d = c[c["budget"] == b].groupby([key, "tokens"], as_index=False)["val_loss"].mean()
            for v, t in d.groupby(key):
                colour = "0.3" if (mem and v <= 0) else cmap(0.9 * norm(v))  # no pale yellow
                ax.plot(t["tokens"], t["val_loss"], lw=0.8, color=colour)
            # Zoom on the later part of training, where the settings separate.
            late = d.loc[d["tokens"] >= 0.3 * d["tokens"].max(), "val_loss"]
            lo, hi = d["val_loss"].min(), late.max()
            pad = 0.05 * (hi - lo) if hi > lo else 0.01
            ax.set_ylim(lo - pad, hi + pad)
            shown = d.loc[d["val_loss"] <= hi + pad, "tokens"]
            ax.set_xlim(0.95 * shown.min(), 1.02 * d["tokens"].max())
            ax.set_xlabel("training tokens")
            ax.set_ylabel("validation loss")
            ax.set_title(describe(runs, b), fontsize=7)
            ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
        fig.tight_layout()
        sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=matplotlib.colors.ListedColormap(
            cmap(np.linspace(0, 0.9, 256))))
        cb = fig.colorbar(sm, ax=list(axes), fraction=0.05, pad=0.02, aspect=25)
        cb.set_label(label + (" (grey: none)" if mem and (vals <= 0).any() else ""))
        cb.outline.set_linewidth(0.4)
    return fig


def plot_setting_sweep(runs: pd.DataFrame, key: str) -> plt.Figure:
    """Validation loss against a swept training setting (e.g. the peak learning rate), one line
    per rho; log x for rates."""
    field = key.split(".", 1)[1]
    col = field if field in runs.columns else "sweep_value"
    with style.context():
        fig, ax = plt.subplots(figsize=(style.COLUMN_WIDTH, style.COLUMN_WIDTH * style.ASPECT))
        for rho, d in runs.groupby("rho"):
            d = d.assign(_x=pd.to_numeric(d[col])).sort_values("_x")
            ax.plot(d["_x"], d["val_loss"], "o-", ms=3, lw=0.9, label=f"rho = {rho:g}")
            best = d.loc[d["val_loss"].idxmin()]
            ax.plot([best["_x"]], [best["val_loss"]], "D", color=style.OPTIMUM, ms=4)
        if field.endswith("lr") or field == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(field)
        ax.set_ylabel("validation loss")
        ax.set_title(describe(runs), fontsize=7)
        ax.legend(fontsize=6)
        fig.tight_layout()
    return fig


def plot_ablation(runs: pd.DataFrame) -> plt.Figure:
    """An ablation grid (one switch swept at a fixed rho): validation loss of each arm, every
    seed as a dot and the mean with its standard error. The README's table (analysis.paper)
    compares the arms with intervals."""
    key = str(runs["sweep_key"].dropna().iloc[0]) if runs["sweep_key"].notna().any() else "arm"
    arms = sorted(runs["sweep_value"].astype(str).unique()) if "sweep_value" in runs else ["all"]
    with style.context():
        fig, ax = plt.subplots(figsize=(style.COLUMN_WIDTH, style.COLUMN_WIDTH * style.ASPECT))
        for i, arm in enumerate(arms):
            v = runs.loc[runs["sweep_value"].astype(str) == arm, "val_loss"].to_numpy(float) \
                if "sweep_value" in runs else runs["val_loss"].to_numpy(float)
            ax.plot(np.full(len(v), i), v, "o", ms=3, alpha=0.5, color=style.DATA)
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
            ax.errorbar([i + 0.15], [v.mean()], yerr=[se], fmt="D", ms=4, capsize=2,
                        color=style.OPTIMUM)
        ax.set_xticks(range(len(arms)), [f"{key.split('.')[-1]} = {a}" for a in arms], fontsize=6)
        ax.set_xlim(-0.5, len(arms) - 0.5)
        ax.set_ylabel("validation loss")
        ax.set_title(describe(runs), fontsize=7)
        fig.tight_layout()
    return fig


FORMATS = ("pdf", "png")
# What a format's writer would otherwise stamp with the time of writing (the PNG writer adds none).
NO_TIMESTAMP = {"pdf": {"CreationDate": None}, "png": {}}


def _metadata(fmt: str) -> dict:
    """A file's metadata: no time stamp, and for PDFs the fonttools version beside
    matplotlib's, since fonttools subsets the embedded TrueType fonts and a new release changes
    the bytes (PNGs are rasterised by matplotlib's own FreeType and carry its version)."""
    if fmt != "pdf":
        return NO_TIMESTAMP[fmt]
    import fontTools

    return {**NO_TIMESTAMP[fmt], "Creator": f"Matplotlib v{matplotlib.__version__}, "
                                            f"fonttools {fontTools.version}"}

SIGNIFICANT_DIGITS = 6  # 1e-5 of a loss of 2: a tenth of a pixel or less on these axes


def _significant(a: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """Rounds to ``digits`` significant digits; zeros and non-finite values stay as they are."""
    a = np.asarray(a, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(np.isfinite(a) & (a != 0), np.floor(np.log10(np.abs(a))), 0.0)
    scale = 10.0 ** (digits - 1 - mag)
    return np.where(np.isfinite(a), np.round(a * scale) / scale, a)


def _snap(fig: plt.Figure) -> None:
    """Rounds the data of every line and filled area to the precision a figure can show, so that
    fits differing in their last digits (another CPU's rounding) draw the same pixels."""
    for ax in fig.axes:
        if getattr(ax, "_colorbar", None) is None:  # a colorbar's limits are its norm's, exact
            # The limits autoscaled from the unrounded data, rounded alike: they fix every
            # coordinate the files hold (a PDF prints them to ten decimals).
            ax.set_xlim(*_significant(ax.get_xlim()))
            ax.set_ylim(*_significant(ax.get_ylim()))
        for line in ax.get_lines():
            x, y = (np.asarray(v) for v in line.get_data(orig=True))
            line.set_data(*(_significant(v) if v.dtype.kind == "f" else v for v in (x, y)))
        for coll in ax.collections:
            if isinstance(coll, PolyCollection):  # fill_between's bands
                for path in coll.get_paths():
                    path.vertices = _significant(path.vertices)


def save(fig: plt.Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Writes ``<stem>.pdf`` and ``<stem>.png`` under out_dir and closes the figure.

    The files carry no time stamp and the drawn data are snapped (:func:`_snap`), so the same
    figure gives the same bytes on every run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _snap(fig)
    paths = [out / f"{stem}.{fmt}" for fmt in FORMATS]
    with style.context():
        for p, fmt in zip(paths, FORMATS):
            fig.savefig(p, metadata=_metadata(fmt))
    plt.close(fig)
    return paths


@dataclass(frozen=True)
class Planned:
    """One figure of :func:`plan`: its file stem and the call that draws it."""

    stem: str
    draw: Callable[[], plt.Figure]

    def files(self) -> list[str]:
        return [f"{self.stem}.{fmt}" for fmt in FORMATS]


def plan(results: str | Path = "results", *, n_boot: int = 1000,
         grids: Sequence[str] | None = None) -> list[Planned]:
    """Every figure :func:`make_all` writes for a results root, in order, without drawing any.

    Args:
        results: the results root. n_boot: bootstrap replicates of the U-curve fits.
        grids: only these grid names (default: every ``<results>/<grid>/runs.csv``).

    Returns:
        One :class:`Planned` per figure; each is drawn by calling its ``draw``.

    Raises:
        load.ResultsError: a runs.csv is malformed.
    """
    out: list[Planned] = []
    alloc: list[pd.DataFrame] = []
    loaded: dict[str, pd.DataFrame] = {}
    for gdir in load.find_grids(results):
        if grids is not None and gdir.name not in grids:
            continue
        runs = load.load_runs(gdir)
        if runs.empty:
            continue
        name = gdir.name
        loaded[name] = runs
        key = load.setting_sweep_key(runs)
        if key is not None:
            out.append(Planned(f"{name}_{key.split('.')[-1]}", partial(plot_setting_sweep, runs, key)))
        elif load.is_memory_grid(runs):  # implies a memory column, so plot_memory draws
            out.append(Planned(f"{name}_memory_scaling",
                               partial(plot_memory, runs, n_boot=min(n_boot, 500))))
        elif load.is_variant_grid(name) and runs["rho"].nunique() < 2:
            out.append(Planned(f"{name}_arms", partial(plot_ablation, runs)))  # not a curve in rho
        else:
            out.append(Planned(f"{name}_allocation", partial(plot_allocation, runs, n_boot=n_boot)))
        curves = load.load_curves(gdir)
        if _curve_data(runs, curves) is not None:
            out.append(Planned(f"{name}_curves", partial(plot_curves, runs, curves)))
        if load.is_allocation_grid(runs) and not load.is_variant_grid(name):
            alloc.append(runs)
    # A budget run in several grids (e.g. seed replicates in a grid of their own) also gets one
    # figure with every seed pooled, which is the one to read for the optimum and its interval.
    if alloc:
        pooled = pd.concat(alloc, ignore_index=True)
        for budget, d in pooled.groupby("budget"):
            if d["grid"].nunique() > 1:
                out.append(Planned(f"{budget}_allocation_pooled",
                                   partial(plot_allocation, d, n_boot=n_boot)))
        from analysis.ladder import LADDERS

        for fig_name, budgets in LADDERS.items():
            ladder = pooled[pooled["budget"].isin(budgets)]
            if not ladder.empty:  # the paper's figure: every ladder budget's curve on one axes
                out.append(Planned(fig_name, partial(_ladder_figure, ladder, n_boot)))
    # Engram against OverEncoding, per budget that has both arms (analysis.paper).
    for name in loaded:
        budget = name.removeprefix("memory-engram-")
        if name.startswith("memory-engram-") and f"memory-overencoding-{budget}" in loaded:
            out.append(Planned(f"memory-engram-vs-overencoding-{budget}",
                               partial(_memory_comparison_figure, results, budget,
                                       min(n_boot, 500))))
    return out


def _ladder_figure(ladder: pd.DataFrame, n_boot: int) -> plt.Figure:
    from analysis.ladder import ladder_report, plot_ladder

    return plot_ladder(ladder, ladder_report(ladder, n_boot=n_boot))


def _memory_comparison_figure(results: str | Path, budget: str, n_boot: int) -> plt.Figure:
    from analysis.paper import memory_comparison, plot_memory_comparison

    return plot_memory_comparison(memory_comparison(results, budget, n_boot=n_boot))


def figure_files(results: str | Path = "results", *, grids: Sequence[str] | None = None
                 ) -> list[str]:
    """The file names :func:`make_all` writes for a results root (the dry run of ``make plots``)."""
    return [f for p in plan(results, grids=grids) for f in p.files()]


class NoSuchFigure(ValueError):
    """``make_all(only=...)`` was given a pattern that names no figure."""


def make_all(results: str | Path = "results", out: str | Path | None = None, *,
             n_boot: int = 1000, only: Sequence[str] | None = None) -> list[Path]:
    """Regenerates every figure from every ``<results>/<grid>/runs.csv``.

    Args:
        results: the results root. out: figure directory (default ``<results>/figures``).
        n_boot: bootstrap replicates of the U-curve fits.
        only: shell patterns of figure stems (``ladder2k``, ``ladder2k-2e13_*``): draw only
            those. Each pattern must match a planned figure.

    Returns:
        The written files (empty when no grid exists).

    Raises:
        load.ResultsError: a runs.csv is malformed.
        NoSuchFigure: a pattern of ``only`` matches no planned figure (raised before drawing).
    """
    out = Path(results) / "figures" if out is None else Path(out)
    planned = plan(results, n_boot=n_boot)
    if only is not None:
        stems = [p.stem for p in planned]
        if missing := [o for o in only if not fnmatch.filter(stems, o)]:
            raise NoSuchFigure(f"no planned figure matches {', '.join(map(repr, missing))}; "
                             f"the figures are: {', '.join(stems)}")
        planned = [p for p in planned if any(fnmatch.fnmatchcase(p.stem, o) for o in only)]
    written: list[Path] = []
    for p in planned:
        fig = p.draw()
        if fig is None:
            raise RuntimeError(f"{p.stem}: planned, but its plot drew nothing; make plan() "
                               "skip it")
        written += save(fig, out, p.stem)
    return written
