"""How much the capacity dispatch of committed grids dropped: retrain committed trials and read
the drop rate their steps log.

Every committed grid ran ``moe.dispatch = "capacity"`` (capacity factor 1.25: each expert holds
ceil(1.25 * tokens * top_k / E) assignments of a batch, the rest are dropped), which logged no drop
rate. This rebuilds trials from the grid file, checks each against its committed row (config
hash), trains it again (the program is the committed one; float rounding of later changes
aside, the losses reproduce within seed noise) and writes, per trial, the drop rate of the
logged training steps (mean, first, last, per layer), the final evaluation's and the val loss
beside the committed one. ``--steps-fraction`` trains a prefix of the run (its schedule kept),
for a cheaper look at the early steps.

    python -m bench.droprate --grid cpu-1e12 --trials rho1.00-s0,rho0.80-s0,rho0.40-s0
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["grid", "trial_id", "rho", "dispatch", "capacity_factor", "steps_run", "steps",
           "drop_rate_train_mean", "drop_rate_train_quarters", "drop_rate_train_first",
           "drop_rate_train_last",
           "drop_rate_train_last_per_layer", "drop_rate_val", "drop_rate_val_per_layer",
           "max_load_last", "val_loss", "val_loss_committed", "corpus", "corpus_fingerprint",
           "corpus_fingerprint_committed"]


def committed_rows(grid: str, results: Path) -> dict[str, dict]:
    with (results / grid / "runs.csv").open() as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def measure(grid: str, trial_ids: list[str], *, results: Path, steps_fraction: float = 1.0,
            progress: bool = False) -> list[dict]:
    from engram_jax.train import run_trial
    from sweeps.grid import load_grid

    g = load_grid(ROOT / "sweeps" / "grids" / f"{grid}.yaml")
    specs = {t.trial_id: t for t in g.trials}
    committed = committed_rows(grid, results)
    out = []
    for tid in trial_ids:
        spec, row = specs[tid], committed[tid]
        if spec.model.hash() != row["config_hash"]:
            raise ValueError(f"{grid}/{tid}: the grid file builds config {spec.model.hash()}, "
                             f"the committed row has {row['config_hash']}")
        tcfg = spec.train
        steps_run = max(1, round(tcfg.steps * steps_fraction))
        if steps_run < tcfg.steps:  # a prefix: stop early, the schedule of the full run kept
            tcfg = dataclasses.replace(tcfg, eval_every=min(tcfg.eval_every, steps_run))
        with tempfile.TemporaryDirectory(prefix="droprate-") as d:
            rec = _train(run_trial, spec, tcfg, Path(d), steps_run, progress)
            rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in rows if r.get("train_loss") is not None and "moe_drop_rate" in r]
        layers = list(spec.model.moe_layer_ids)
        last = logged[-1]
        evals = [r for r in rows if "val_moe_drop_rate" in r]
        out.append({
            "grid": grid, "trial_id": tid, "rho": row["rho"],
            "dispatch": spec.model.moe.dispatch, "capacity_factor": spec.model.moe.capacity_factor,
            "steps_run": steps_run, "steps": spec.train.steps,
            "drop_rate_train_mean": sum(r["moe_drop_rate"] for r in logged) / len(logged),
            "drop_rate_train_quarters": " ".join(f"{q:.4f}" for q in _quarters(logged)),
            "drop_rate_train_first": logged[0]["moe_drop_rate"],
            "drop_rate_train_last": last["moe_drop_rate"],
            "drop_rate_train_last_per_layer": " ".join(
                f"{last[f'moe_drop_rate_l{lid}']:.4f}" for lid in layers),
            "drop_rate_val": rec.get("val_moe_drop_rate", evals[-1]["val_moe_drop_rate"] if evals else ""),
            "drop_rate_val_per_layer": " ".join(
                f"{evals[-1][f'val_moe_drop_rate_l{lid}']:.4f}" for lid in layers) if evals else "",
            "max_load_last": last.get("max_load"),
            "val_loss": rec["val_loss"] if steps_run == spec.train.steps else "",
            "val_loss_committed": row["val_loss"], "corpus": spec.corpus,
            "corpus_fingerprint": rec["corpus_fingerprint"],
            "corpus_fingerprint_committed": row.get("corpus_fingerprint", ""),
        })
        print(json.dumps(out[-1]), flush=True)
    return out


def _quarters(logged: list[dict]) -> list[float]:
    """Mean drop rate of the logged steps in each quarter of the run."""
    n = len(logged)
    parts = [logged[i * n // 4:(i + 1) * n // 4] for i in range(4)]
    return [sum(r["moe_drop_rate"] for r in p) / len(p) for p in parts if p]


def _train(run_trial, spec, tcfg, out_dir: Path, steps_run: int, progress: bool) -> dict:
    """The trial's record, or for a prefix the record-like fields of its last evaluation."""
    class Stop(Exception):
        pass

    def report(m):
        if steps_run < tcfg.steps and m.get("step", 0) >= steps_run and m.get("val_loss") is not None:
            raise Stop

    try:
        return run_trial(spec.model, tcfg, corpus=spec.corpus, out_dir=out_dir, report=report,
                         progress=progress, meta=spec.meta)
    except Stop:
        from engram_jax import data as data_lib

        fp = data_lib.prepare(spec.corpus, spec.model.vocab_size, progress=False).fingerprint
        return {"corpus_fingerprint": fp}


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.droprate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", required=True, help="a committed grid (results/<grid>/runs.csv)")
    ap.add_argument("--trials", required=True, help="comma-separated trial ids")
    ap.add_argument("--steps-fraction", type=float, default=1.0)
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", default="results/bench/droprate", help="writes <out>/<grid>.csv")
    a = ap.parse_args(argv)
    from engram_jax import host_malloc

    host_malloc.apply_in_process()
    rows = measure(a.grid, a.trials.split(","), results=Path(a.results),
                   steps_fraction=a.steps_fraction)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{a.grid}.csv"
    old = []
    if path.exists():
        done = {r["trial_id"] for r in rows}
        with path.open() as f:
            old = [r for r in csv.DictReader(f) if r["trial_id"] not in done]
    path.write_text(to_csv(old + rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
