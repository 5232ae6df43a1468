"""Sweeps on real multi-node Ray clusters on this machine.

- Two nodes started with ``ray start``: a head without CPUs and a worker in its own mount
  namespace where the results directory is masked by an empty tmpfs, so the worker cannot see
  what the driver writes; ``RAY_ADDRESS=... make sweep STORAGE=<shared path>`` must complete with
  every row and curve (results and checkpoints reach the driver through Tune's storage).
- A trial whose node is hard-killed mid-way (``ray.cluster_utils.Cluster``): Tune restarts it on
  a node added afterwards, from its last persisted checkpoint, and it ends with the same losses
  as an uninterrupted run of the same trial.

Each cluster has its own temp dir and ports, and only the processes these tests started are
killed (other Ray instances on the machine are left alone).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_sweeps import MICRO, _rows, corpus  # noqa: F401  (corpus is a fixture)

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("unshare")),
    reason="needs Linux, root and unshare (mount namespaces)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out += [pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def short_tmp():
    """A short directory for Ray's sockets (AF_UNIX paths are limited to ~107 bytes)."""
    d = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def env(tmp_path_factory) -> dict:
    cache = str(tmp_path_factory.getbasetemp() / "engram-cache")
    # Every process of the test cluster (nodes, driver, probes) shares its own token.
    e = {**os.environ, "PYTHONPATH": str(REPO), "ENGRAM_CACHE": cache,
         "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
         "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    e.pop("RAY_ADDRESS", None)
    e.pop("RAY_AUTH_TOKEN_PATH", None)
    return e


def test_two_node_cluster_whose_worker_cannot_see_the_results(corpus, tmp_path, short_tmp, env):  # noqa: F811
    results, storage = tmp_path / "results", tmp_path / "storage"
    (results / "micro").mkdir(parents=True)
    (results / "micro" / "sentinel").write_text("the driver's results directory")
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={short_tmp}", "--disable-usage-stats"]
    procs = []
    try:
        head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
             "--block", *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(head)
        _wait_for_cpus(env, port, 0, procs)
        # The worker's view of results/ is an empty tmpfs; it checks that before joining.
        script = (f'mount -t tmpfs tmpfs "{results}" && test ! -e "{results}/micro/sentinel" && '
                  f'exec "{RAY}" start --address=127.0.0.1:{port} --num-cpus=2 --block '
                  + " ".join(common))
        worker = subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(worker)
        _wait_for_cpus(env, port, 2, procs)

        grid = tmp_path / "micro.yaml"
        grid.write_text(MICRO.format(corpus=corpus))
        stamp = tmp_path / "stamp"  # make's set-up step is done: use this interpreter
        stamp.touch()
        run = subprocess.run(
            ["make", "-s", "sweep", f"GRID={grid}", f"RESULTS={results}", f"STORAGE={storage}",
             f"VPY={sys.executable}", f"STAMP={stamp}"],
            cwd=REPO, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True,
            text=True, timeout=400)
        log = run.stdout + run.stderr
        assert run.returncode == 0, log
        rows = _rows(results / "micro" / "runs.csv")
        assert [r["trial_id"] for r in rows] == ["rho1.00-s0", "rho0.60-s0"], log
        assert all(r["status"] == "ok" and float(r["val_loss"]) > 0 for r in rows), log
        for r in rows:
            curve = _rows(results / "micro" / "curves" / f"{r['trial_id']}.csv")
            assert curve[-1]["step"] == "4"
            assert list((storage / "micro" / r["trial_id"]).glob("checkpoint_*")), "nothing persisted"
        assert not (results / "micro" / "ray").exists()  # Tune used the shared storage only
        assert "2 of 2 trials finished" in log
    finally:
        _kill(_descendants([p.pid for p in procs]))
        for p in procs:
            p.wait(timeout=30)


def _wait_for_cpus(env: dict, port: int, n: int, procs, timeout: float = 120) -> None:
    """Wait until the cluster at ``port`` is up with ``n`` CPUs (asked via the GCS, no driver)."""
    code = ("import sys, ray; from ray._private.state import GlobalState; "
            "from ray._raylet import GcsClientOptions; s = GlobalState(); "
            f"s._initialize_global_state(GcsClientOptions.create('127.0.0.1:{port}', None, "
            "allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False)); "
            "print(int(s.cluster_resources().get('CPU', 0)))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, f"a ray node exited with {p.returncode}"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0 and r.stdout.strip() == str(n):
            return
        time.sleep(1)
    raise AssertionError(f"the cluster did not reach {n} CPUs: {r.stdout} {r.stderr}")


FAULT = MICRO.replace("rho: [1.0, 0.6]", "rho: [0.6]").replace("steps: 4", "steps: 24").replace(
    "eval_every: 2", "eval_every: 4")


@pytest.mark.slow
def test_trial_survives_a_hard_killed_node(corpus, tmp_path, short_tmp, env):  # noqa: F811
    from sweeps.grid import load_grid

    grid = tmp_path / "fault.yaml"
    grid.write_text(FAULT.format(corpus=corpus).replace("name: micro", "name: fault"))
    results, storage = tmp_path / "results", tmp_path / "storage"
    spec = load_grid(grid).trials[0]
    base = cluster = None
    try:
        # The same trial, uninterrupted, as the trainable runs it.
        base = subprocess.Popen(
            [sys.executable, "-c",
             "import json, sys; from sweeps.grid import load_grid; "
             "from engram_jax.train import run_trial; s = load_grid(sys.argv[1]).trials[0]; "
             "r = run_trial(s.model, s.train, corpus=s.corpus, out_dir=sys.argv[2], "
             "progress=False, meta=s.meta); print(json.dumps([r['train_loss'], r['val_loss']]))",
             str(grid), str(tmp_path / "uninterrupted")],
            cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The cluster lives in its own process (Ray's in-process state stays clean here).
        report = tmp_path / "fault.json"
        cluster = subprocess.Popen(
            [sys.executable, "-m", "tests.fault_cluster", str(grid), str(results), str(storage),
             short_tmp, str(storage / "fault" / spec.trial_id), str(report)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        cluster_log, _ = cluster.communicate(timeout=500)
        assert cluster.returncode == 0, cluster_log
        out, err = base.communicate(timeout=300)
        assert base.returncode == 0, err
    finally:
        for p in (base, cluster):
            if p is not None and p.poll() is None:
                _kill(_descendants([p.pid]))
                p.wait(timeout=30)
    rep = json.loads(report.read_text())
    log = rep["log"]
    assert rep["rc"] == 0, log
    resumed = [ln for ln in log.splitlines() if "resuming after step" in ln]
    assert resumed and "trial restarted" in resumed[0], log
    step = int(resumed[0].split("resuming after step ")[1].split()[0])
    assert 0 < step < spec.train.steps, log
    (row,) = _rows(results / "fault" / "runs.csv")
    assert row["status"] == "ok", log
    train_loss, val_loss = json.loads(out.strip().splitlines()[-1])
    assert (float(row["train_loss"]), float(row["val_loss"])) == (train_loss, val_loss), log
