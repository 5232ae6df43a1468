"""The Ray Tune trainable: one trial = one call of ``engram_jax.train.run_trial``.

Runs inside a Ray worker. ``JAX_PLATFORMS`` is set from the trial spec before JAX is first
imported (the driver never imports JAX). Each trial trains in its own stable ``out_dir``, so after
an interruption the trial resumes from its own orbax checkpoint there, and a finished trial returns
its stored record at once instead of training again. The Tune checkpoint reported at each
evaluation is only a marker (step, out_dir); the model state lives in ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path


CPU_SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def spec_to_config(spec) -> dict:
    """The JSON-able trial description that Tune's param_space carries (see ``run.py``)."""
    from engram_jax.config import train_dict

    return {
        "trial_id": spec.trial_id,
        "model": spec.model.to_dict(),
        "train": train_dict(spec.train),
        "corpus": spec.corpus,
        "meta": spec.meta,
    }


def train_trial(config: dict) -> None:
    """Tune function trainable. ``config["trial"]`` is a ``spec_to_config`` dict plus out_dir and
    platform ("cpu" or "cuda")."""
    t = config["trial"]
    os.environ["JAX_PLATFORMS"] = t["platform"]
    if t["platform"] == "cpu" and t.get("cpus") == 1 and "XLA_FLAGS" not in os.environ:
        # One CPU per trial: XLA's CPU backend would otherwise start a thread per core in every
        # trial; trials side by side ran faster single-threaded (results/bench/README.md).
        os.environ["XLA_FLAGS"] = CPU_SINGLE_THREAD_FLAGS
    logging.getLogger("ray").setLevel(logging.WARNING)  # no line per saved Tune checkpoint
    from ray import tune

    from engram_jax.config import ModelConfig, TrainConfig
    from engram_jax.train import run_trial

    out_dir = Path(t["out_dir"])
    prev = tune.get_checkpoint()
    if prev is not None:
        with prev.as_directory() as d:
            marker = json.loads((Path(d) / "marker.json").read_text())
        print(f"[{t['trial_id']}] resuming after step {marker['step']} from {out_dir}", flush=True)

    def report(metrics: dict) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if "val_loss" not in metrics:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:  # an evaluation step: orbax saved just now
            (Path(d) / "marker.json").write_text(json.dumps({"step": metrics["step"], "out_dir": str(out_dir)}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    record = run_trial(
        ModelConfig.from_dict(t["model"]), TrainConfig(**t["train"]), corpus=t["corpus"],
        out_dir=out_dir, report=report, progress=False, meta=t["meta"],
    )
    final = {k: record[k] for k in ("val_loss", "best_val_loss", "train_loss", "epochs", "steps",
                                    "tokens_seen") if isinstance(record.get(k), (int, float))}
    if isinstance(record.get("tokens_per_s"), (int, float)):
        final["tokens_per_s"] = record["tokens_per_s"]
    final["step"], final["tokens"], final["done_record"] = record["steps"], record["tokens_seen"], 1
    # The record and the metric curve travel with the last result, so the driver writes the
    # trial's row and curve as soon as it finishes, from what Tune delivered.
    final["record_json"] = json.dumps(record)
    metrics = out_dir / "metrics.jsonl"
    final["metrics_jsonl"] = metrics.read_text() if metrics.exists() else ""
    tune.report(final)
