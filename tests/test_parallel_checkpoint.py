"""Sharded, asynchronous checkpoints: a run saved on one device mesh resumes on another and ends
with the losses of an uninterrupted run; tables saved with one mesh's padding restore into
another's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from engram_jax.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parent.parent
REL_TOL = 2.0e-6  # tests/test_parallel.py: ten times the largest mesh difference measured

RESUME = """
import json, sys
from engram_jax.config import TrainConfig, preset
from engram_jax.train import run_trial

out, first, then = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = preset("tiny")
train = dict(steps=16, batch_size=8, eval_every=4, log_every=1, warmup_steps=2)

class Stop(Exception):
    pass

def stop_at_8(m):
    if m["step"] >= 8:
        raise Stop

runs = {}
run_trial(cfg, TrainConfig(**train, mesh=first), out_dir=f"{out}/full", progress=False)
runs["full"] = [json.loads(l) for l in open(f"{out}/full/metrics.jsonl")]
for mesh in then:
    d = f"{out}/{mesh.replace(',', '_').replace('=', '')}"
    try:
        run_trial(cfg, TrainConfig(**train, mesh=first), out_dir=d, report=stop_at_8,
                  progress=False)
    except Stop:
        pass
    rec = run_trial(cfg, TrainConfig(**train, mesh=mesh), out_dir=d, progress=False)
    runs[mesh] = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
    runs[mesh + ":record"] = rec
print(json.dumps(runs))
"""


@pytest.mark.slow
def test_saved_on_one_mesh_resumed_on_another_matches_the_uninterrupted_run(tmp_path):
    """``tiny`` (routed experts, an Engram table padded to split over 8 devices): 16 steps on
    (2,2,2), against runs cut at step 8 on (2,2,2) and resumed on (8,1,1) (same padding) and on
    one device (the padding dropped on restore)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-c", RESUME, str(tmp_path), "data=2,fsdp=2,expert=2",
                        "data=8", "data=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(r.stdout.strip().splitlines()[-1])
    full = runs["full"]
    for mesh in ("data=8", "data=1"):
        rows = runs[mesh]
        assert [x["step"] for x in rows] == [x["step"] for x in full], mesh
        for key in ("train_loss", "val_loss"):
            worst = max(abs(a[key] - b[key]) / abs(b[key])
                        for a, b in zip(rows, full) if b.get(key) is not None)
            assert worst < REL_TOL, (mesh, key, worst)
    assert runs["data=8:record"]["mesh"] == "data=8,fsdp=1,expert=1"
    assert "mesh" not in runs["data=1:record"]


def test_tables_restore_with_another_meshs_padding(tmp_path):
    """A table saved with 16 rows (13 and 3 zero padding rows, as on an 8-device mesh) restores
    into a 13-row table (one device) and back into 16 rows; other arrays as saved."""
    table = jnp.arange(32.0).reshape(16, 2).at[13:].set(0.0)
    saved = {"params": {"engram": {"table": table}, "w": jnp.ones(3)}}
    ck = Checkpointer(tmp_path / "a")
    ck.save(5, saved)
    ck.wait()
    small = {"params": {"engram": {"table": jnp.zeros((13, 2))}, "w": jnp.zeros(3)}}
    state, step = Checkpointer(tmp_path / "a").restore_latest(small)
    assert step == 5 and state["params"]["engram"]["table"].shape == (13, 2)
    assert (state["params"]["engram"]["table"] == table[:13]).all()
    assert (state["params"]["w"] == 1).all()
    ck = Checkpointer(tmp_path / "b")
    ck.save(7, state)
    ck.wait()
    big, _ = Checkpointer(tmp_path / "b").restore_latest(saved)
    assert (big["params"]["engram"]["table"] == table).all()
