"""One trial over two JAX processes (``--coordinator/--processes/--process-id``, JAX's
distributed runtime over CPU processes with one device each) against one process with the same
global mesh (two host devices): the same losses, one set of files (written by process 0), one
checkpoint (each process writing its shards)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engram_jax.parallel.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
REL_TOL = 2.0e-6  # tests/test_parallel.py
ARGS = ["--preset", "tiny", "--steps", "12", "--set", "eval_every=4", "--set", "log_every=1",
        "--set", "batch_size=8", "--no-progress", "--mesh", "data=2"]


def env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_give_the_one_process_losses(tmp_path):
    cmd = [sys.executable, "-m", "engram_jax.train", *ARGS]
    port = free_port()
    multi = tmp_path / "multi"
    procs = [subprocess.Popen([*cmd, "--out", str(multi), "--coordinator", f"127.0.0.1:{port}",
                               "--processes", "2", "--process-id", str(i)], cwd=ROOT, env=env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err[-3000:]
    single = tmp_path / "single"
    r = subprocess.run([*cmd, "--out", str(single)], cwd=ROOT, env=env(2), capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = rows(multi), rows(single)
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for key in ("train_loss", "val_loss"):
        assert max(abs(x[key] - y[key]) / abs(y[key])
                   for x, y in zip(a, b) if y.get(key) is not None) < REL_TOL
    rec = json.loads((multi / "record.json").read_text())
    assert rec["devices"] == 2 and rec["val_loss"] == pytest.approx(
        json.loads((single / "record.json").read_text())["val_loss"], rel=REL_TOL)
    assert (multi / "ckpt" / "12").is_dir()


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:1234", None, None), "--processes N and --process-id I together"),
    (("127.0.0.1:1234", 2, 2), "--process-id must be in [0, --processes=2)"),
    (("localhost", 2, 0), "HOST:PORT"),
])
def test_incomplete_process_settings_are_refused(args, message):
    from engram_jax.parallel.distributed import initialize

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        initialize(*args)


def test_cli_refuses_them_before_any_work(tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "engram_jax.train", *ARGS, "--out", str(out),
                        "--coordinator", "127.0.0.1:1234"], cwd=ROOT, env=env(1),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--process-id I together" in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def test_each_host_hashes_the_sequences_it_feeds(monkeypatch):
    """One process: the hash function unchanged, every row its own. Two (faked): only the rows
    this process's devices hold are hashed, the same values as hashing the whole batch."""
    import jax
    import numpy as np

    from engram_jax.config import TrainConfig, preset
    from engram_jax.model import default_hash_fn
    from engram_jax.parallel.sharding import Parallel

    cfg = preset("tiny")
    par = Parallel(TrainConfig().mesh, cfg, TrainConfig())
    hash_fn = default_hash_fn(cfg)
    assert par.local_hash_fn(hash_fn, 8) is hash_fn
    assert par.local_rows(8).tolist() == list(range(8))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(Parallel, "local_rows", lambda self, b: np.arange(b // 2, b))
    seen = []
    local = par.local_hash_fn(lambda ids: seen.append(len(ids)) or hash_fn(ids), 8)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (8, 16))
    got, want = local(ids), hash_fn(ids)
    assert seen == [4]
    for lid in want:
        assert (got[lid][4:] == want[lid][4:]).all() and not got[lid][:4].any()
