"""Result files of a grid: ``runs.csv`` (one row per trial), ``curves/<trial_id>.csv`` and a
``README.md`` with provenance. Everything is written atomically (tmp file + ``os.replace``).

No Ray and no JAX here: rows are built from each trial's record (``engram_jax.train.run_trial``,
delivered with the trial's last Tune result), from a finished row of an earlier ``runs.csv``, or,
for a trial that did not finish, from its spec.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from sweeps.grid import Grid, TrialSpec

LEAD_COLUMNS = ["grid", "trial_id", "status", "error", "rho", "rho_actual", "seed", "budget",
                "preset", "sweep_key", "sweep_value"]
CURVE_COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr"]
SUMMARY_COLUMNS = ["trial_id", "rho", "seed", "val_loss", "tokens_per_s", "epochs", "status"]


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def spec_row(spec: TrialSpec) -> dict:
    """What is known about a trial without running it: its meta, config and counts."""
    cfg = spec.model
    counts = cfg.param_counts()
    return {
        **spec.meta,
        "config_json": cfg.to_json(), "config_hash": cfg.hash(),
        **{f"params_{k}": v for k, v in counts.items()},
        "n_routed": cfg.moe.n_routed if cfg.moe else 0,
        "top_k": cfg.moe.top_k if cfg.moe else 0,
        "engram_slots": sum(cfg.engram.rows().values()) if cfg.engram else 0,
        "engram_layers": ",".join(map(str, cfg.engram.layer_ids)) if cfg.engram else "",
        "flops_per_token": cfg.flops_per_token(),
        "steps": spec.train.steps, "batch_size": spec.train.batch_size, "seq_len": cfg.seq_len,
        "corpus": spec.corpus,
        **({"tokenizer": spec.tokenizer} if getattr(spec, "tokenizer", None) else {}),
    }


def build_rows(grid: Grid, records: dict[str, dict], errors: dict[str, str], ray_version: str,
               *, kept: dict[str, dict] | None = None) -> list[dict]:
    """One row per trial, in grid order.

    Args:
      records: trial id -> the record of a trial that finished in this run.
      errors: trial id -> the last line of a failed trial's error.
      kept: trial id -> a finished row read from an earlier ``runs.csv``; written back unchanged.
    """
    kept = kept or {}
    rows = []
    for spec in grid.trials:
        if spec.trial_id in kept:
            rows.append(dict(kept[spec.trial_id]))
            continue
        rec = records.get(spec.trial_id)
        if rec is not None and rec.get("status") == "ok":
            row = {**spec.meta, "status": "ok", "error": "", **rec}
            for k, v in spec_row(spec).items():
                row.setdefault(k, v)
        else:
            err = errors.get(spec.trial_id, "not finished (interrupted); rerun the same command to resume")
            row = {**spec_row(spec), "status": "error" if spec.trial_id in errors else "incomplete",
                   "error": err}
        row["ray_version"] = ray_version
        rows.append(row)
    return rows


def to_csv(rows: list[dict], lead: list[str]) -> str:
    cols = list(lead)
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})
    return buf.getvalue()


def write_curves(out: Path, trial_id: str, metrics_jsonl: str) -> bool:
    """``curves/<trial_id>.csv`` from a trial's ``metrics.jsonl`` text (one JSON object a line)."""
    rows = [json.loads(line) for line in metrics_jsonl.splitlines() if line.strip()]
    if not rows:
        return False
    atomic_write(out / "curves" / f"{trial_id}.csv", to_csv(
        [{k: r.get(k) for k in CURVE_COLUMNS} for r in rows], CURVE_COLUMNS))
    return True


def summary_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for r in rows:
        ep = r.get("epochs")
        cells = [
            r["trial_id"], _num(r.get("rho"), ".2f"), str(r.get("seed")), _num(r.get("val_loss"), ".4f"),
            _num(r.get("tokens_per_s"), ".0f"),
            (_num(ep, ".3g") + (" (> 1: repeats data!)" if _num(ep, "g") != "-" and float(ep) > 1
                                else "")),
            _status(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _status(row: dict) -> str:
    """``ok``, ``incomplete``, or ``error (<kind>)``: out of memory, TrainingDiverged, ..."""
    from sweeps.failures import error_kind

    if row["status"] == "error" and row.get("error"):
        return f"error ({error_kind(str(row['error']))})"
    return str(row["status"])


def write_readme(out: Path, grid: Grid, rows: list[dict], command: str, ray_version: str) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    dev = sorted({str(r.get("device_kind")) for r in ok}) or ["(no finished trial)"]
    commits = sorted({str(r.get("git_commit")) for r in ok}) or [_git_commit()]
    hosts = sorted({str(r["host_cpu"]) for r in ok if r.get("host_cpu")})
    versions = {
        "python": platform.python_version(), "ray": ray_version,
        **{p: _version(p) for p in ("jax", "flax", "optax", "numpy", "tokenizers")},
    }
    text = "\n".join([
        f"# Grid `{grid.name}`",
        "",
        f"Grid file: `{grid.path}`; budget: {grid.budget or '-'}; base preset: {grid.preset}; "
        f"corpus: {grid.corpus}.",
        "",
        "## Provenance",
        f"- command: `{command}`",
        f"- git commit: {', '.join(commits)}",
        f"- device kind: {', '.join(dev)}",
        *([f"- host CPU: {'; '.join(hosts)}"] if hosts else []),
        f"- written: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- trials: {len(ok)} of {len(rows)} finished",
        "",
        "## Summary",
        summary_table(rows),
        "",
        *[f"- `{r['trial_id']}` {r['status']}: {r.get('error')}" for r in rows
          if r["status"] == "error"],
        *([""] if any(r["status"] == "error" for r in rows) else []),
        "`runs.csv` has one row per trial (full config JSON, parameter and FLOP counts, losses, "
        "throughput, versions); `curves/<trial_id>.csv` the logged metrics of each trial.",
        "",
    ])
    atomic_write(out / "README.md", text)


def _num(v, fmt: str) -> str:
    """A number formatted, "-" for none. Rows kept from a committed runs.csv hold strings."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return "-"
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
        return "-"
    return format(v, fmt)


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    return " ".join([Path(sys.executable).name, "-m", "sweeps.run", *sys.argv[1:]])
