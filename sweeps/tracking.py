"""Experiment tracking of a grid's trials: TensorBoard, MLflow or Weights & Biases, through Ray
Tune's own logger callbacks (``--tracking``; ``make sweep TRACKING=...``; default tensorboard).

Each trial is one run, named by its trial id, with the trial's parameters (``params``: trial id,
grid, rho nominal and realised, seed, budget, preset, swept key and value, model config hash,
steps, batch size, learning rate, sequence length, corpus) and every metric it logs (train and
validation loss, learning rate, tokens/s, gradient norm, MoE load, and the final record's
numbers: best validation loss, epochs, tokens seen), against the training step. The callbacks
run in the driver (``trackers.py``); the trials know nothing of them.

- ``tensorboard``: ``ray.tune.logger.TBXLoggerCallback``. Event files in each trial's directory
  of the Tune experiment (``<storage>/<grid>/<trial_id>/events.out.tfevents.*``; by default
  ``results/<grid>/ray/<grid>/``), copied there by Tune with the experiment's state as results
  arrive. Scalars under ``ray/tune/``; the parameters on TensorBoard's HParams dashboard from the
  trial's start, its end (success or failure) when it ends. A later run that continues the grid
  keeps these files (``Storage.prepare_run``), so a resumed trial stays one TensorBoard run.
- ``mlflow``: ``ray.air.integrations.mlflow.MLflowLoggerCallback``. An MLflow experiment named
  after the grid in ``$MLFLOW_TRACKING_URI`` (a tracking server, a database), else in a local
  file store, ``results/<grid>/mlflow``. Parameters as run params (and trial id, grid and config
  hash as tags); a trial continued by a later run of the grid logs into its unfinished run. Runs
  end FINISHED, or FAILED with the error in the tag ``error``.
- ``wandb``: ``ray.air.integrations.wandb.WandbLoggerCallback``. Project ``$WANDB_PROJECT``
  (default ``engram-suite``), group: the grid; W&B's local files in ``results/<grid>/wandb/``
  (``$WANDB_DIR/wandb/`` where set). Needs the ``wandb`` package and a W&B that is configured:
  an API key (``WANDB_API_KEY``, ``wandb login``) or ``WANDB_MODE=offline`` (the runs stay on
  disk; ``wandb sync`` uploads them later). Both are checked before any work (exit 2).

Several at once: ``--tracking tensorboard,mlflow``. ``none``: only ``runs.csv``, ``curves/`` and
Tune's own ``result.json``/``progress.csv`` per trial.

No Ray here (the driver validates its arguments before Ray starts).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path

BACKENDS = ("tensorboard", "mlflow", "wandb")
DEFAULT = "tensorboard"
WANDB_PROJECT = "engram-suite"
_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}

# What a Tune result holds besides the trial's metrics: Tune's bookkeeping and the trainable's
# flags and payloads (the record and curve it hands the driver, a final error).
NOT_METRICS = frozenset({
    "training_iteration", "timesteps_total", "timesteps_this_iter", "timesteps_since_restore",
    "episodes_total", "episodes_this_iter", "time_this_iter_s", "time_total_s",
    "time_since_restore", "iterations_since_restore", "timestamp", "date", "pid", "hostname",
    "node_ip", "trial_id", "experiment_id", "experiment_tag", "config", "done",
    "should_checkpoint", "checkpoint_dir_name",
    "done_record", "record_json", "metrics_jsonl", "error",
})


class TrackingError(ValueError):
    """A ``--tracking`` setting that cannot work here; raised before any work."""


def parse(setting: str | None) -> tuple[str, ...]:
    """``"tensorboard"``, ``"mlflow,wandb"``, ``"none"`` -> the backends, in the order given."""
    setting = (setting if setting is not None else DEFAULT).strip().lower()
    if setting in ("", "none", "off"):
        return ()
    names = [s.strip() for s in setting.split(",") if s.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise TrackingError(f"--tracking {setting!r}: expected none or one or more of "
                            f"{', '.join(BACKENDS)} (comma-separated)")
    return tuple(dict.fromkeys(names))


def check(backends: tuple[str, ...], environ: Mapping[str, str] = os.environ) -> None:
    """Raise TrackingError where a backend's package is missing, or W&B is not configured."""
    for b in backends:
        pkg = _PACKAGES[b]
        if importlib.util.find_spec(pkg) is None:
            raise TrackingError(
                f"--tracking {b} needs the {pkg} package, which is not installed: "
                f"`.venv/bin/pip install -e '.[tracking]'` (make setup installs it) or "
                f"`pip install {pkg}`; or choose another backend (--tracking none for none)")
    if "wandb" in backends:
        _check_wandb(environ)


def _check_wandb(environ: Mapping[str, str]) -> None:
    mode = environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun") or environ.get("WANDB_API_KEY"):
        return
    import wandb

    try:
        logged_in = wandb.login(prompt=False, verify=False)  # reads ~/.netrc; no network
    except Exception as e:  # noqa: BLE001 (any failure here means: not usable)
        raise TrackingError(f"--tracking wandb: W&B is not usable here ({e})") from None
    if not logged_in:
        raise TrackingError(
            "--tracking wandb: W&B is not configured: set WANDB_API_KEY or run `wandb login`, or "
            "set WANDB_MODE=offline to keep the runs on disk (`wandb sync` uploads them later)")


def params(spec) -> dict[str, str | int | float]:
    """The parameters a trial's run is logged with (``sweeps.grid.TrialSpec``); no None values."""
    m = spec.meta
    out = {
        "trial_id": spec.trial_id, "grid": m.get("grid"), "rho": m.get("rho"),
        "rho_actual": m.get("rho_actual"), "seed": spec.train.seed, "budget": m.get("budget"),
        "preset": m.get("preset"), "sweep_key": m.get("sweep_key"),
        "sweep_value": m.get("sweep_value"), "config_hash": spec.model.hash(),
        "steps": spec.train.steps, "batch_size": spec.train.batch_size, "lr": spec.train.lr,
        "seq_len": spec.model.seq_len, "corpus": spec.corpus,
    }
    return {k: v for k, v in out.items() if v is not None and v != ""}


def trial_metrics(result: Mapping) -> dict[str, float]:
    """The trial's own numbers in a Tune result (finite ints and floats, no bookkeeping)."""
    return {k: v for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def mlflow_uri(out: Path, environ: Mapping[str, str] = os.environ) -> str:
    """``$MLFLOW_TRACKING_URI``, else the grid's local file store ``<out>/mlflow``."""
    return environ.get("MLFLOW_TRACKING_URI") or (out / "mlflow").absolute().as_uri()


def callbacks(backends: tuple[str, ...], grid_name: str, out: Path,
              params_by_trial: dict[str, dict]) -> list:
    """Ray Tune callbacks for ``backends`` (imports Ray)."""
    from sweeps import trackers

    made = []
    for b in backends:
        if b == "tensorboard":
            made.append(trackers.TensorBoardTracking(params_by_trial))
        elif b == "mlflow":
            uri = mlflow_uri(out)
            if uri.startswith("file:"):
                # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            made.append(trackers.MLflowTracking(
                params_by_trial, tracking_uri=uri,
                experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or grid_name))
        elif b == "wandb":
            made.append(trackers.WandbTracking(
                params_by_trial, project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
                group=os.environ.get("WANDB_RUN_GROUP") or grid_name,
                # W&B writes into <dir>/wandb/; $WANDB_DIR, where set, wins by itself
                **({} if os.environ.get("WANDB_DIR") else {"dir": str(out)})))
    return made


def where(backends: tuple[str, ...], grid_name: str, out: Path, storage_uri: str) -> list[str]:
    """One line per backend: where to watch the grid."""
    lines = []
    for b in backends:
        if b == "tensorboard":
            lines.append(f"TensorBoard: tensorboard --logdir {storage_uri}/{grid_name}")
        elif b == "mlflow":
            uri = mlflow_uri(out)
            lines.append(f"MLflow: experiment {grid_name!r} in {uri}"
                         + (f" (mlflow ui --backend-store-uri {uri})" if uri.startswith("file:")
                            else ""))
        elif b == "wandb":
            local = f"{os.environ.get('WANDB_DIR') or out}/wandb"
            lines.append(f"W&B: project {os.environ.get('WANDB_PROJECT') or WANDB_PROJECT!r}, "
                         f"group {grid_name!r}, local files in {local}"
                         + (f" (offline: wandb sync {local}/offline-run-*)"
                            if os.environ.get("WANDB_MODE", "").lower() == "offline" else ""))
    return lines
