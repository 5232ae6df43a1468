"""Tune callbacks of the driver: ``Progress`` (one line per logged step, per finished and per
failed trial) and ``RowWriter`` (the grid's result files, rewritten as each trial finishes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ray import tune

from sweeps.grid import Grid
from sweeps.results import LEAD_COLUMNS, atomic_write, build_rows, command_line, to_csv, write_curves, write_readme


class Progress(tune.Callback):
    """Prints ``[rho0.80-s0] step 30  train 4.512  val 4.498  15.3k tok/s`` lines, and a line each
    time a trial starts, is restarted by Tune, finishes or fails."""

    def on_trial_start(self, iteration, trials, trial, **info):
        tid = trial.config["trial"]["trial_id"]
        n = trial.num_failures
        print(f"[{tid}] started" + (f" again (after failure {n})" if n else ""), flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Tune restarts a trial whose worker or node was lost, or that raised a transient error
        # (sweeps.failures); a final error ends the trial without this.
        tid = trial.config["trial"]["trial_id"]
        limit = trial.max_failures
        print(f"[{tid}] lost its worker or hit a transient error (failure "
              f"{trial.num_failures}{f' of at most {limit}' if limit >= 0 else ''}"
              "); Tune restarts it from its last checkpoint", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.config["trial"]["trial_id"]
        if result.get("error"):  # a final error the trial reported (not retried: sweeps.failures)
            print(f"[{tid}] FAILED: {result['error']}", flush=True)
            return
        if result.get("done_record"):
            ep = result.get("epochs")
            line = (f"[{tid}] done: val {_f(result.get('val_loss'))} (best {_f(result.get('best_val_loss'))})"
                    f", {_f(result.get('tokens_per_s'), '.0f')} tok/s, epochs {_f(ep, '.3g')}")
            print(line, flush=True)
            if isinstance(ep, (int, float)) and ep > 1:
                print(f"WARNING [{tid}]: the token budget exceeds the training split ({ep:.2f} epochs)",
                      file=sys.stderr, flush=True)
            return
        parts = [f"[{tid}] step {result.get('step')}"]
        if "train_loss" in result:
            parts.append(f"train {_f(result['train_loss'])}")
        if "val_loss" in result:
            parts.append(f"val {_f(result['val_loss'])}")
        if "tokens_per_s" in result:
            parts.append(f"{result['tokens_per_s'] / 1e3:.1f}k tok/s")
        print("  ".join(parts), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{trial.config['trial']['trial_id']}] FAILED (see the summary)", flush=True)


class RowWriter(tune.Callback):
    """Writes ``runs.csv``, ``curves/`` and ``README.md`` again each time a trial finishes.

    The trial's record and metric curve arrive with its last Tune result (``trainable.py``), so
    nothing is read from a worker's disk. Finished rows carried over from an earlier run
    (``kept``, read from ``runs.csv``) are written back exactly as they were read.
    """

    def __init__(self, grid: Grid, out: Path, kept: dict[str, dict], ray_version: str):
        self.grid, self.out, self.kept, self.ray_version = grid, out, kept, ray_version
        self.records: dict[str, dict] = {}
        self.errors: dict[str, str] = {}

    def on_trial_complete(self, iteration, trials, trial, **info):
        res = trial.last_result or {}
        tid = trial.config["trial"]["trial_id"]
        if res.get("error"):
            self.errors[tid] = res["error"]
        elif res.get("record_json"):
            self.records[tid] = json.loads(res["record_json"])
            write_curves(self.out, tid, res.get("metrics_jsonl", ""))
        self.write()

    def write(self) -> list[dict]:
        """Write the result files atomically; returns the rows (grid order)."""
        rows = build_rows(self.grid, self.records, self.errors, self.ray_version, kept=self.kept)
        atomic_write(self.out / "runs.csv", to_csv(rows, LEAD_COLUMNS))
        write_readme(self.out, self.grid, rows, command_line(), self.ray_version)
        return rows


def _f(v, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"
