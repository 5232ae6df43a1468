"""Helper process of ``test_cluster.py``: a ``ray.cluster_utils.Cluster`` (head without CPUs,
one worker node), a sweep driver on it, and a hard kill of the worker node once the trial has
persisted its first checkpoint; another node is added for the restart.

``python -m tests.fault_cluster GRID RESULTS STORAGE TEMP_DIR TRIAL_STORAGE_DIR REPORT_JSON``
writes ``{"rc": driver exit status, "log": driver output}`` to REPORT_JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def main(grid, results, storage, temp_dir, trial_dir, report) -> int:
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Keep this cluster out of /tmp/ray/ray_current_cluster, which a plain ray.init() reads.
    ray._private.utils.write_ray_address = lambda *a, **k: None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = {"temp_dir": temp_dir, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "num_cpus": 0, "gcs_server_port": port,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    driver = None
    try:
        first = cluster.add_node(**node, num_cpus=1)
        log_path = Path(report).with_suffix(".log")
        driver = subprocess.Popen(
            [sys.executable, "-m", "sweeps.run", grid, "--results", results, "--storage", storage],
            env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=log_path.open("w"),
            stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            if any((c / "manifest.json").exists() for c in Path(trial_dir).glob("checkpoint_*")):
                break
            time.sleep(0.2)
        if driver.poll() is None:
            cluster.remove_node(first, allow_graceful=False)  # SIGKILL the trial's node
            print("killed the node running the trial", flush=True)
            cluster.add_node(**node, num_cpus=1)
        try:
            driver.wait(timeout=240)
        finally:
            Path(report).write_text(json.dumps({"rc": driver.returncode,
                                                "log": log_path.read_text()}))
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
