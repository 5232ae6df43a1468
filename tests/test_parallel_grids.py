"""Grids whose trials run over a device mesh: validated before any work (the mesh against each
trial's model and batch, and against the resources each trial asks for), the shipped 8-GPU node
grid, and the host device count a CPU trial over a mesh gets."""

from pathlib import Path

import pytest

from sweeps.grid import GridError, load_grid
from sweeps.trainable import cpu_devices_for_mesh

ROOT = Path(__file__).resolve().parent.parent

BASE = """\
base: smoke
rho: [1.0, 0.6]
seeds: [0]
steps: 4
batch_size: 16
"""


def grid(tmp_path, extra: str):
    p = tmp_path / "g.yaml"
    p.write_text(BASE + extra)
    return load_grid(p, check_corpus=False)


def test_a_mesh_grid_loads(tmp_path):
    g = grid(tmp_path, "resources: {cpu: 2, gpu: 8}\ntrain: {mesh: {data: 2, fsdp: 2, expert: 2}}\n")
    assert all(t.train.mesh.shape == (2, 2, 2) for t in g.trials)
    g = grid(tmp_path, "resources: {cpu: 1}\ntrain: {mesh: {data: 2}}\n")  # CPU devices
    assert all(t.train.mesh.size == 2 for t in g.trials)


@pytest.mark.parametrize("extra, message", [
    ("train: {mesh: {data: 2}}\n", "uses 2 devices per trial: give resources"),
    ("resources: {cpu: 1, gpu: 4}\ntrain: {mesh: {data: 8}}\n", "resources.gpu=4 but train.mesh"),
    ("resources: {cpu: 1, gpu: 2}\n", "resources.gpu=2 but train.mesh"),
    ("resources: {cpu: 1, gpu: 4}\ntrain: {mesh: {expert: 4}}\n", "does not divide the 42 routed"),
    ("resources: {cpu: 1}\ntrain: {mesh: {data: 32}}\n", "batch_size=16 does not split into 32"),
    ("resources: {cpu: 1}\ntrain: {mesh: {tensor: 2}}\n", "unknown axis 'tensor'"),
    ("resources: {cpu: 1, gpu: 8, workers: 2}\ntrain: {mesh: {data: 8}}\n",
     "resources.gpu=8 x 2 workers = 16 devices but train.mesh"),
    ("resources: {cpu: 1, workers: 3}\ntrain: {mesh: {data: 4}}\n", "does not split over 3 workers"),
    ("resources: {cpu: 1, workers: 0}\n", "resources.workers must be an integer >= 1"),
])
def test_bad_mesh_grids_are_refused(tmp_path, extra, message):
    with pytest.raises(GridError, match="g.yaml") as e:
        grid(tmp_path, extra)
    assert message in str(e.value)


def test_eight_gpu_node_grid():
    g = load_grid(ROOT / "sweeps" / "grids" / "gpu-m-node8.yaml", check_corpus=False)
    ref = load_grid(ROOT / "sweeps" / "grids" / "gpu-m.yaml", check_corpus=False)
    assert g.resources == {"cpu": 16, "gpu": 8, "tpu": 0}
    assert [t.trial_id for t in g.trials] == [t.trial_id for t in ref.trials]
    for t, r in zip(g.trials, ref.trials):
        assert t.model == r.model and t.train.mesh.shape == (2, 2, 2)
        assert t.model.hash() == r.model.hash()  # the same trials, split over the node


def test_cpu_trials_get_as_many_host_devices_as_their_mesh():
    env = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=1"}
    cpu_devices_for_mesh({"data": 2, "expert": 2}, env)
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"
    env = {}
    cpu_devices_for_mesh(None, env)
    assert env == {}


def test_multi_worker_grids_and_their_ray_requests(tmp_path):
    from sweeps.run import DRIVER_CPU, _bundle, _resources

    g = grid(tmp_path, "resources: {cpu: 2, gpu: 4, workers: 2}\n"
                       "train: {mesh: {data: 2, fsdp: 2, expert: 2}}\n")
    assert g.resources == {"cpu": 2, "gpu": 4, "tpu": 0, "workers": 2}
    res, platform, at_once = _resources(g, {"CPU": 32, "GPU": 16}, None)
    assert (res["workers"], platform, at_once) == (2, "cuda", 2)  # 16 GPUs / (2 x 4)
    assert _bundle(res) == {"CPU": DRIVER_CPU, "GPU": 0}  # the workers ask for theirs
    g = grid(tmp_path, "resources: {cpu: 1, workers: 2}\ntrain: {mesh: {data: 2}}\n")
    res, platform, at_once = _resources(g, {"CPU": 3}, None)
    assert (platform, at_once) == ("cpu", 1)
    with pytest.raises(SystemExit, match="asks for 2.01 CPUs per trial"):
        _resources(g, {"CPU": 2}, None)  # two workers and the trial's share of a CPU
