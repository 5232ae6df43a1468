"""Run a grid on Ray Tune: ``python -m sweeps.run GRID.yaml [--results DIR] [--storage WHERE] [--force]``.

Ray Tune only schedules; one trial is one ``engram_jax.train.run_trial`` call (``trainable.py``).
A local Ray instance is started (node IP 127.0.0.1, no dashboard, token authentication) unless
``RAY_ADDRESS`` names an existing cluster. GPU trials get one GPU each where the cluster has GPUs
(``JAX_PLATFORMS=cuda``), TPU trials the ``TPU`` resource (``JAX_PLATFORMS=tpu``), CPU trials
otherwise. This driver never imports JAX.

Layout under ``<results>/<grid>/``: ``runs.csv``, ``curves/``, ``README.md`` (the tidy results),
``grid.json`` (the expanded trials), and, git-ignored, ``ray/``: the default ``--storage``, where
Tune keeps the experiment (results, state, and each trial's checkpoints: the orbax state, metrics
and, once finished, the record). On a cluster, ``--storage`` must name a place every node and the
driver can reach: a shared path or a pyarrow-filesystem URI (``s3://bucket/prefix``, ``gs://...``).
Trials train in a scratch directory on their node; what the driver writes comes to it through Tune.

``runs.csv`` (with ``curves/`` and ``README.md``) is rewritten atomically each time a trial
finishes, from the record and curve that reach the driver with the trial's last Tune result.
Rerunning the same command continues a grid: rows already ``ok`` in ``runs.csv`` are kept exactly
as they are and their trials are not run again; the others train, resuming from their last
checkpoint in the storage when it has one. So a grid can be continued on another machine from its
committed files alone (``runs.csv``, ``curves/``, ``README.md``, ``grid.json``), even after the
driver was killed without warning. A trial whose node or worker dies is restarted by Tune
(``--max-failures``) from its last checkpoint; an error that would happen again (out of memory,
divergence, a deterministic failure) ends its trial at once, named in ``runs.csv`` and the
summary (``failures.py``). A finished grid is never overwritten without ``--force``. A grid is
continued only on a corpus with the fingerprint of its finished rows (exit 2 otherwise: ``pysrc``
changes with the installed packages, ``pywheels-v1`` is the same everywhere).

Tracking (``--tracking``, ``tracking.py``): TensorBoard event files under the storage by
default, or MLflow, or Weights & Biases, through Ray Tune's logger callbacks; one run per trial.
GPU trials run with ``XLA_PYTHON_CLIENT_MEM_FRACTION`` set (``--mem-fraction``, default 0.9),
and the memory plan is held against that share of the device.

Exit status: 0 all trials finished; 1 some failed or were interrupted; 2 invalid grid or
settings; 3 refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from sweeps.grid import Grid, GridError, load_grid
from sweeps.results import (
    atomic_write, summary_table,
)
from sweeps.trainable import spec_to_config, train_trial

REPO_ROOT = Path(__file__).resolve().parent.parent
_OWNED = ("runs.csv", "curves", "README.md", "grid.json", "trials", "ray", "mlflow", "wandb",
          ".gitignore")
_GITIGNORE = ("# checkpoints, Ray state and tracking stores stay out of git; runs.csv, curves/ and "
              "README.md are the results\nray/\nmlflow/\nwandb/\n")
# Share of a GPU's memory that JAX's allocator may use in GPU trials unless --mem-fraction or
# the driver's environment says otherwise (JAX's own default is 0.75).
SWEEP_MEM_FRACTION = 0.9

# Fast, quiet Ray start-up; set before Ray is imported. Users can override each.
for _k, _v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
               "RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
               "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
               "TUNE_MAX_PENDING_TRIALS_PG": "1", "RAY_DEDUP_LOGS": "0",
               # Ray runs workers at nice 15 by default; a trial is the work, not a background job.
               "RAY_worker_niceness": "0"}.items():
    os.environ.setdefault(_k, _v)


def finished_rows(out: Path, grid: Grid, *, strict: bool = True) -> dict[str, dict]:
    """The rows of ``runs.csv`` whose trial finished (status ok), by trial id, as written; with
    ``strict=False`` also those whose trial the grid no longer has.

    Raises SystemExit (exit 3) when a finished row's model config hash or seed is not the one the
    grid file now asks for: continuing would mix two versions of the grid.
    """
    import csv

    runs = out / "runs.csv"
    if not runs.exists():
        return {}
    with runs.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "ok"]
    specs = {t.trial_id: t for t in grid.trials}
    kept = {}
    for r in rows:
        spec = specs.get(r.get("trial_id"))
        if spec is None:
            if not strict:
                kept[r["trial_id"]] = r
            continue
        if r.get("config_hash") != spec.model.hash() or str(r.get("seed")) != str(spec.train.seed):
            print(f"refusing: {runs} has a finished row for {r['trial_id']} with config hash "
                  f"{r.get('config_hash')} and seed {r.get('seed')}, but the grid file now asks for "
                  f"{spec.model.hash()} and seed {spec.train.seed}; restore the grid file, or pass "
                  "--force to start over", file=sys.stderr)
            raise SystemExit(3)
        kept[r["trial_id"]] = r
    return kept


def _incompatible(out: Path, grid: Grid, trial_configs: list[dict]) -> str:
    """Why the grid file cannot continue the run in ``out`` ("" if it can).

    A grid may gain trials (more seeds, more points): the new ones run, the rest continue. It may
    not change a trial it shares with the run, nor drop a finished one (its row would be lost).
    """
    path = out / "grid.json"
    if not path.exists():
        return ""
    old = {c["trial_id"]: c for c in json.loads(path.read_text())}
    new = {c["trial_id"]: c for c in json.loads(json.dumps(trial_configs))}
    changed = sorted(t for t in set(old) & set(new) if old[t] != new[t])
    if changed:
        return f"trial(s) {', '.join(changed)} changed"
    dropped = sorted(set(finished_rows(out, grid, strict=False)) - set(new))
    if dropped:
        return f"finished trial(s) {', '.join(dropped)} no longer in the grid"
    return ""


def corpus_changed(out: Path, grid: Grid) -> str:
    """Why the grid's corpus cannot continue the finished rows of ``runs.csv`` ("" if it can): the
    corpus now resolves to another fingerprint than the one those rows were trained on, or its
    files changed since it was prepared. A prepared corpus is checked by a stat of its files
    against its manifest (``engram_jax.data.corpus_fingerprint``), not reread."""
    old = sorted({r.get("corpus_fingerprint") or "" for r in finished_rows(out, grid).values()}
                 - {""})
    if not old:
        return ""
    from engram_jax.data import CorpusChanged, corpus_fingerprint

    try:
        now = corpus_fingerprint(grid.corpus)
    except CorpusChanged as e:
        return f"refusing to continue grid {grid.name!r}: {e}"
    if old == [now]:
        return ""
    return (f"refusing to continue grid {grid.name!r}: the finished rows of {out / 'runs.csv'} were "
            f"trained on corpus {grid.corpus!r} with fingerprint {', '.join(old)}, but here it "
            f"resolves to fingerprint {now}, and one grid must not mix two corpora; 'pysrc' depends "
            "on the installed packages (any install or upgrade changes it, and so does another "
            "machine), 'pywheels-v1' does not. Continue where the corpus is the same, or pass "
            "--force (make sweep FORCE=1) to start the grid over on this corpus")


def grid_state(out: Path, grid: Grid) -> str:
    """'new', 'finished' (every trial ok in runs.csv) or 'partial'."""
    if not (out / "runs.csv").exists() and not (out / "grid.json").exists():
        return "new"
    if set(finished_rows(out, grid)) == set(grid.trial_ids):
        return "finished"
    return "partial"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", help="grid file, e.g. sweeps/grids/smoke.yaml")
    ap.add_argument("--results", default="results", help="results root (default: results)")
    ap.add_argument("--force", action="store_true", help="discard an existing run of this grid")
    ap.add_argument("--max-concurrent", type=int, default=None,
                    help="trials at once (default: as many as the resources allow)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    ap.add_argument("--storage", default=None,
                    help="where Tune keeps results and checkpoints: a path every node sees or a "
                         "URI such as s3://bucket/prefix (default: <results>/<grid>/ray)")
    ap.add_argument("--device-memory", type=float, default=None,
                    help="GiB of one GPU/TPU for the memory check (default: from Ray's "
                         "accelerator_type)")
    ap.add_argument("--compile-cache", default="default", metavar="DIR|default|off",
                    help="JAX's persistent compilation cache for the trials (default: "
                         "$ENGRAM_JAX_COMPILE_CACHE or ~/.cache/engram-jax/xla on the machine "
                         "that runs each trial; off: none)")
    ap.add_argument("--host-malloc", choices=("tuned", "default"), default=None,
                    help="glibc malloc settings of CPU trials (engram_jax.host_malloc): tuned "
                         "keeps XLA's per-step buffer instead of unmapping it every step; a grid "
                         "that may use an accelerator gets glibc's defaults (default: "
                         "$ENGRAM_JAX_HOST_MALLOC or tuned)")
    ap.add_argument("--max-failures", type=int, default=3,
                    help="restarts of a trial after a lost node or worker, or a transient error "
                         "(default: 3); out of memory and deterministic errors are not retried")
    ap.add_argument("--tracking", default=None, metavar="tensorboard|mlflow|wandb|none",
                    help="where each trial's parameters and metrics go, one run per trial: "
                         "tensorboard (event files under the storage), mlflow ($MLFLOW_TRACKING_URI"
                         ", else a file store in <results>/<grid>/mlflow), wandb (needs wandb and "
                         "an API key or WANDB_MODE=offline), several comma-separated, or none "
                         "(default: tensorboard)")
    ap.add_argument("--mem-fraction", default=None, metavar="F",
                    help="share of each GPU's memory JAX may use in GPU trials, set in them as "
                         "XLA_PYTHON_CLIENT_MEM_FRACTION; the memory plan is checked against it "
                         "(default: $XLA_PYTHON_CLIENT_MEM_FRACTION or $XLA_CLIENT_MEM_FRACTION "
                         f"where set, else {SWEEP_MEM_FRACTION})")
    a = ap.parse_args(argv)

    try:
        grid = load_grid(a.grid)
        _check_compile_cache(a.compile_cache)
        _check_host_malloc(a)
        a.gpu_env = _check_gpu_env(a.mem_fraction)
        _check_tracking(a)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.results).absolute() / grid.name
    try:
        state = "new" if a.force else grid_state(out, grid)
    except SystemExit as e:
        return int(e.code)
    trial_configs = [spec_to_config(s) for s in grid.trials]
    if state == "finished" and not a.force:
        print(f"refusing: {out} holds a finished run of grid {grid.name!r} "
              f"({len(grid.trials)} trials); pass --force (make sweep FORCE=1) to run it again from "
              "scratch", file=sys.stderr)
        return 3
    if state == "partial" and not a.force:
        why = _incompatible(out, grid, trial_configs)
        if why:
            print(f"refusing: {out} holds an unfinished run of a different version of grid "
                  f"{grid.name!r} ({why}); restore the grid file to resume, or pass --force to "
                  "start over", file=sys.stderr)
            return 3
        why = corpus_changed(out, grid)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
    from sweeps.storage import Storage

    a.storage_default = a.storage is None
    a.storage = Storage(a.storage or out / "ray")
    if a.force:
        a.storage.delete(grid.name)
        for name in _OWNED:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ".gitignore", _GITIGNORE)
    atomic_write(out / "grid.json", json.dumps(trial_configs, indent=1, sort_keys=True))
    kept = finished_rows(out, grid) if state == "partial" else {}
    print(f"grid {grid.name}: {len(grid.trials)} trials -> {out}"
          + (f" (resuming: {len(kept)} finished, {len(grid.trials) - len(kept)} to run)"
             if state == "partial" else ""), flush=True)
    pending = [c for c in trial_configs if c["trial_id"] not in kept]
    return _run(grid, out, pending, kept, a)


def _check_tracking(a) -> None:
    """Resolve ``a.tracking`` into backends whose packages (and W&B's credentials) are there."""
    from sweeps import tracking

    try:
        a.tracking = tracking.parse(a.tracking)
        tracking.check(a.tracking)
    except tracking.TrackingError as e:
        raise GridError(str(e)) from None


def gpu_jax_env(mem_fraction: str | float | None, environ=os.environ) -> dict[str, str]:
    """JAX's allocator settings for GPU trials: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` from
    ``mem_fraction``, else the driver's own fraction setting, else ``SWEEP_MEM_FRACTION``; and the
    driver's ``XLA_PYTHON_CLIENT_ALLOCATOR`` where set. Raises ValueError for settings JAX would
    refuse."""
    from engram_jax.memory import FRACTION_VARS, jax_memory_fraction, parse_fraction

    jax_memory_fraction(environ)  # the driver's own settings must be valid
    if mem_fraction is not None:
        fraction = parse_fraction(mem_fraction, "--mem-fraction")
    else:
        given = [environ[k] for k in FRACTION_VARS if environ.get(k)]
        fraction = float(given[0]) if given else SWEEP_MEM_FRACTION
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:g}"}
    if environ.get("XLA_PYTHON_CLIENT_ALLOCATOR"):
        env["XLA_PYTHON_CLIENT_ALLOCATOR"] = environ["XLA_PYTHON_CLIENT_ALLOCATOR"]
    return env


def _check_gpu_env(mem_fraction) -> dict[str, str]:
    try:
        return gpu_jax_env(mem_fraction)
    except ValueError as e:
        raise GridError(str(e)) from None


def _check_host_malloc(a) -> None:
    """Resolve ``a.host_malloc`` (the flag, else ``$ENGRAM_JAX_HOST_MALLOC``, else tuned)."""
    from engram_jax import host_malloc

    try:
        a.host_malloc = host_malloc.setting(a.host_malloc)
    except ValueError as e:
        raise GridError(str(e)) from None


def _check_compile_cache(setting: str) -> None:
    """An explicit ``--compile-cache`` directory must be usable before any trial starts."""
    from engram_jax import compile_cache

    try:
        compile_cache.check(setting)
    except ValueError as e:
        raise GridError(str(e)) from None


def _run(grid: Grid, out: Path, trial_configs: list[dict], kept: dict[str, dict], a) -> int:
    """Train ``trial_configs`` (the trials not yet finished) on Ray Tune; ``kept`` are the
    finished rows of ``runs.csv``, written back unchanged."""
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from sweeps import tracking
    from sweeps.progress import Progress, RowWriter

    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    from engram_jax import host_malloc

    # glibc reads GLIBC_TUNABLES when a worker process starts: Ray sets these before it does. The
    # tuned settings are for CPU trials: a grid that asks for no accelerator (not "auto").
    res = grid.resources
    cpu_grid = res != "auto" and not res.get("gpu", 0) and not res.get("tpu", 0)
    malloc_env = host_malloc.worker_env(a.host_malloc, "cpu" if cpu_grid else "accelerator")
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, **malloc_env}}
    storage = a.storage
    if os.environ.get("RAY_ADDRESS"):
        if storage.local and a.storage_default:
            print(f"note: on a cluster without a shared filesystem, pass --storage (a path every "
                  f"node sees, or s3://...); using {storage.uri}", file=sys.stderr, flush=True)
        ray.init(include_dashboard=False, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        ray.init(**local_init_kwargs(a.num_cpus), runtime_env=runtime_env,
                 logging_level=logging.WARNING)
        print(f"local Ray instance: node 127.0.0.1, no dashboard, token authentication "
              f"{'on' if _token_auth_on() else 'OFF'}", flush=True)
    try:
        res, platform, max_conc = _resources(grid, ray.cluster_resources(), a.max_concurrent)
        print(f"resources per trial: {res} (JAX_PLATFORMS={platform}); up to {max_conc} at a time",
              flush=True)
        if platform in ("cuda", "tpu"):
            pending = {c["trial_id"] for c in trial_configs}
            why = check_memory([t for t in grid.trials if t.trial_id in pending], platform,
                               ray.cluster_resources(), a.device_memory,
                               jax_env=a.gpu_env if platform == "cuda" else None)
            if why:
                print(f"error: {why}", file=sys.stderr)
                return 2
        # Each run is a fresh Tune experiment over the unfinished trials: finished ones come from
        # runs.csv, and an interrupted trial resumes from its checkpoint carried over from the
        # previous experiment.
        resume = storage.prepare_run(grid.name, [c["trial_id"] for c in trial_configs])
        for c in trial_configs:
            c["platform"] = platform
            c["cpus"] = res["cpu"]
            if res.get("workers", 1) > 1:
                c["workers"], c["worker_resources"] = res["workers"], dict(res)
            c["compile_cache"] = a.compile_cache
            if platform == "cuda":
                c["jax_env"] = a.gpu_env
            if c["trial_id"] in resume:
                c["resume_from"] = resume[c["trial_id"]]
        writer = RowWriter(grid, out, kept, ray.__version__)
        params = {t.trial_id: tracking.params(t) for t in grid.trials}
        trackers = tracking.callbacks(a.tracking, grid.name, out, params)
        for line in tracking.where(a.tracking, grid.name, out, storage.uri):
            print(f"tracking: {line}", flush=True)
        trainable = tune.with_resources(train_trial, _bundle(res))
        param_space = {"trial": tune.grid_search(trial_configs)}
        # SIGTERM stops like Ctrl-C: Tune stops the trials, finished ones are already written.
        prev_sigterm = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_conc, reuse_actors=False,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=grid.name, storage_path=storage.path, storage_filesystem=storage.fs,
                verbose=0,
                callbacks=[Progress(), writer, JsonLoggerCallback(), CSVLoggerCallback(),
                           *trackers],
                failure_config=tune.FailureConfig(max_failures=a.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
        result_grid = tuner.fit()
        for r in result_grid:
            if r.error is not None:
                lines = [ln for ln in str(r.error).strip().splitlines() if ln.strip()]
                writer.errors[r.config["trial"]["trial_id"]] = (lines[-1].strip() if lines
                                                                else repr(r.error))
        storage.forget(grid.name, sorted(writer.records))
    finally:
        ray.shutdown()
        if "prev_sigterm" in locals():
            signal.signal(signal.SIGTERM, prev_sigterm)
    return _write_results(writer)


def _write_results(writer) -> int:
    out = writer.out
    rows = writer.write()
    print("\n" + summary_table(rows) + "\n")
    many = [r["trial_id"] for r in rows if isinstance(r.get("epochs"), float) and r["epochs"] > 1]
    if many:
        print(f"WARNING: {len(many)} trial(s) saw their training split more than once ({', '.join(many)}): "
              "hashed n-gram tables can memorise a repeated corpus", file=sys.stderr)
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"wrote {out / 'runs.csv'} ({len(rows) - len(bad)} of {len(rows)} trials finished)")
    if bad:
        print("not finished: " + "; ".join(f"{r['trial_id']} ({r['status']}: {r['error']})" for r in bad),
              file=sys.stderr)
        return 1
    return 0


def local_init_kwargs(num_cpus: int | None) -> dict:
    """``ray.init`` arguments of the local instance a sweep starts when ``RAY_ADDRESS`` is unset:
    its node address is the loopback one and there is no dashboard. Ray 2.60 turns its token
    authentication on for a new local instance unless ``RAY_AUTH_MODE`` says otherwise (the token
    is ``~/.ray/auth_token``, created by Ray if missing). README, "Exposure", says what still
    listens on other interfaces."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        print(f"WARNING: RAY_AUTH_MODE={mode}: the local Ray instance accepts requests without a "
              "token from anyone who can reach its ports", file=sys.stderr, flush=True)
    return {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False,
            "num_cpus": num_cpus or os.cpu_count(), "object_store_memory": 200 * 1024**2}


def check_memory(trials, platform: str, cluster: dict, device_gib: float | None, *,
                 jax_env: dict | None = None) -> str:
    """Why the trials cannot fit one device ("" if they can, or if its memory is unknown).

    The plan (``engram_jax.memory``: parameters, gradients, optimizer state, activations at the
    grid's batch) of the largest trial is held against what JAX may use of ``device_gib``, or
    else of the memory of the accelerator type Ray reports (``accelerator_type:H100`` ...). On a
    GPU that is the share JAX's allocator takes in a trial whose environment holds ``jax_env``
    (``gpu_jax_env``; without it, JAX's default 0.75); on a TPU all of it.
    """
    from engram_jax.memory import (
        DEVICE_MEMORY_GIB, GiB, describe, jax_memory_fraction, memory_plan,
    )

    if device_gib is None:
        types = [k.split(":", 1)[1] for k in cluster if k.startswith("accelerator_type:")]
        known = [DEVICE_MEMORY_GIB[t.upper()] for t in types if t.upper() in DEVICE_MEMORY_GIB]
        if not known:
            print(f"note: device memory unknown (accelerator types {types or 'not reported'}); "
                  "pass --device-memory GIB to check the memory plan", file=sys.stderr)
            return ""
        device_gib = min(known)
    plans = {t.trial_id: memory_plan(t.model, t.train, platform=platform) for t in trials}
    if not plans:
        return ""
    tid = max(plans, key=lambda k: plans[k]["total"])
    plan = plans[tid]
    fraction, why = jax_memory_fraction(jax_env or {}) if platform == "cuda" else (1.0, "")
    usable = device_gib * fraction
    of = (f"{usable:.4g} GiB that JAX may use of {device_gib:g} GiB ({why})" if fraction < 1
          else f"{device_gib:g} GiB")
    print(f"memory plan of the largest trial ({tid}): {describe(plan)} of {of}", flush=True)
    if plan["total"] > usable * GiB:
        batch = next(t.train.batch_size for t in trials if t.trial_id == tid)
        more = (", raise --mem-fraction" if platform == "cuda" and fraction < 1 else "")
        return (f"trial {tid} needs about {plan['total'] / GiB:.1f} GiB per device "
                f"({describe(plan)}) but has {of}; lower batch_size (now {batch}) or seq_len"
                f"{more}, or pass --device-memory if the device is larger")
    return ""


def _token_auth_on() -> bool:
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:  # a Ray without token authentication
        return False
    return get_authentication_mode() == AuthenticationMode.TOKEN


def _resources(grid: Grid, cluster: dict, max_concurrent: int | None) -> tuple[dict, str, int]:
    """(resources per trial, JAX platform, trials at once) for ``grid`` on a cluster with the
    resources ``cluster`` (``ray.cluster_resources()``). ``auto``: one GPU per trial where the
    cluster has GPUs, else one TPU chip (Ray's ``TPU`` resource) where it has TPUs, else one CPU;
    as many trials at once as GPUs (or TPU chips, or CPUs)."""
    n_gpu, n_tpu = int(cluster.get("GPU", 0)), int(cluster.get("TPU", 0))
    n_cpu = max(1, int(cluster.get("CPU", 1)))
    res = grid.resources
    if res == "auto":
        if n_gpu:
            res = {"cpu": max(1, min(8, n_cpu // n_gpu)), "gpu": 1, "tpu": 0}
        elif n_tpu:
            res = {"cpu": max(1, min(8, n_cpu // n_tpu)), "gpu": 0, "tpu": 1}
        else:
            res = {"cpu": 1, "gpu": 0, "tpu": 0}
    workers = res.get("workers", 1)  # JAX processes per trial (Ray Train workers)
    res = {"cpu": res["cpu"], "gpu": res.get("gpu", 0), "tpu": res.get("tpu", 0)}
    if workers > 1:
        res["workers"] = workers
    if res["gpu"] and not n_gpu:
        raise SystemExit(f"error: grid {grid.name!r} asks for a GPU per trial but the Ray cluster has none "
                         "(use resources: auto or {cpu: N, gpu: 0})")
    if res["tpu"] > n_tpu:
        raise SystemExit(f"error: grid {grid.name!r} asks for {res['tpu']} TPU chip(s) per trial; the "
                         f"Ray cluster has {n_tpu} (use resources: auto or {{cpu: N, tpu: 0}})")
    # A trial of several workers holds a token share of a CPU besides its workers' (_bundle).
    need = res["cpu"] * workers + (DRIVER_CPU if workers > 1 else 0)
    if need > n_cpu:
        raise SystemExit(f"error: grid {grid.name!r} asks for {need:g} CPUs per trial; "
                         f"the Ray cluster has {n_cpu}")
    if res["gpu"]:
        platform, fit = "cuda", n_gpu // (res["gpu"] * workers)
    elif res["tpu"]:
        platform, fit = "tpu", n_tpu // (res["tpu"] * workers)
    else:
        platform, fit = "cpu", int(n_cpu // need)
    return res, platform, max(1, max_concurrent or fit)


DRIVER_CPU = 0.01  # what a trial of several workers holds itself (it waits on its workers)


def _bundle(res: dict) -> dict:
    """Ray resource names of a trial's request (``TPU`` is a custom resource in Ray). A trial of
    several workers asks for a token share of a CPU itself (it only waits on its Ray Train
    workers, which ask for ``res`` each; Ray refuses an empty request)."""
    if res.get("workers", 1) > 1:
        return {"CPU": DRIVER_CPU, "GPU": 0}
    out = {"CPU": res["cpu"], "GPU": res["gpu"]}
    if res.get("tpu"):
        out["TPU"] = res["tpu"]
    return out


def _trial_name(trial) -> str:
    return trial.config["trial"]["trial_id"]


if __name__ == "__main__":
    sys.exit(main())
