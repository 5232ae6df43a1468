"""Out-of-memory detection in the offload bench (bench/offload.py): recognised by the exception's
type and XLA status, never by a message that happens to mention memory."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import bench.offload as bo
from bench.offload import is_out_of_memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("exc, oom", [
    (MemoryError(), True),
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4096 bytes."), True),
    (jax.errors.JaxRuntimeError("INTERNAL: failed to launch kernel (shared memory config)"), False),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory"), False),  # not from XLA
    (ValueError("memory table shape mismatch"), False),
    (TypeError("unsupported operand for memory"), False),
])
def test_is_out_of_memory_by_type(exc, oom):
    assert is_out_of_memory(exc) is oom


@pytest.mark.parametrize("exc, oom", [
    (MemoryError(), True),
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4096 bytes."), True),
    (ValueError("engram memory rows must be positive"), False),
    (RuntimeError("pinned host memory unavailable"), False),
])
def test_fits_treats_only_oom_as_too_big(monkeypatch, exc, oom):
    def raising(*_a, **_k):
        raise exc

    monkeypatch.setattr(bo, "step_seconds", raising)
    if oom:
        assert bo._fits(None, None, None) is False
    else:
        with pytest.raises(type(exc)):
            bo._fits(None, None, None)


def test_a_real_xla_allocation_failure_is_recognised():
    """A 4 TiB device array under an 8 GiB address-space limit: XLA's own error, in a subprocess."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
        "import jax, jax.numpy as jnp\n"
        "from bench.offload import is_out_of_memory\n"
        "try:\n"
        "    jnp.zeros((1 << 40,), jnp.float32).block_until_ready()\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, is_out_of_memory(e)); sys.exit(0)\n"
        "print('allocated'); sys.exit(1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.split()[-1] == "True", r.stdout
