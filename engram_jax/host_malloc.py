"""glibc malloc settings that let XLA's CPU runtime reuse its per-step temporary buffer.

XLA's CPU runtime allocates one temporary buffer per execution of a program (181 MB for a
``cpu-1e13`` train step at batch 32) with ``malloc`` and frees it when the step ends. The step runs
on a thread of XLA's pool, whose glibc arena serves a block that large with ``mmap`` and gives it
back with ``munmap`` on free; the next step maps it again and the kernel faults in and zeroes every
page anew: about 44k page faults per ``cpu-1e13`` step, a third of its time on one core (measured
in ``results/bench/README.md``). With one arena (``arena_max=1``), no ``mmap`` for large blocks
(``mmap_max=0``) and a high trim threshold, a freed block stays in the heap and the next step
reuses it: no page faults, nothing else changed (the numbers a step computes are bit for bit the
same).

The price is memory: blocks that are not at the heap's top are not returned when freed, so a
process that allocates many large arrays of changing sizes grows (a test that builds every
``gpu-m`` shape on the CPU peaked at 20 GB with glibc's defaults and ran out of 23 GB with these).
So the settings are for CPU training only, the case they were made for: a process whose JAX
platform is the CPU, or a grid whose trials ask for no accelerator.

glibc fixes a thread's arena when it first allocates, so the settings must be in place before JAX
starts its threads. Two ways in:

* ``worker_env()``: ``GLIBC_TUNABLES`` for a process about to start (the trials' Ray workers get it
  through the job's ``runtime_env``; glibc reads it at start-up).
* ``apply_in_process()``: the same settings through ``mallopt`` in a running process that has not
  started JAX yet (the training CLI, the benchmarks).

Other C libraries (macOS, musl) are left alone. ``ENGRAM_JAX_HOST_MALLOC=default`` (or
``--host-malloc default``) switches both off.
"""

from __future__ import annotations

import ctypes
import os
import platform

TUNED = "tuned"
DEFAULT = "default"
SETTINGS = (TUNED, DEFAULT)

# glibc tunable -> value; apply_in_process sets the same three with mallopt. The trim threshold
# (1 GiB) is how much freed memory at the heap's top is kept rather than returned to the system.
TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 30),
}
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # <malloc.h>


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def setting(requested: str | None = None) -> str:
    """The effective setting: ``requested`` if given, else ``$ENGRAM_JAX_HOST_MALLOC``, else tuned.
    Raises ValueError for anything but "tuned" or "default"."""
    s = requested or os.environ.get("ENGRAM_JAX_HOST_MALLOC") or TUNED
    if s not in SETTINGS:
        raise ValueError(f"host malloc setting {s!r}: expected one of {', '.join(SETTINGS)}")
    return s


def merged_tunables(existing: str | None) -> str:
    """``existing`` (a GLIBC_TUNABLES value) with TUNABLES added; a malloc tunable the user already
    set keeps the user's value."""
    items = [kv for kv in (existing or "").split(":") if kv]
    have = {kv.split("=", 1)[0] for kv in items}
    items += [f"{k}={v}" for k, v in TUNABLES.items() if k not in have]
    return ":".join(items)


def local_platform() -> str:
    """The JAX platform this process will use, without starting JAX: the first of
    ``$JAX_PLATFORMS``, else "cpu" when no accelerator plugin (CUDA, ROCm, TPU) is installed, else
    "accelerator"."""
    first = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip()
    if first:
        return first
    import importlib.metadata as md

    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in md.distributions()}
    if any(n.startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names):
        return "accelerator"
    return "cpu"


def wanted(requested: str | None, platform: str) -> bool:
    """Whether the tuned settings apply: the setting is tuned, the JAX platform is the CPU and the
    C library is glibc."""
    return setting(requested) == TUNED and platform == "cpu" and is_glibc()


def worker_env(requested: str | None = None, platform: str = "cpu") -> dict[str, str]:
    """Environment variables for a process about to start on ``platform``:
    ``{"GLIBC_TUNABLES": ...}`` when ``wanted``, else nothing."""
    if not wanted(requested, platform):
        return {}
    return {"GLIBC_TUNABLES": merged_tunables(os.environ.get("GLIBC_TUNABLES")),
            "ENGRAM_JAX_HOST_MALLOC": TUNED}


def apply_in_process(requested: str | None = None, platform: str | None = None) -> bool:
    """Set the tuned values with ``mallopt`` in this process when ``wanted`` (``platform``: default
    ``local_platform()``); True when applied. Call it before JAX starts (its thread pool must not
    have made arenas of its own yet)."""
    if not wanted(requested, platform or local_platform()):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
    ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, int(TUNABLES["glibc.malloc.trim_threshold"])) == 1
    return bool(ok)


def release() -> None:
    """Return the heap's free memory to the system (``malloc_trim``). Without ``mmap`` for large
    blocks, the memory of a model that is gone stays in the heap; a process that trains one model
    after another (a notebook, a reused worker) calls this between them."""
    if not is_glibc():
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
