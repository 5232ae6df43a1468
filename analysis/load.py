"""Load the sweep runner's result tables: ``results/<grid>/runs.csv`` and per-trial curves.

The runner writes one row per trial (docs/design.md section 6 (Results records)). Older files may
lack some columns and newer ones may add columns, so only a small core is required and everything
else is carried through untouched.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# The minimum a runs.csv needs to be analysable at all; the rest is optional. ``seed`` and
# ``budget`` identify which rows may be averaged or pooled, so a table without them is refused
# rather than given a made-up seed or budget under which unrelated runs would be pooled.
REQUIRED_COLUMNS: tuple[str, ...] = ("trial_id", "status", "rho", "val_loss", "seed", "budget")
CURVE_COLUMNS: tuple[str, ...] = ("step", "tokens", "train_loss", "val_loss")
NUMERIC_COLUMNS: tuple[str, ...] = (
    "rho", "rho_actual", "seed", "val_loss", "best_val_loss", "train_loss", "engram_slots",
    "params_total", "params_p_tot", "params_active", "params_sparse", "params_engram_tables",
    "params_routed_experts", "flops_per_token", "tokens_seen", "train_tokens", "epochs",
    "tokens_per_s", "wall_s",
)


class ResultsError(ValueError):
    """A results directory or table is missing or malformed."""


class ResultsWarning(UserWarning):
    """A results file was skipped (for example a half-written curve); the message names it."""


PathLike = str | os.PathLike


def _runs_csv(path: PathLike) -> Path:
    """Resolves a grid directory or a runs.csv path to the runs.csv file."""
    p = Path(path)
    if p.is_dir():
        p = p / "runs.csv"
    if not p.is_file():
        raise ResultsError(
            f"no runs.csv at {p}: pass a results/<grid> directory written by the sweep runner "
            "(make sweep) or a runs.csv file"
        )
    return p


def find_grids(results: PathLike) -> list[Path]:
    """Lists the grid directories under a results root that hold a runs.csv, sorted by name."""
    root = Path(results)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob("*/runs.csv"))


def _read_one(csv: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ResultsError(f"{csv} is not a readable CSV table: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ResultsError(
            f"{csv} lacks required column(s) {missing}; it has {list(df.columns)[:12]}... "
            "Regenerate it with the sweep runner or add the columns."
        )
    # The grid is the directory's name when the table does not say (directory names are unique
    # under a results root). A grid named by its base preset has an empty budget: it is labelled
    # by its grid, so it is never pooled with another grid's runs.
    if "grid" not in df.columns:
        df["grid"] = csv.parent.name
    df["grid"] = df["grid"].fillna(csv.parent.name).astype(str)
    no_budget = df["budget"].isna() | (df["budget"].astype(str).str.strip() == "")
    df["budget"] = df["budget"].astype(str).where(~no_budget, "grid:" + df["grid"])
    seeds = pd.to_numeric(df["seed"], errors="coerce")
    bad = df.loc[seeds.isna() | (seeds != seeds.round()), "trial_id"].astype(str).tolist()
    if bad:
        raise ResultsError(f"{csv}: trial(s) {bad[:5]} have no integer seed; seeds decide which "
                           "runs are averaged, so none is assumed")
    for col in NUMERIC_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["status"] = df["status"].astype(str).str.strip().str.lower()
    df["trial_id"] = df["trial_id"].astype(str)
    if "flops_per_token" in df.columns and "tokens_seen" in df.columns:
        # Compute per trial (FLOPs); the budget axis for rho*-vs-compute fits.
        df["compute"] = df["flops_per_token"] * df["tokens_seen"]
    df["source_dir"] = str(csv.parent)
    return df


def load_runs(paths: PathLike | Iterable[PathLike], *, keep_all: bool = False) -> pd.DataFrame:
    """Reads and concatenates one or more grids' runs.csv.

    Args:
        paths: a results/<grid> directory or runs.csv file, or several of them.
        keep_all: keep trials whose status is not "ok" (errors, divergences) too.

    Returns:
        One row per trial with the runner's columns, plus ``compute`` (flops_per_token *
        tokens_seen, when both exist) and ``source_dir``. A missing ``grid`` column is the
        directory's name; an empty ``budget`` (a grid named by its base preset) becomes
        ``grid:<grid>``.

    Raises:
        ResultsError: a path holds no runs.csv, a table lacks a required column (seed and
            budget included), or a trial has no integer seed.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    csvs = [_runs_csv(p) for p in paths]
    if not csvs:
        raise ResultsError("load_runs needs at least one results/<grid> directory")
    df = pd.concat([_read_one(c) for c in csvs], ignore_index=True)
    if not keep_all:
        df = df[df["status"] == "ok"].reset_index(drop=True)
    return df


def aggregate(
    df: pd.DataFrame, by: Sequence[str] = ("budget", "rho"), y: str = "val_loss"
) -> pd.DataFrame:
    """Aggregates seeds: mean, std, sem and count of ``y`` per group.

    Args:
        df: runs, one row per trial.
        by: grouping columns (missing ones are skipped).
        y: the column to summarise; NaNs are ignored.

    Returns:
        One row per group with columns ``*by, mean, std, sem, n`` (std and sem are NaN for n=1).
    """
    keys = [c for c in by if c in df.columns]
    if y not in df.columns:
        raise ResultsError(f"column {y!r} not in the runs table")
    d = df.dropna(subset=[y])
    if not keys:
        d = d.assign(_all=0)
        keys = ["_all"]
    g = d.groupby(keys, sort=True)[y]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["sem"] = out["std"] / np.sqrt(out["n"])
    out = out.drop(columns=["_all"], errors="ignore")
    return out[[*(k for k in keys if k != "_all"), "mean", "std", "sem", "n"]]


def load_curves(grid_dir: PathLike) -> pd.DataFrame:
    """Reads every ``curves/<trial_id>.csv`` of a grid into one long table.

    Args:
        grid_dir: a results/<grid> directory.

    Returns:
        Columns trial_id, step, tokens, train_loss, val_loss (NaN where not evaluated), lr
        (when present). Empty (with those columns) when the grid has no curves.

    Warns:
        ResultsWarning: naming each curve file that is unreadable (e.g. half-written) or lacks
            the curve columns; it is left out and the others are still read.
    """
    cdir = Path(grid_dir) / "curves"
    frames = []
    for f in sorted(cdir.glob("*.csv")) if cdir.is_dir() else []:
        try:
            c = pd.read_csv(f)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            # a half-written curve should not stop the figures of the others, but it is named
            warnings.warn(ResultsWarning(f"skipped unreadable curve {f}: {e}"), stacklevel=2)
            continue
        missing = [col for col in CURVE_COLUMNS if col not in c.columns]
        if missing:
            warnings.warn(ResultsWarning(f"skipped curve {f}: it lacks column(s) {missing}"),
                          stacklevel=2)
            continue
        for col in c.columns:
            c[col] = pd.to_numeric(c[col], errors="coerce")
        c.insert(0, "trial_id", f.stem)
        frames.append(c)
    if not frames:
        return pd.DataFrame(columns=["trial_id", *CURVE_COLUMNS, "lr"])
    return pd.concat(frames, ignore_index=True)


def setting_sweep_key(df: pd.DataFrame) -> str | None:
    """The swept training setting (e.g. "train.lr") of a grid that varies one, else None.

    Such grids (learning-rate checks) are neither allocation curves nor memory scaling: their
    rows must not be pooled into a budget's allocation curve.
    """
    if "sweep_key" not in df.columns:
        return None
    keys = df["sweep_key"].dropna().astype(str)
    keys = keys[keys.str.startswith("train.")]
    return str(keys.iloc[0]) if len(keys) else None


def is_allocation_grid(df: pd.DataFrame) -> bool:
    """True for a grid whose points are rho values (not memory sizes, not training settings)."""
    return setting_sweep_key(df) is None and not is_memory_grid(df)


def is_memory_grid(df: pd.DataFrame) -> bool:
    """True when a grid varies Engram memory size rather than the allocation rho.

    Such grids name an Engram or OverEncoding key in ``sweep_key`` (e.g. "engram.table_sizes")
    and their memory size varies: a sweep of another Engram switch (the ablations' "engram.gate")
    is not one. Older tables without sweep_key count as memory grids when rho is constant but
    engram_slots varies.
    """
    if "sweep_key" in df.columns:
        keys = df["sweep_key"].dropna().astype(str)
        if len(keys) and (keys != "rho").any() and keys.str.contains("engram|overencoding").any():
            return memory_column(df) is not None
        if len(keys) and (keys == "rho").all():
            return False
    return df["rho"].nunique() <= 1 and memory_column(df) is not None


def memory_column(df: pd.DataFrame) -> str | None:
    """The column measuring n-gram memory size that varies in ``df`` (Engram slots preferred,
    then Engram or OverEncoding table parameters)."""
    for col in ("engram_slots", "params_engram_tables", "params_overencoding_tables"):
        if col in df.columns and df.loc[df[col] > 0, col].nunique() >= 2:
            return col
    return None


# Grids that change a budget's model or training (the paper's ablations, the Muon curve, memory
# scaling, the mechanism diagnostics' arms: another corpus, batch or rate; the candidate regimes
# built on a ladder budget: another Engram shape) are named by these prefixes (sweeps/grids/). They share the budget's ``budget`` column but are other curves: they
# are never pooled into the budget's allocation curve.
VARIANT_PREFIXES = ("ablation-", "muon-", "memory-", "diag-", "cand-")
# A budget's grid rerun with another MoE dispatch (``ladder2k-2e12-dropless``) is a variant too: its
# runs answer a different question and must not pool into the budget's curve or its ladder.
VARIANT_SUFFIXES = ("-dropless",)


def is_variant_grid(grid: str) -> bool:
    """True for a grid named as a variant of its budget (``muon-cpu-1e12``,
    ``ablation-cpu-1e12-conv``): analysed beside the budget's curve (analysis.paper), never
    pooled into it; so is a rerun with another MoE dispatch (``ladder2k-2e12-dropless``). Any
    other allocation grid of a budget (``cpu-small-seeds``) pools with it."""
    return str(grid).startswith(VARIANT_PREFIXES) or str(grid).endswith(VARIANT_SUFFIXES)


def budgets_by_compute(df: pd.DataFrame) -> list:
    """Budget names from the smallest median compute to the largest (by name without compute)."""
    if "compute" not in df.columns:
        return sorted(df["budget"].unique())
    med = df.groupby("budget")["compute"].median()
    return sorted(df["budget"].unique(), key=lambda b: (med.get(b, 0.0), str(b)))
