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

Two ways in, because glibc fixes its arenas when threads first allocate:

* ``worker_env()``: ``GLIBC_TUNABLES`` for a process about to start (the trials' Ray workers get it
  through the job's ``runtime_env``; glibc reads it at start-up).
* ``apply_in_process()``: the same settings through ``mallopt`` in a running process, effective when
  called before JAX starts its threads (the training CLI, the benchmarks, the tests).

Other C libraries (macOS, musl) are left alone. ``ENGRAM_JAX_HOST_MALLOC=default`` switches both off.
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


def worker_env(requested: str | None = None) -> dict[str, str]:
    """Environment variables for a process about to start: ``{"GLIBC_TUNABLES": ...}`` when the
    setting is tuned and the C library is glibc, else nothing."""
    if setting(requested) != TUNED or not is_glibc():
        return {}
    return {"GLIBC_TUNABLES": merged_tunables(os.environ.get("GLIBC_TUNABLES")),
            "ENGRAM_JAX_HOST_MALLOC": TUNED}


def apply_in_process(requested: str | None = None) -> bool:
    """Set the tuned values with ``mallopt`` in this process; True when applied. Call it before JAX
    runs anything (its thread pool must not have made arenas of its own yet)."""
    if setting(requested) != TUNED or not is_glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
    ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, int(TUNABLES["glibc.malloc.trim_threshold"])) == 1
    return bool(ok)
