"""The Ray Tune trainable: one trial = one call of ``engram_jax.train.run_trial``.

Runs inside a Ray worker, on whichever node Ray chose. ``JAX_PLATFORMS`` is set from the trial
spec before JAX is first imported (the driver never imports JAX). The trial trains in a scratch
directory on its node; at each evaluation the orbax state, ``metrics.jsonl`` and ``config.json``
are copied into a Tune checkpoint, which Ray persists to the experiment's storage (``--storage``:
a path every node sees, or a URI such as ``s3://...``). A trial that Ray restarts (its node died,
``FailureConfig``) restores that checkpoint with ``tune.get_checkpoint()``; a trial left unfinished
by an earlier run of the grid restores the checkpoint the driver carried over for it
(``resume_from``). The final result carries the record and the metric curve to the driver, and
the final checkpoint holds them too, so nothing is ever read from a worker's disk. An error that
would happen again (out of memory, divergence, any deterministic failure: ``failures.py``) ends
the trial at once, its last result naming it; only transient errors are raised to Tune, which
restarts the trial.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

MANIFEST = "manifest.json"  # written into every checkpoint: its step and the size of each file


def spec_to_config(spec) -> dict:
    """The JSON-able trial description that Tune's param_space carries (see ``run.py``)."""
    from engram_jax.config import train_dict

    out = {
        "trial_id": spec.trial_id,
        "model": spec.model.to_dict(),
        "train": train_dict(spec.train),
        "corpus": spec.corpus,
        "meta": spec.meta,
    }
    # A user's tokenizer only when there is one: grids on the own BPE keep their grid.json.
    for k in ("tokenizer", "eos_token"):
        if getattr(spec, k, None) is not None:
            out[k] = getattr(spec, k)
    return out


def pack_checkpoint(src: Path, dst: Path, step: int | None) -> None:
    """Copy a trial's resumable state from ``src`` (its out_dir) into ``dst``: ``config.json``,
    ``metrics.jsonl``, ``record.json`` if finished, and the orbax checkpoint (with the offloaded
    host tables) of ``step``. ``manifest.json`` lists every file with its size, so a checkpoint
    cut short while being persisted is recognised as incomplete."""
    files = [n for n in ("config.json", "metrics.jsonl", "record.json") if (src / n).exists()]
    if step is not None:
        files += [str(p.relative_to(src)) for p in sorted((src / "ckpt" / str(step)).rglob("*"))
                  if p.is_file()]
        files += [f"ckpt/{p.name}" for p in (src / "ckpt").iterdir() if p.is_file()]
        ht = src / "host_tables" / f"{step}.npz"
        if ht.exists():
            files.append(f"host_tables/{step}.npz")
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, dst / rel)
        except OSError:
            shutil.copy2(src / rel, dst / rel)
    manifest = {"step": step, "files": {rel: (dst / rel).stat().st_size for rel in files}}
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def unpack_checkpoint(checkpoint, out_dir: Path) -> dict:
    """Restore a Tune checkpoint made by ``pack_checkpoint`` into ``out_dir``; returns its manifest."""
    checkpoint.to_directory(str(out_dir))
    manifest = json.loads((out_dir / MANIFEST).read_text())
    bad = [rel for rel, size in manifest["files"].items()
           if not (out_dir / rel).exists() or (out_dir / rel).stat().st_size != size]
    if bad:
        raise RuntimeError(f"checkpoint {checkpoint.path} is incomplete (missing or short: "
                           f"{', '.join(bad[:5])})")
    return manifest


def apply_jax_env(env: dict[str, str], environ=os.environ) -> None:
    """Set JAX's allocator variables ``env`` before JAX starts. Where it sets the memory fraction,
    a fraction under JAX's other name from the node's environment is dropped (JAX refuses both)."""
    from engram_jax.memory import FRACTION_VARS

    if any(k in env for k in FRACTION_VARS):
        for k in FRACTION_VARS:
            environ.pop(k, None)
    environ.update(env)


def cpu_devices_for_mesh(mesh, environ=os.environ) -> None:
    """A CPU trial over a mesh of N devices gets N host devices from XLA (set before JAX
    starts; a device count already in ``XLA_FLAGS`` is replaced)."""
    from engram_jax.parallel.mesh import MeshShape

    n = MeshShape.parse(mesh).size
    if n == 1:
        return
    flags = [f for f in environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def train_trial(config: dict) -> None:
    """Tune function trainable. ``config["trial"]`` is a ``spec_to_config`` dict plus platform
    ("cpu", "cuda" or "tpu"), cpus, ``compile_cache`` (``engram_jax.compile_cache`` setting:
    "default", "off" or a directory; resolved on this machine) and ``resume_from`` (a checkpoint
    path or URI, or absent), and for GPU trials ``jax_env``: JAX's allocator settings
    (``sweeps.run.gpu_jax_env``, which the driver's memory plan assumed). The worker's malloc
    settings (``engram_jax.host_malloc``) came with its environment (``sweeps.run``'s
    ``runtime_env``)."""
    t = config["trial"]
    os.environ["JAX_PLATFORMS"] = t["platform"]
    apply_jax_env(t.get("jax_env") or {})
    if t["platform"] == "cpu":
        cpu_devices_for_mesh(t["train"].get("mesh"))
    from engram_jax import compile_cache

    compile_cache.enable(t.get("compile_cache", compile_cache.DEFAULT))
    logging.getLogger("ray").setLevel(logging.WARNING)  # no line per saved Tune checkpoint
    from ray import tune

    tid = t["trial_id"]
    scratch = Path(tempfile.mkdtemp(prefix=f"engram-{tid}-"))
    try:
        prev, source = tune.get_checkpoint(), "its last checkpoint (trial restarted)"
        if prev is None and t.get("resume_from"):
            prev, source = tune.Checkpoint(t["resume_from"]), "the checkpoint of an earlier run"
        if prev is not None:
            manifest = unpack_checkpoint(prev, scratch)
            print(f"[{tid}] resuming after step {manifest['step']} from {source}", flush=True)
        if t.get("workers", 1) > 1:
            _train_workers(t, scratch)
        else:
            _train(t, scratch, tune)
    except Exception as e:
        # A restart is for a lost node or worker (Tune sees those without this function raising)
        # and for transient errors; anything else would fail again: end the trial now, its last
        # result saying why (sweeps.failures).
        from sweeps.failures import final_error

        reason = final_error(e, batch_size=t["train"].get("batch_size"))
        if reason is None:
            raise
        traceback.print_exc()
        print(f"[{tid}] failed: {reason}", file=sys.stderr, flush=True)
        tune.report({"done_record": 0, "error": reason})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(t: dict, out_dir: Path, tune) -> None:
    from engram_jax.config import ModelConfig, TrainConfig
    from engram_jax.train import run_trial

    def report(metrics: dict) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if "val_loss" not in metrics:
            tune.report(metrics)
            return
        # An evaluation step: its orbax checkpoint is complete on disk (sync_checkpoints).
        with tempfile.TemporaryDirectory(prefix="engram-ckpt-") as d:
            pack_checkpoint(out_dir, Path(d), metrics["step"])
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    record = run_trial(
        ModelConfig.from_dict(t["model"]), TrainConfig(**t["train"]), corpus=t["corpus"],
        out_dir=out_dir, report=report, progress=False, meta=t["meta"], sync_checkpoints=True,
        tokenizer=t.get("tokenizer"), eos_token=t.get("eos_token"),
    )
    final = final_result(record, out_dir)
    # The last checkpoint holds the record: a rerun after a driver crash returns it at once.
    with tempfile.TemporaryDirectory(prefix="engram-ckpt-") as d:
        pack_checkpoint(out_dir, Path(d), None)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(d))


def final_result(record: dict, out_dir: Path) -> dict:
    """A finished trial's last result: its headline numbers, and the record and the metric curve
    (``record_json``, ``metrics_jsonl``) that the driver writes into the grid's results."""
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
    return final


def _train_workers(t: dict, out_dir: Path) -> None:
    """One trial over ``t["workers"]`` JAX processes: Ray Train's ``JaxTrainer`` inside this Tune
    trial, each worker asking for ``t["worker_resources"]``. On GPUs and TPUs the trainer starts
    JAX's distributed runtime; on CPUs ``_worker_loop`` does, each worker holding its share of the
    mesh's devices. Every worker runs ``run_trial`` on ``out_dir``, so the workers must share it:
    they run on this node, or ``out_dir`` is on a filesystem every node sees. The workers'
    reports reach Tune through ``TuneReportCallback`` (process 0's, the last one carrying the
    record); the evaluations' checkpoints stay in ``out_dir`` (a restarted trial starts over)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxConfig, JaxTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res, platform = t["worker_resources"], t["platform"]
    use_gpu, use_tpu = platform == "cuda", platform == "tpu"
    per_worker = {"CPU": res["cpu"]}
    if use_gpu:
        per_worker["GPU"] = res["gpu"]
    if use_tpu:
        per_worker["TPU"] = res["tpu"]
    trainer = JaxTrainer(
        _worker_loop, train_loop_config={"trial": t, "out_dir": str(out_dir)},
        jax_config=JaxConfig(use_gpu=use_gpu, use_tpu=use_tpu),
        scaling_config=ScalingConfig(num_workers=t["workers"], use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"{t['meta'].get('grid', 'trial')}-{t['trial_id']}",
                             storage_path=str(out_dir / "ray-train"),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _worker_loop(config: dict) -> None:
    """One Ray Train worker of a trial over several processes (``_train_workers``)."""
    import ray
    import ray.train

    t, out_dir = config["trial"], Path(config["out_dir"])
    ctx = ray.train.get_context()
    rank, n = ctx.get_world_rank(), ctx.get_world_size()
    if t["platform"] == "cpu":  # the trainer starts JAX's runtime on GPUs and TPUs only
        from engram_jax.parallel.distributed import free_port, initialize
        from engram_jax.parallel.mesh import MeshShape
        from ray.train.collective import broadcast_from_rank_zero

        os.environ["JAX_PLATFORMS"] = "cpu"
        per_worker = MeshShape.parse(t["train"].get("mesh")).size // n
        cpu_devices_for_mesh({"data": per_worker})
        coordinator = broadcast_from_rank_zero(
            f"{ray.util.get_node_ip_address()}:{free_port()}" if rank == 0 else None)
        initialize(coordinator, n, rank)
    from engram_jax import compile_cache
    from engram_jax.config import ModelConfig, TrainConfig
    from engram_jax.train import run_trial

    compile_cache.enable(t.get("compile_cache", compile_cache.DEFAULT))

    def report(metrics: dict) -> None:
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    record = run_trial(
        ModelConfig.from_dict(t["model"]), TrainConfig(**t["train"]), corpus=t["corpus"],
        out_dir=out_dir, report=report, progress=False, meta=t["meta"], sync_checkpoints=True,
        tokenizer=t.get("tokenizer"), eos_token=t.get("eos_token"),
    )
    ray.train.report(final_result(record, out_dir))
