"""engram_jax.host_malloc: the tuned glibc settings stop XLA's per-call buffer from being mapped and
faulted in afresh by every call, both ways in (GLIBC_TUNABLES at start-up, mallopt in process);
they are for CPU training only; bad settings are refused before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engram_jax import host_malloc

REPO = Path(__file__).resolve().parent.parent

# A program whose temporary buffer (the [4096, 4096] float32 product, 64 MiB) is larger than a
# glibc thread arena can hold, run a few times; prints the minor page faults per call (the
# fewest of five blocks of calls).
FAULTS = r"""
import os, resource, sys, json
from engram_jax import host_malloc
applied = host_malloc.apply_in_process(sys.argv[1]) if sys.argv[1] != "env" else None
import jax, jax.numpy as jnp
x = jnp.ones((4096, 16)) * 0.01
w = jnp.ones((16, 4096)) * 0.01
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ jnp.ones((4096, 1))))
for _ in range(3):
    f(x, w).block_until_ready()
blocks = []  # faults per call, in blocks of calls (the heap may still grow now and then)
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        v = f(x, w).block_until_ready()
    blocks.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
print(json.dumps({"faults_per_call": min(blocks), "blocks": blocks, "applied": applied,
                  "value": float(v)}))
"""


def _faults(mode: str, extra_env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ENGRAM_JAX_HOST_MALLOC")}
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **(extra_env or {})})
    p = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_malloc.is_glibc(), reason="the settings are glibc's")
def test_tuned_settings_stop_per_call_page_faults():
    pages = 4096 * 4096 * 4 // 4096  # the product's 64 MiB, in 4 KiB pages
    default = _faults("default")
    assert default["applied"] is False
    assert default["faults_per_call"] > 0.5 * pages  # glibc maps and unmaps it every call
    tuned = _faults("tuned")
    assert tuned["applied"] is True
    assert tuned["faults_per_call"] < 0.05 * pages
    # The way trials get it: GLIBC_TUNABLES in the environment a process starts with.
    env = _faults("env", host_malloc.worker_env("tuned"))
    assert env["faults_per_call"] < 0.05 * pages
    assert default["value"] == tuned["value"] == env["value"]  # the computation is the same


def test_settings_and_environment(monkeypatch):
    monkeypatch.delenv("ENGRAM_JAX_HOST_MALLOC", raising=False)
    assert host_malloc.setting() == "tuned" and host_malloc.setting("default") == "default"
    monkeypatch.setenv("ENGRAM_JAX_HOST_MALLOC", "default")
    assert host_malloc.setting() == "default" and host_malloc.setting("tuned") == "tuned"
    assert host_malloc.worker_env() == {} and host_malloc.apply_in_process() is False
    monkeypatch.delenv("ENGRAM_JAX_HOST_MALLOC")
    # Only for CPU training: a process or grid that may use an accelerator keeps glibc's defaults.
    assert host_malloc.worker_env("tuned", "accelerator") == {}
    assert host_malloc.apply_in_process("tuned", "cuda") is False
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert host_malloc.local_platform() == "cuda"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.local_platform() == "cpu"
    if host_malloc.is_glibc():
        assert set(host_malloc.worker_env("tuned", "cpu")) == {"GLIBC_TUNABLES", "ENGRAM_JAX_HOST_MALLOC"}
    monkeypatch.setenv("ENGRAM_JAX_HOST_MALLOC", "default")
    monkeypatch.setenv("ENGRAM_JAX_HOST_MALLOC", "fast")
    with pytest.raises(ValueError, match="'fast': expected one of tuned, default"):
        host_malloc.setting()
    # A malloc tunable the user set keeps the user's value; others are kept as they are.
    merged = host_malloc.merged_tunables("glibc.malloc.arena_max=4:glibc.cpu.hwcaps=-AVX2")
    assert merged.split(":") == ["glibc.malloc.arena_max=4", "glibc.cpu.hwcaps=-AVX2",
                                 "glibc.malloc.mmap_max=0",
                                 f"glibc.malloc.trim_threshold={1 << 30}"]
    assert host_malloc.merged_tunables(None).split(":") == [f"{k}={v}" for k, v in
                                                            host_malloc.TUNABLES.items()]


def test_a_bad_setting_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from engram_jax.train import main as train_main
    from sweeps.run import main as sweep_main

    monkeypatch.setenv("ENGRAM_JAX_HOST_MALLOC", "fast")
    out = tmp_path / "run"
    assert train_main(["--preset", "smoke", "--steps", "1", "--out", str(out)]) == 2
    assert "error: host malloc setting 'fast'" in capsys.readouterr().err
    assert not out.exists()
    results = tmp_path / "results"
    assert sweep_main([str(REPO / "sweeps/grids/smoke.yaml"), "--results", str(results)]) == 2
    assert "error: host malloc setting 'fast'" in capsys.readouterr().err
    assert not results.exists()
