"""Command line: ``python -m analysis fit results/<grid> ...``, ``python -m analysis plots`` and
``python -m analysis readme [--check]``.

Exit status: 0 on success (also when there are no grids yet, with a note), 2 on a missing or
malformed results table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Fits are tiny; a BLAS thread pool only spin-waits on a busy small machine. Set before numpy.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if sys.argv[1:2] == ["plots"]:  # the same figures on every x86-64 CPU (docs/design.md section 10)
    from analysis._blas import pin_kernels

    pin_kernels()

import pandas as pd  # noqa: E402

from analysis import load  # noqa: E402
from analysis.fit import fit_optimum_vs_compute  # noqa: E402
from analysis.report import allocation_table, est, memory_fit, num  # noqa: E402


def _print_grid(runs: pd.DataFrame, name: str, n_boot: int, level: float) -> None:
    dev = ",".join(sorted(runs.get("device_kind", pd.Series(["?"])).dropna().astype(str).unique()))
    print(f"\n== {name}  ({len(runs)} ok runs, device {dev or '?'})")
    key = load.setting_sweep_key(runs)
    if key is not None:
        field = key.split(".", 1)[1]
        col = field if field in runs.columns else "sweep_value"
        print(f"{key} sweep (not an allocation curve): validation loss per value")
        with pd.option_context("display.width", 200):
            print(runs[["rho", "seed", col, "val_loss"]].sort_values(["rho", col]).to_string(index=False))
        return
    if load.is_memory_grid(runs):
        col, f = memory_fit(runs, n_boot=min(n_boot, 500), level=level)
        print(f"memory scaling: L = E + A x^-alpha over {col} ({f['n_points']} runs)")
        if f["ok"]:
            print(f"  alpha = {est(f['alpha'], *f['alpha_ci'])}   E = {est(f['E'], *f['E_ci'])}"
                  f"   A = {f['A']:.4g}   ({f['reason']})")
        else:
            print(f"  no fit: {f['reason']}")
        return
    with pd.option_context("display.width", 200, "display.max_colwidth", 70):
        print(allocation_table(runs, n_boot=n_boot, level=level).to_string(index=False))
    if runs["budget"].nunique() >= 2:
        o = fit_optimum_vs_compute(runs, n_boot=min(n_boot, 300), level=level)
        if o["ok"]:
            print(f"rho* vs compute: rho* = {o['a']:.3f} + {est(o['b'], *o['b_ci'])} log10(C)  "
                  f"(slope se {num(o['b_se'], '.3f')}, {level:.0%} interval in brackets; "
                  f"{o['reason']})")
        else:
            print(f"rho* vs compute: {o['reason']}")


def cmd_fit(args: argparse.Namespace) -> int:
    for path in args.grids:
        runs = load.load_runs(path)
        name = Path(path).name if Path(path).is_dir() else Path(path).parent.name
        if runs.empty:
            print(f"\n== {name}: no runs with status ok")
            continue
        _print_grid(runs, name, args.n_boot, args.level)
    # Grids that share a budget (e.g. seed replicates run as a grid of their own) are also fitted
    # pooled: that is the fit to read, with every seed of every rho.
    if len(args.grids) > 1:
        alloc = [r for r in (load.load_runs(p) for p in args.grids)
                 if not r.empty and load.is_allocation_grid(r)]
        if alloc:
            pooled = pd.concat(alloc, ignore_index=True)
            shared = [b for b, d in pooled.groupby("budget") if d["grid"].nunique() > 1]
            if shared:
                sel = pooled[pooled["budget"].isin(shared)]
                _print_grid(sel, "pooled: " + ", ".join(sorted(sel["grid"].unique())),
                            args.n_boot, args.level)
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # figures are files here; never need a display
    from analysis import plots

    grids = load.find_grids(args.results)
    if not grids:
        print(f"no results/<grid>/runs.csv under {args.results!s} yet: nothing to plot "
              "(run `make sweep` first)")
        return 0
    try:
        written = plots.make_all(args.results, args.out, n_boot=args.n_boot, only=args.only)
    except plots.NoSuchFigure as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    print(f"{len(written)} files from {len(grids)} grid(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="print the fits of one or more grids")
    f.add_argument("grids", nargs="+", help="results/<grid> directories or runs.csv files")
    f.add_argument("--n-boot", type=int, default=1000)
    f.add_argument("--level", type=float, default=0.95)
    f.set_defaults(func=cmd_fit)
    p = sub.add_parser("plots", help="regenerate every figure from every results/<grid>")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default=None, help="default: <results>/figures")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="draw only the figures whose stem matches this shell pattern "
                        "(repeatable), e.g. --only ladder2k --only 'ladder2k-2e13_*'")
    p.set_defaults(func=cmd_plots)
    sub.add_parser("readme", add_help=False,
                   help="rewrite (or --check) the README's generated results tables; "
                        "`python -m analysis readme --help` for its options")
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "readme":
        from analysis import readme

        return readme.main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except load.ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
