"""A grid whose trials run as several JAX processes: ``resources: {workers: 2, cpu: 1}`` makes
each trial a Ray Train ``JaxTrainer`` of two CPU workers inside its Tune trial (one device each,
JAX's distributed runtime between them), and gives the losses of the one-process run of the same
global mesh (two host devices in one process) to float rounding."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REL_TOL = 2.0e-6  # tests/test_parallel.py

GRID = """\
name: {name}
base: smoke
model: {{seq_len: 32}}
rho: [1.0, 0.6]
seeds: [0]
steps: 6
batch_size: 4
corpus: pystdlib
resources: {resources}
train: {{eval_every: 3, eval_batches: 1, log_every: 1, warmup_steps: 1, mesh: {{data: 2}}}}
"""


def run_grid(tmp_path: Path, name: str, resources: str) -> dict[str, dict]:
    grid = tmp_path / f"{name}.yaml"
    grid.write_text(GRID.format(name=name, resources=resources))
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "sweeps.run", str(grid), "--results", str(results),
                        "--num-cpus", "3"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=3000)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    with (results / name / "runs.csv").open() as f:
        return {row["trial_id"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_two_worker_trials_match_one_process_trials(tmp_path):
    multi = run_grid(tmp_path, "workers", "{cpu: 1, workers: 2}")
    one = run_grid(tmp_path, "one", "{cpu: 1}")
    assert sorted(multi) == sorted(one) == ["rho0.60-s0", "rho1.00-s0"]
    for tid in one:
        a, b = multi[tid], one[tid]
        assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
        assert a["devices"] == b["devices"] == "2"
        for key in ("val_loss", "train_loss"):
            assert abs(float(a[key]) - float(b[key])) / float(b[key]) < REL_TOL, (tid, key)
