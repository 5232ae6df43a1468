"""Train one model: ``run_trial`` (used by the sweeps) and the ``python -m engram_jax.train`` CLI.

One trial = corpus -> tokenizer/shards (engram_jax.data) -> seeded batches with host-side hash ids ->
jitted train steps (optim.py) -> periodic validation -> ``metrics.jsonl`` + ``record.json`` and an
orbax checkpoint in the output directory. A rerun with the same output directory resumes from
the checkpoint and reproduces the uninterrupted run's batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from engram_jax import host_malloc, trainmetrics
from engram_jax.config import ModelConfig, TrainConfig, preset, train_dict
from engram_jax.counting import flops_per_token, flops_per_token_6n
from engram_jax.parallel.mesh import check_mesh


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


def _git_commit(root: Path | None = None) -> str:
    """The checkout's commit, ``-dirty`` when a tracked file outside ``results/`` differs from it
    (the grids write their rows into ``results/`` of the checkout they run from: that is output,
    not a change of the program)."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)results"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ENGRAM_GIT_COMMIT", "unknown")


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host's CPU model and core count ("Intel(R) Xeon(R) Processor x 2"), for provenance:
    on the CPU ``device_kind`` is just "cpu", and the same trial rerun on another CPU model
    does not reproduce bit for bit (XLA's kernels and their rounding differ)."""
    model = ""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown"
    return f"{model} x {os.cpu_count() or '?'}"


def resolve_dtype(cfg: ModelConfig, tcfg: TrainConfig) -> ModelConfig:
    """Parameters stay float32; compute in bf16 on GPU/TPU when compute_dtype is 'auto'."""
    dt = tcfg.compute_dtype
    if dt == "auto":
        dt = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dataclasses.replace(cfg, dtype=dt)


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def _primary() -> bool:
    """Whether this process writes the run's files and reports its metrics: the only process,
    or process 0 of a trial over several (``jax.distributed``; the others compute alike)."""
    return jax.process_index() == 0


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_trial(model_cfg: ModelConfig, train_cfg: TrainConfig, *, corpus: str = "pystdlib",
              out_dir: str | Path, report: Callable[[dict], None] | None = None,
              progress: bool = True, meta: dict | None = None,
              sync_checkpoints: bool = False, tokenizer: str | None = None,
              eos_token: str | None = None, listing=None) -> dict:
    """Train one model and return its result record (also written to ``out_dir/record.json``).

    The steps, each a function below: ``_claim_out_dir`` (a finished run returns its record),
    ``_Run.build`` (data, model, optimizer, checkpoint), ``_Run.train`` (the step loop with periodic
    evaluation, metrics and checkpoints), ``_Run.final_eval`` and ``_Run.record``.

    Args:
      model_cfg, train_cfg: what to train and how.
      corpus: "pystdlib", "pysrc", "pywheels-v1" or a path (see data.resolve_corpus); prepared
        on first use (``engram_jax.data.prepare``), found by a stat of its files afterwards.
      out_dir: holds config.json, metrics.jsonl, record.json and ckpt/; resumed if present.
      report: called with a metrics dict at every log step (the sweep forwards it to Ray Tune).
      progress: show a progress bar on stderr.
      meta: extra fields copied into the record (grid, trial_id, rho, seed, budget ...).
      sync_checkpoints: wait for each checkpoint to be complete on disk before the ``report``
        that follows it, so that ``report`` may copy ``out_dir`` elsewhere (the sweeps persist
        it as a Ray Tune checkpoint); by default orbax saves in the background.
      tokenizer: a user's tokenizer.json or Hugging Face tokenizer folder (None: the own BPE);
        its vocabulary must have ``model_cfg.vocab_size`` ids.
      eos_token: that tokenizer's end-of-document token, when its config names none.
      listing: the corpus's ``engram_jax.data.check_corpus`` listing, when the caller has just
        made one (the CLI): the data step then does not list the corpus again.

    Raises:
      TrainingDiverged: the loss became NaN/Inf (the message names the step).
      FileNotFoundError / ValueError: a missing, empty or changed corpus, a tokenizer that does
        not fit, a damaged cache entry, an out_dir holding another run.
    """
    t_start = time.time()
    cfg = resolve_dtype(model_cfg, train_cfg)
    check_mesh(train_cfg.mesh, cfg, train_cfg, devices=jax.device_count())  # before any work
    out = Path(out_dir).absolute()
    tok = {k: v for k, v in (("tokenizer", tokenizer), ("eos_token", eos_token)) if v is not None}
    done = _claim_out_dir(cfg, train_cfg, corpus, out, tok)
    if done is not None:
        return done
    run = _Run.build(cfg, train_cfg, corpus, out, progress=progress, tok=tok, listing=listing)
    run.sync_checkpoints = sync_checkpoints
    run.train(report)
    val_loss, val_tokens = run.final_eval()
    record = run.record(val_loss, val_tokens, meta, t_start)
    if record["epochs"] > 1.0:
        print(f"WARNING: this trial saw its training split {record['epochs']:.2f} times; hashed "
              "n-gram tables can memorise a corpus seen many times", file=sys.stderr)
    if _primary():
        _atomic_write(out / "record.json", json.dumps(record, indent=1))
    del run  # the model, optimizer state and data: give their memory back (host_malloc)
    host_malloc.release()
    return record


# TrainConfig fields that say how a step is computed, not what it computes: a run resumes with
# other values of them (another mesh, more micro-batches) and continues to float rounding.
EXECUTION_FIELDS = ("mesh", "grad_accum", "remat")


def _same_run(a: dict, b: dict) -> bool:
    strip = lambda d: {**d, "train": {k: v for k, v in d.get("train", {}).items()  # noqa: E731
                                      if k not in EXECUTION_FIELDS}}
    return strip(a) == strip(b)


def _claim_out_dir(cfg: ModelConfig, tcfg: TrainConfig, corpus: str, out: Path,
                   tok: dict | None = None) -> dict | None:
    """The stored record if ``out`` holds this finished run; refuses a directory of another run
    (``EXECUTION_FIELDS`` may differ: a run started on one mesh resumes on another). A user's
    tokenizer (``tok``: tokenizer, eos_token) is part of the run; the own BPE adds nothing, so
    earlier runs' config.json still match."""
    run_spec = {"model": cfg.to_dict(), "train": train_dict(tcfg), "corpus": corpus, **(tok or {})}
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if not _same_run(old, json.loads(json.dumps(run_spec))):
            raise ValueError(f"{out} holds a run with a different config; choose another output "
                             "directory (nothing was changed)")
        if (out / "record.json").exists():
            return json.loads((out / "record.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    if _primary():
        _atomic_write(cfg_path, json.dumps(run_spec, indent=1, sort_keys=True))
    return None


class _Run:
    """One trial's live objects: data, jitted steps, state, checkpoints and the metrics log."""

    sync_checkpoints = False

    @classmethod
    def build(cls, cfg: ModelConfig, tcfg: TrainConfig, corpus: str, out: Path, *,
              progress: bool, tok: dict | None = None, listing=None) -> _Run:
        """Data (tokenizer, shards, hashing), model and optimizer state, restored from the
        latest checkpoint in ``out`` if there is one."""
        from engram_jax import data as data_lib
        from engram_jax.checkpoint import Checkpointer
        from engram_jax.model import HybridLM
        from engram_jax.optim import TrainState, make_optimizer, schedule, step_functions
        from engram_jax.parallel.sharding import Parallel

        self = cls()
        self.par = par = Parallel(tcfg.mesh, cfg, tcfg)
        self.cfg, self.tcfg, self.corpus, self.out, self.progress = cfg, tcfg, corpus, out, progress
        t_data = time.perf_counter()
        self.tok = tok or {}
        self.data = data_lib.prepare(corpus, cfg.vocab_size, progress=progress, listing=listing,
                                     **self.tok)
        if progress and _primary():
            print(f"[data] {self.data!r} ready in {time.perf_counter() - t_data:.2f} s "
                  f"({self.data.cache_path})", file=sys.stderr, flush=True)
        self.hash_fn = data_lib.make_hash_fn(cfg.engram, self.data, cfg.vocab_size) if cfg.engram else None
        self.hash_fn = par.local_hash_fn(self.hash_fn, tcfg.batch_size)  # this host's sequences
        model = HybridLM(cfg, rngs=nnx.Rngs(tcfg.seed), remat=tcfg.remat)
        self.store = None
        if cfg.engram is not None and cfg.engram.offload:
            from engram_jax.offload import HostTables

            self.store = HostTables(model, tcfg)  # tables + their Adam state in host memory
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        del model
        # Built on one device, then split over the mesh; the optimizer moments are made from the
        # split parameters, so they are split alike.
        params = par.put(par.pad_tables(params))
        tx = make_optimizer(tcfg, clip=self.store is None)
        state = par.put(TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32)))
        self.ckpt = Checkpointer(out / "ckpt")
        self.state, self.start = self.ckpt.restore_latest(state)
        if self.store is not None and self.start > 0:
            self.store.restore(out / "host_tables", self.start)
        self.train_step, self.eval_step = par.jit_steps(
            *step_functions(graphdef, cfg, tcfg, tx, eval_stats=True), self.state)
        self.lr_at = schedule(tcfg, tcfg.lr)
        self.val = self._eval_set(tcfg.eval_batches)
        self.metrics_path = out / "metrics.jsonl"
        self.rows = _read_metrics(self.metrics_path, self.start)
        if _primary():
            _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.tokens_timed, self.seconds_timed = 0, 0.0
        self.eval_stats = {}  # the last evaluation's mean MoE drop rates and Engram gates
        self.peak, _ = trainmetrics.trial_peak(cfg)  # rated peak for MFU, or None
        self.n_devices = tcfg.mesh.size  # the devices the trial runs on (its MFU is per device)
        return self

    def _eval_set(self, n_batches: int) -> list[dict]:
        from engram_jax import data as data_lib

        B, T = self.tcfg.batch_size, self.cfg.seq_len
        val = data_lib.eval_batches(self.data.val_tokens, batch_size=B, seq_len=T,
                                    n_batches=n_batches, hash_fn=self.hash_fn)
        return [self.par.put_batch(b) for b in val]

    def evaluate(self, batches: list[dict]) -> float:
        """Mean loss over ``batches`` (every batch has the same number of tokens); the mean of
        the statistics the eval step returns with it is kept in ``self.eval_stats``."""
        st, store = self.state, self.store
        if store is not None:  # the current host rows, gathered now
            outs = [self.par.fetch(self.eval_step(st, {**b, "memory": store.gather(
                store.rows(b["hash_ids"]))})) for b in batches]
        else:
            outs = [self.par.fetch(self.eval_step(st, b)) for b in batches]
        self.eval_stats = trainmetrics.mean_stats(outs)
        return float(np.mean([float(o["loss"]) for o in outs]))

    def _log(self, row: dict, report) -> None:
        self.rows.append(row)
        if _primary():
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if report is not None:  # on every process (Ray Train gathers the workers' reports)
            report({k: v for k, v in row.items() if v is not None})

    def train(self, report) -> None:
        """Steps ``start + 1 .. steps``: metrics read a step late, evaluation and a checkpoint every
        ``eval_every`` steps (and at the end), throughput timed without the compiling step."""
        from engram_jax import data as data_lib

        tcfg, store = self.tcfg, self.store
        B, T = tcfg.batch_size, self.cfg.seq_len
        best_val = min((r["val_loss"] for r in self.rows if r.get("val_loss") is not None),
                       default=math.inf)
        if self.start == 0:
            best_val = self.evaluate(self.val)
            self._log({"step": 0, "tokens": 0, "train_loss": None, "val_loss": best_val, "lr": 0.0},
                      None)
        batches = data_lib.BatchIterator(
            self.data.train_tokens, batch_size=B, seq_len=T, seed=tcfg.seed, hash_fn=self.hash_fn,
            start_step=self.start, prefetch=tcfg.prefetch,
            post_fn=store.prefetch if store is not None else self.par.put_batch)
        bar = None
        if self.progress and _primary():
            from tqdm.auto import tqdm

            bar = tqdm(total=tcfg.steps, initial=self.start, desc="train", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
        pending = None  # (step, metrics) of the previous step, read a step late
        t_mark = None

        def flush(step: int, m, val_loss: float | None):
            m = self.par.fetch(m)  # host values (each process reads its own replica)
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss} at step {step}: training diverged; lower the learning rate "
                    f"(lr={tcfg.lr}) or raise warmup_steps ({tcfg.warmup_steps})")
            tps = self.tokens_timed / self.seconds_timed if self.seconds_timed > 0 else None
            row = {"step": step, "tokens": step * B * T, "train_loss": loss, "val_loss": val_loss,
                   "lr": float(self.lr_at(step - 1)), "tokens_per_s": tps,
                   "grad_norm": float(m["grad_norm"])}
            if "max_load" in m:
                row["max_load"] = float(m["max_load"])
            row.update(trainmetrics.step_fields(m, self.cfg, tokens_per_s=tps, peak=self.peak,
                                                n_devices=self.n_devices))
            if val_loss is not None:
                row.update(trainmetrics.stat_fields(self.eval_stats, self.cfg, prefix="val_"))
            self._log(row, report)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", val=f"{best_val:.3f}")

        try:
            for step in range(self.start + 1, tcfg.steps + 1):
                batch = next(batches)
                if t_mark is None and step > self.start + 1:
                    t_mark = time.perf_counter()  # skip the compiling first step
                if store is None:
                    self.state, m = self.train_step(self.state, batch)
                else:
                    rows = store.refresh(batch)
                    self.state, m = self.train_step(self.state, batch)
                    store.apply(rows, m.pop("memory_grad"))
                if pending is not None and pending[0] % tcfg.log_every == 0:
                    flush(pending[0], pending[1], None)
                pending = (step, m)
                if t_mark is not None:
                    self.tokens_timed += B * T
                is_eval = step % tcfg.eval_every == 0 or step == tcfg.steps
                if is_eval or (tcfg.ckpt_every and step % tcfg.ckpt_every == 0):
                    jax.block_until_ready(m["loss"])
                    if t_mark is not None:
                        self.seconds_timed += time.perf_counter() - t_mark
                    v = self.evaluate(self.val) if is_eval else None
                    if v is not None:
                        best_val = min(best_val, v)
                    self.ckpt.save(step, self.state)  # before reporting: a report marks a resumable step
                    if store is not None:
                        store.save(self.out / "host_tables", step)
                    if self.sync_checkpoints:
                        self.ckpt.wait()
                    flush(step, m, v)
                    pending = None
                    t_mark = time.perf_counter()
                if bar is not None:
                    bar.update(1)
        finally:
            batches.close()
            if bar is not None:
                bar.close()
            self.ckpt.wait()  # an interrupted run still leaves its last checkpoint complete

    def _final_rows(self) -> list[dict]:
        """The run's logged rows: as written (the writing process), or as logged in memory."""
        if _primary():
            return _read_metrics(self.metrics_path, self.tcfg.steps)
        return [r for r in self.rows if r["step"] <= self.tcfg.steps]

    def final_eval(self) -> tuple[float, int]:
        """(loss, tokens) of the final evaluation: ``final_eval_tokens`` of the validation split
        (the whole split if smaller), or the periodic evaluation set when that is 0."""
        tcfg = self.tcfg
        per_batch = tcfg.batch_size * self.cfg.seq_len
        if tcfg.final_eval_tokens == 0:
            last = [r for r in self._final_rows() if r.get("val_loss") is not None]
            return last[-1]["val_loss"], len(self.val) * per_batch
        batches = self._eval_set(math.ceil(tcfg.final_eval_tokens / per_batch))
        return self.evaluate(batches), len(batches) * per_batch

    def record(self, val_loss: float, val_tokens: int, meta: dict | None, t_start: float) -> dict:
        """The trial's result row (docs/design.md section 6 (Results records))."""
        from engram_jax import data as data_lib

        cfg, tcfg = self.cfg, self.tcfg
        final = self._final_rows()
        evals = [r for r in final if r.get("val_loss") is not None]
        trains = [r for r in final if r.get("train_loss") is not None]
        counts = cfg.param_counts()
        tokens_seen = tcfg.steps * tcfg.batch_size * cfg.seq_len
        return {
            "status": "ok", **(meta or {}),
            "config_json": cfg.to_json(), "config_hash": cfg.hash(),
            **{f"params_{k}": v for k, v in counts.items()},
            "n_routed": cfg.moe.n_routed if cfg.moe else 0,
            "top_k": cfg.moe.top_k if cfg.moe else 0,
            "engram_slots": sum(cfg.engram.rows().values()) if cfg.engram else 0,
            "engram_layers": ",".join(map(str, cfg.engram.layer_ids)) if cfg.engram else "",
            "flops_per_token": flops_per_token(cfg), "flops_per_token_6n": flops_per_token_6n(cfg),
            "steps": tcfg.steps, "batch_size": tcfg.batch_size, "seq_len": cfg.seq_len, "lr": tcfg.lr,
            "tokens_seen": tokens_seen, "train_tokens": int(self.data.n_train_tokens),
            "epochs": data_lib.epochs(tokens_seen, self.data),
            "train_loss": trains[-1]["train_loss"] if trains else None,
            "val_loss": val_loss, "val_tokens": val_tokens,
            "best_val_loss": min([r["val_loss"] for r in evals] + [val_loss]),
            "tokens_per_s": self.tokens_timed / self.seconds_timed if self.seconds_timed > 0 else None,
            **trainmetrics.record_fields(
                final, self.eval_stats, cfg, peak=self.peak, n_devices=self.n_devices,
                tokens_per_s=self.tokens_timed / self.seconds_timed if self.seconds_timed > 0 else None),
            "wall_s": time.time() - t_start, "device_kind": jax.devices()[0].device_kind,
            "host_cpu": host_cpu(), "platform": jax.default_backend(), "git_commit": _git_commit(),
            "jax_version": jax.__version__, "flax_version": __import__("flax").__version__,
            "optax_version": __import__("optax").__version__,
            "corpus": self.corpus, "corpus_fingerprint": self.data.fingerprint,
            **({"tokenizer": self.tok["tokenizer"],
                "tokenizer_sha256": self.data.meta.get("tokenizer_sha256")}
               if self.tok.get("tokenizer") else {}),
            **self._parallel_fields(),
        }

    def _parallel_fields(self) -> dict:
        """How the trial ran, where it was not the default: the mesh, the devices and what one
        of them held (parameters, optimizer state), micro-batches and rematerialisation."""
        tcfg, out = self.tcfg, {}
        if tcfg.mesh.size > 1:
            from engram_jax.parallel.rules import per_device_params

            out.update({"mesh": str(tcfg.mesh), "devices": tcfg.mesh.size,
                        "params_per_device": per_device_params(self.cfg, tcfg.mesh)["total"],
                        "state_bytes_per_device": self.par.per_device_bytes(self.state)})
            if self.seconds_timed > 0:
                out["tokens_per_s_per_device"] = (self.tokens_timed / self.seconds_timed
                                                  / tcfg.mesh.size)
        if tcfg.grad_accum > 1:
            out["grad_accum"] = tcfg.grad_accum
        if tcfg.remat != "none":
            out["remat"] = tcfg.remat
        return out


# ---------------------------------------------------------------------------------------------
# CLI


def parse_sets(pairs: list[str]) -> tuple[dict, dict]:
    """Split ``key=value`` overrides into TrainConfig fields and ModelConfig (dotted) keys."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_o, train_o = {}, {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        val = yaml.safe_load(v)
        (train_o if k in train_fields else model_o)[k] = val
    return model_o, train_o


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engram_jax.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, help="model preset (engram_jax.config.PRESETS)")
    ap.add_argument("--corpus", default="pystdlib",
                    help="pystdlib | pysrc | pywheels-v1 (pinned wheels, the same on every "
                         "machine) | a directory of text files | .jsonl | .parquet")
    ap.add_argument("--tokenizer", metavar="PATH",
                    help="a tokenizer.json or Hugging Face tokenizer folder whose vocabulary has "
                         "the model's vocab_size ids (default: a byte-level BPE trained on the "
                         "corpus); see docs/data.md")
    ap.add_argument("--eos-token", metavar="TOKEN",
                    help="the tokenizer's end-of-document token, when its config names none")
    ap.add_argument("--steps", type=int, help="optimizer steps")
    ap.add_argument("--rho", type=float,
                    help="allocate the preset's sparse budget: rho in experts, 1-rho in Engram")
    ap.add_argument("--out", help="output directory (resumed if it holds this run)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a TrainConfig field (lr=1e-3) or model key (moe.top_k=2)")
    ap.add_argument("--mesh", metavar="data=N,fsdp=N,expert=N",
                    help="split the trial over a device mesh (engram_jax.parallel; axes left "
                         "out are 1); data*fsdp*expert must equal the devices JAX sees (on the "
                         "CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N). Default: one "
                         "device")
    ap.add_argument("--coordinator", metavar="HOST:PORT",
                    help="one process of a trial over several processes (hosts): JAX's "
                         "distributed runtime with process 0 at HOST:PORT; start the same command "
                         "on every host with --processes and its own --process-id")
    ap.add_argument("--processes", type=int, metavar="N", help="processes of the trial")
    ap.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--compile-cache", default="default", metavar="DIR|default|off",
                    help="JAX's persistent compilation cache (default: $ENGRAM_JAX_COMPILE_CACHE "
                         "or ~/.cache/engram-jax/xla; off: none)")
    ap.add_argument("--host-malloc", choices=host_malloc.SETTINGS, default=None,
                    help="glibc malloc settings when JAX runs on the CPU (engram_jax.host_malloc): "
                         "tuned keeps XLA's per-step buffer instead of unmapping it every step "
                         "(default: $ENGRAM_JAX_HOST_MALLOC or tuned)")
    a = ap.parse_args(argv)
    try:
        host_malloc.apply_in_process(a.host_malloc)  # before JAX starts its threads
        if (a.coordinator, a.processes, a.process_id) != (None, None, None):
            from engram_jax.parallel.distributed import initialize

            initialize(a.coordinator, a.processes, a.process_id)  # before JAX's backends start
        cfg = preset(a.preset)
        model_o, train_o = parse_sets(a.sets)
        if a.rho is not None:
            from engram_jax.allocation import allocate

            cfg = allocate(cfg, a.rho)
        if model_o:
            cfg = cfg.with_overrides(model_o)
        if a.steps is not None:
            train_o["steps"] = a.steps
        if a.mesh is not None:
            train_o["mesh"] = a.mesh
        tcfg = TrainConfig(**train_o)
        from engram_jax import data as data_lib

        # A missing, empty or changed corpus and a tokenizer that does not fit fail here, before
        # any work (a prepared corpus is checked by a stat of its files, not read).
        listing = data_lib.check_corpus(a.corpus)
        if a.tokenizer is not None:
            data_lib.load_tokenizer_spec(a.tokenizer, eos_token=a.eos_token,
                                         vocab_size=cfg.vocab_size)
        elif a.eos_token is not None:
            raise ValueError("--eos-token needs --tokenizer")
        from engram_jax import compile_cache

        compile_cache.check(a.compile_cache)  # so does an unusable cache directory
        out = Path(a.out or f"runs/{a.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        compile_cache.enable(a.compile_cache)
        rec = run_trial(cfg, tcfg, corpus=a.corpus, out_dir=out, progress=not a.no_progress,
                        meta={"preset": a.preset, "rho": a.rho}, tokenizer=a.tokenizer,
                        eos_token=a.eos_token, listing=listing)
    except (ValueError, FileNotFoundError, TypeError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: rec[k] for k in ("val_loss", "best_val_loss", "train_loss",
                                          "tokens_per_s", "epochs", "params_total")}, indent=1))
    print(f"wrote {out}/record.json and {out}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
