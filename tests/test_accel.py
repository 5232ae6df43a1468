"""Accelerators without manual steps: which JAX build ``make setup`` chooses (a stub ``nvidia-smi``
on PATH, ``make -n``: nothing is installed) and that it pulls no CUDA torch onto a GPU machine
(the parity tests skip there, saying why), and how a grid's resources map onto a Ray cluster
with GPUs or TPUs (one device per trial, as many trials at once as devices)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def _pip_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if "pip install" in ln and "--upgrade pip" not in ln]


@pytestmark_make
def test_make_setup_pulls_no_cuda_torch_onto_a_gpu_machine(tmp_path):
    """torch is only for the parity tests: on the CPU the pinned version from the package index
    (with the parity extra); with a GPU (stub nvidia-smi) none by default, the parity extra left
    out so that nothing pulls PyPI's CUDA torch, and its parity tests skip; TORCH=cpu installs
    PyTorch's CPU build from its CPU index."""
    cpu = _setup_commands(tmp_path, None)
    assert _pip_lines(cpu)[0].endswith('pip install --quiet "torch==2.13.0"')
    assert '-e ".[sweep,tracking,analysis,notebooks,test,parity]"' in cpu

    gpu = _setup_commands(tmp_path, 1)
    pips = "\n".join(_pip_lines(gpu))
    assert "torch" not in pips and "parity" not in pips
    assert '-e ".[sweep,tracking,analysis,notebooks,test]"' in gpu
    assert "torch: not installed (TORCH=none" in gpu and "make setup TORCH=cpu" in gpu
    assert '"jax[cuda12]>=0.6,<0.13"' in gpu and ".installed-cuda-torch-none" in gpu
    assert "torch" not in "\n".join(_pip_lines(_setup_commands(tmp_path, None, "ACCEL=tpu")))

    cpu_torch = _setup_commands(tmp_path, 1, "TORCH=cpu")
    (torch_line,) = [ln for ln in _pip_lines(cpu_torch) if "torch==" in ln]
    assert torch_line.endswith('--index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"')
    assert ",parity]" in cpu_torch and ".installed-cuda-torch-cpu" in cpu_torch
    none = "\n".join(_pip_lines(_setup_commands(tmp_path, None, "TORCH=none")))
    assert "torch" not in none and "parity" not in none
    r = subprocess.run(["make", "-n", "setup", "TORCH=cuda", f"VENV={tmp_path / 'v'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "TORCH must be pypi, cpu or none" in r.stderr


def test_parity_tests_skip_with_a_message_where_torch_is_absent(tmp_path):
    """As on a GPU machine set up without torch: a ``torch`` that cannot be imported."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", "
                                      "name='torch')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/test_torch_parity.py"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode in (0, 5), r.stdout + r.stderr  # 5: no test ran (the module skipped)
    assert "1 skipped" in r.stdout and "torch is not installed: make setup leaves it out" in r.stdout
    assert "make setup TORCH=cpu" in r.stdout


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
