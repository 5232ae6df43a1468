"""Argument checks shared by the per-step CPU tools (``bench.breakdown``, ``bench.profile``).

Nothing here imports NumPy or JAX at module level: ``check_step_arguments`` pins the process to
``--core`` before either starts its threads, which then inherit the pinning, and sets the
trials' malloc settings (``engram_jax.host_malloc``) before JAX's threads make arenas of their own.
"""

from __future__ import annotations

import argparse
import os


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """``--budget``, ``--rho``, ``--core`` and ``--host-malloc``."""
    ap.add_argument("--budget", required=True, help="a CPU budget (engram_jax.allocation.BUDGETS)")
    ap.add_argument("--rho", type=float, default=1.0)
    ap.add_argument("--core", type=int, default=None,
                    help="pin this process to that core before JAX starts (default: all cores)")
    ap.add_argument("--host-malloc", choices=("tuned", "default"), default=None,
                    help="glibc malloc settings, as in trials (default: $ENGRAM_JAX_HOST_MALLOC "
                         "or tuned)")


def check_step_arguments(ap: argparse.ArgumentParser, a: argparse.Namespace, what: str) -> None:
    """Pin to ``--core`` first, then check ``--budget`` (a CPU budget) and ``--rho``; a bad value
    exits with status 2 before any work. ``what`` says why only CPU budgets are accepted."""
    if a.core is not None:
        if a.core not in os.sched_getaffinity(0):
            ap.error(f"--core {a.core} is not one of this process's cores "
                     f"{sorted(os.sched_getaffinity(0))}")
        os.sched_setaffinity(0, {a.core})
    from engram_jax import host_malloc

    try:
        host_malloc.apply_in_process(a.host_malloc, "cpu")  # these tools time CPU steps
    except ValueError as e:  # a bad $ENGRAM_JAX_HOST_MALLOC
        ap.error(str(e))
    from engram_jax.allocation import BUDGETS

    cpu = sorted(k for k, b in BUDGETS.items() if b.device == "cpu")
    if a.budget not in cpu:
        ap.error(f"{what}; got budget {a.budget!r}, CPU budgets: {', '.join(cpu)}")
    if not 0.0 < a.rho <= 1.0:
        ap.error(f"--rho must be in (0, 1], got {a.rho}")
