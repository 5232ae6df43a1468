"""The device-memory plan checked before a GPU/TPU grid starts, and the GPU presets' shapes.

Fast: the plan's parts and scaling, the share of a GPU JAX's allocator takes (and the fraction the
sweep sets in GPU trials), the driver's refusal of a batch that cannot fit. Slow: two
steps of every trial shape of each GPU grid on the CPU at batch 1 (a shape error shows here, not
an hour into a GPU run). GPU: two steps at the grid's own batch, peak memory within the plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engram_jax.memory import GiB, WORKSPACE, jax_memory_fraction, memory_plan
from sweeps.grid import load_grid

REPO = Path(__file__).resolve().parent.parent
GPU_GRIDS = ["gpu-s", "gpu-m"]


def _grid(name: str):
    return load_grid(REPO / "sweeps" / "grids" / f"{name}.yaml", check_corpus=False)


def test_plan_parts_and_scaling():
    t = _grid("gpu-s").trials[-1]
    plan = memory_plan(t.model, t.train)
    n = t.model.param_counts()["total"]
    assert plan["params"] == plan["grads"] == 4 * n and plan["optimizer"] == 8 * n
    assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
    double = memory_plan(t.model, dataclasses.replace(t.train, batch_size=2 * t.train.batch_size))
    assert double["activations"] == 2 * plan["activations"] and double["params"] == plan["params"]
    assert memory_plan(t.model, t.train, platform="cpu")["activations"] > plan["activations"]  # f32
    off = dataclasses.replace(t.model, engram=dataclasses.replace(t.model.engram, offload=True))
    tables = t.model.param_counts()["engram_tables"]
    assert memory_plan(off, t.train)["optimizer"] == 8 * (n - tables)


@pytest.mark.parametrize("name", GPU_GRIDS)
def test_gpu_grids_fit_an_h100_at_the_sweeps_memory_fraction(name):
    from sweeps.run import SWEEP_MEM_FRACTION

    for t in _grid(name).trials:
        assert memory_plan(t.model, t.train)["total"] < SWEEP_MEM_FRACTION * 80 * GiB, t.trial_id


def test_jax_memory_fraction_follows_jaxs_allocator_settings():
    assert jax_memory_fraction({}) == (0.75, "JAX's default: it preallocates 75%")
    assert jax_memory_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"})[0] == 0.9
    assert jax_memory_fraction({"XLA_CLIENT_MEM_FRACTION": "0.5"})[0] == 0.5
    # preallocation off: the same pool limit, allocated as needed
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"}
    assert jax_memory_fraction(env)[0] == 0.6
    platform = {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
    assert jax_memory_fraction(platform)[0] == 1.0
    with pytest.raises(ValueError, match="both XLA_PYTHON_CLIENT_MEM_FRACTION and"):
        jax_memory_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9", "XLA_CLIENT_MEM_FRACTION": "0.9"})
    for bad in ("0", "1.5", "most"):
        with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION must be"):
            jax_memory_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": bad})


def test_gpu_trials_get_the_fraction_the_plan_assumes(monkeypatch):
    """The sweep sets XLA_PYTHON_CLIENT_MEM_FRACTION in every GPU trial (``--mem-fraction``,
    else the driver's own setting, else 0.9), and the trial applies it before JAX starts."""
    from sweeps.run import SWEEP_MEM_FRACTION, gpu_jax_env
    from sweeps.trainable import apply_jax_env

    assert gpu_jax_env(None, {}) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{SWEEP_MEM_FRACTION:g}"}
    assert gpu_jax_env("0.8", {"XLA_CLIENT_MEM_FRACTION": "0.5"}) == {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.8"}
    assert gpu_jax_env(None, {"XLA_CLIENT_MEM_FRACTION": "0.5"}) == {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
    assert gpu_jax_env(None, {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"})[
        "XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"
    with pytest.raises(ValueError, match="--mem-fraction must be in"):
        gpu_jax_env("1.2", {})
    node = {"XLA_CLIENT_MEM_FRACTION": "0.3", "PATH": "/bin"}  # a node's own setting
    apply_jax_env(gpu_jax_env(None, {}), node)
    assert node == {"PATH": "/bin", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    assert jax_memory_fraction(node)[0] == SWEEP_MEM_FRACTION


def test_driver_refuses_a_grid_that_cannot_fit(capsys):
    from sweeps.run import check_memory, gpu_jax_env

    trials = _grid("gpu-m").trials
    h100 = {"GPU": 1, "accelerator_type:H100": 1}
    big = [dataclasses.replace(t, train=dataclasses.replace(t.train, batch_size=128)) for t in trials]
    why = check_memory(big, "cuda", h100, None, jax_env=gpu_jax_env(None, {}))
    assert "needs about" in why and "lower batch_size (now 128)" in why
    assert "but has 72 GiB that JAX may use of 80 GiB (XLA_PYTHON_CLIENT_MEM_FRACTION=0.9)" in why
    assert "raise --mem-fraction" in why
    assert check_memory(trials, "cuda", h100, None, jax_env=gpu_jax_env(None, {})) == ""
    assert "of 72 GiB that JAX may use of 80 GiB" in capsys.readouterr().out
    # gpu-m (plan 65.7 GiB, 61.6 measured on an H200) does not fit the 60 GiB JAX preallocates
    # of an H100 by default
    why = check_memory(trials, "cuda", h100, None, jax_env={})
    assert "has 60 GiB that JAX may use of 80 GiB (JAX's default: it preallocates 75%)" in why
    assert check_memory(trials, "cuda", h100, None,
                        jax_env={"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}) == ""
    capsys.readouterr()
    assert check_memory(big, "cuda", {"GPU": 1}, None) == ""  # unknown memory: a note, no check
    assert "--device-memory" in capsys.readouterr().err
    why = check_memory(trials, "tpu", {"TPU": 4}, 16)  # a TPU's whole memory
    assert "needs about" in why and "but has 16 GiB;" in why and "mem-fraction" not in why


def _shapes(name: str):
    """One trial per distinct model shape of a grid (seeds share a shape)."""
    seen, out = set(), []
    for t in _grid(name).trials:
        if t.model.hash() not in seen:
            seen.add(t.model.hash())
            out.append(t)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", GPU_GRIDS)
def test_gpu_presets_take_two_steps_on_the_cpu_at_batch_1(name, tmp_path):
    """Every model shape of the grid builds, trains two steps and evaluates on the CPU."""
    from engram_jax.train import run_trial

    for t in _shapes(name):
        tcfg = dataclasses.replace(t.train, steps=2, batch_size=1, eval_every=2, eval_batches=1,
                                   final_eval_tokens=0, warmup_steps=1, compute_dtype="bfloat16")
        rec = run_trial(t.model, tcfg, corpus="pystdlib", out_dir=tmp_path / t.trial_id,
                        progress=False)
        assert rec["steps"] == 2 and rec["val_loss"] > 0, t.trial_id


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_GRIDS)
def test_gpu_peak_memory_stays_within_the_plan(name, tmp_path):
    """Two steps at the grid's batch on the GPU: XLA's peak is below the plan."""
    import jax

    from engram_jax.train import run_trial

    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    t = _grid(name).trials[-1]
    tcfg = dataclasses.replace(t.train, steps=2, eval_every=2, eval_batches=1, final_eval_tokens=0,
                               warmup_steps=1)
    run_trial(t.model, tcfg, corpus="pystdlib", out_dir=tmp_path / "run", progress=False)
    peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    plan = memory_plan(t.model, tcfg, platform="cuda")
    print(f"{name}: peak {peak / GiB:.2f} GiB, plan {plan['total'] / GiB:.2f} GiB")
    assert peak <= plan["total"], (peak, plan)
    assert peak >= 0.3 * (plan["total"] - WORKSPACE), "the plan is far too pessimistic"


@pytest.mark.gpu
def test_gpu_pool_is_the_fraction_the_plan_assumes():
    """In a process with a GPU trial's allocator settings, JAX's pool (``bytes_limit``) is that
    share of the device's total memory (nvidia-smi), as the plan assumes."""
    import os
    import shutil
    import subprocess
    import sys

    from sweeps.run import SWEEP_MEM_FRACTION, gpu_jax_env
    from sweeps.trainable import apply_jax_env

    if shutil.which("nvidia-smi") is None:
        pytest.skip("needs a GPU (nvidia-smi)")
    total_mib = int(subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True, text=True, check=True).stdout.split()[0])
    env = {**os.environ, "JAX_PLATFORMS": "cuda", "CUDA_VISIBLE_DEVICES": "0"}
    apply_jax_env(gpu_jax_env(None, {}), env)
    code = "import jax; print(jax.devices()[0].memory_stats()['bytes_limit'])"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    limit = int(r.stdout.split()[-1])
    print(f"bytes_limit {limit / GiB:.2f} GiB of {total_mib / 1024:.2f} GiB")
    assert limit == pytest.approx(SWEEP_MEM_FRACTION * total_mib * 2**20, rel=0.02)
