"""Accelerators without manual steps: which JAX build ``make setup`` chooses (a stub ``nvidia-smi``
on PATH, ``make -n``: nothing is installed), and how a grid's resources map onto a Ray cluster
with GPUs or TPUs (one device per trial, as many trials at once as devices)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sweeps.grid import load_grid
from sweeps.run import _bundle, _resources

REPO = Path(__file__).resolve().parent.parent

pytestmark_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _setup_commands(tmp_path: Path, gpus: int | None, *args: str) -> str:
    """The commands ``make setup`` would run in a fresh venv, with a stub nvidia-smi listing
    ``gpus`` GPUs (None: no nvidia-smi on PATH at all)."""
    bin_dir = tmp_path / f"bin{gpus}"
    bin_dir.mkdir(exist_ok=True)
    if gpus is not None:
        lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\\n" for i in range(gpus))
        stub = bin_dir / "nvidia-smi"
        stub.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 9\nprintf "{lines}"\n'
                        + ("" if gpus else "exit 6\n"))
        stub.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    r = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", *args], cwd=REPO,
                       env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytestmark_make
def test_make_setup_installs_cuda_jax_when_nvidia_smi_lists_a_gpu(tmp_path):
    cuda = '"jax[cuda12]>=0.6,<0.13"'
    assert cuda in _setup_commands(tmp_path, 1)
    assert cuda in _setup_commands(tmp_path, 8)
    for gpus in (None, 0):  # no nvidia-smi, or one that lists nothing (no driver)
        out = _setup_commands(tmp_path, gpus)
        assert "jax[cuda" not in out and "CPU build" in out
    assert "jax[cuda" not in _setup_commands(tmp_path, 1, "ACCEL=cpu")
    assert cuda in _setup_commands(tmp_path, None, "ACCEL=cuda")
    assert '"jax[tpu]>=0.6,<0.13"' in _setup_commands(tmp_path, None, "ACCEL=tpu")
    # the stamp names the build, so switching ACCEL installs again
    assert ".installed-cuda" in _setup_commands(tmp_path, 1)


@pytestmark_make
def test_make_setup_refuses_an_unknown_accelerator(tmp_path):
    r = subprocess.run(["make", "-n", "setup", "ACCEL=rocm", f"VENV={tmp_path / 'v'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ACCEL must be cpu, cuda or tpu" in r.stderr


def _grid(tmp_path: Path, resources: str):
    g = tmp_path / "g.yaml"
    g.write_text(f"name: g\nbase: smoke\nrho: [1.0, 0.8]\nresources: {resources}\n")
    return load_grid(g, check_corpus=False)


def test_one_gpu_per_trial_and_as_many_trials_as_gpus(tmp_path):
    auto = _grid(tmp_path, "auto")
    res, platform, conc = _resources(auto, {"CPU": 64, "GPU": 8}, None)
    assert (res, platform, conc) == ({"cpu": 8, "gpu": 1, "tpu": 0}, "cuda", 8)
    assert _resources(auto, {"CPU": 16, "GPU": 4}, None)[0]["cpu"] == 4
    assert _bundle(res) == {"CPU": 8, "GPU": 1}
    assert _resources(auto, {"CPU": 2}, None) == ({"cpu": 1, "gpu": 0, "tpu": 0}, "cpu", 2)
    with pytest.raises(SystemExit, match="asks for a GPU per trial but the Ray cluster has none"):
        _resources(_grid(tmp_path, "{cpu: 1, gpu: 1}"), {"CPU": 4}, None)


def test_tpu_resources_map_to_rays_tpu_resource_and_jax_platforms_tpu(tmp_path):
    res, platform, conc = _resources(_grid(tmp_path, "auto"), {"CPU": 96, "TPU": 4}, None)
    assert (res, platform, conc) == ({"cpu": 8, "gpu": 0, "tpu": 1}, "tpu", 4)
    res, platform, conc = _resources(_grid(tmp_path, "{cpu: 4, tpu: 4}"), {"CPU": 96, "TPU": 8}, None)
    assert (platform, conc) == ("tpu", 2)
    assert _bundle(res) == {"CPU": 4, "GPU": 0, "TPU": 4}
    with pytest.raises(SystemExit, match="asks for 4 TPU chip"):
        _resources(_grid(tmp_path, "{cpu: 1, tpu: 4}"), {"CPU": 8}, None)
