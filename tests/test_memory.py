"""The device-memory plan checked before a GPU/TPU grid starts, and the GPU presets' shapes.

Fast: the plan's parts and scaling, the driver's refusal of a batch that cannot fit. Slow: two
steps of every trial shape of each GPU grid on the CPU at batch 1 (a shape error shows here, not
an hour into a GPU run). GPU: two steps at the grid's own batch, peak memory within the plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engram_jax.memory import GiB, WORKSPACE, memory_plan
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
def test_gpu_grids_fit_an_h100(name):
    for t in _grid(name).trials:
        assert memory_plan(t.model, t.train)["total"] < 80 * GiB, t.trial_id


def test_driver_refuses_a_grid_that_cannot_fit(capsys):
    from sweeps.run import check_memory

    trials = _grid("gpu-m").trials
    big = [dataclasses.replace(t, train=dataclasses.replace(t.train, batch_size=128)) for t in trials]
    why = check_memory(big, "cuda", {"GPU": 1, "accelerator_type:H100": 1}, None)
    assert "needs about" in why and "of 80 GiB" not in why and "lower batch_size (now 128)" in why
    assert check_memory(trials, "cuda", {"accelerator_type:H100": 1}, None) == ""
    assert "of 80 GiB" in capsys.readouterr().out
    assert check_memory(big, "cuda", {"GPU": 1}, None) == ""  # unknown memory: a note, no check
    assert "--device-memory" in capsys.readouterr().err
    assert "needs about" in check_memory(trials, "tpu", {"TPU": 4}, 16)


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
