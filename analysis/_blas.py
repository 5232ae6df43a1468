"""Run tiny optimisations with single-threaded BLAS, on the same kernels on every x86-64 CPU.

scipy's L-BFGS-B calls BLAS on 3-vectors; with OpenBLAS's default thread pool on a busy small
machine those calls spin-wait for idle cores and a power-law bootstrap slows down ~15x (measured:
8.4 s vs 0.5 s on a shared 2-core CPU). threadpoolctl is used when installed; otherwise scipy's
bundled OpenBLAS is asked directly; if neither works nothing changes.

:func:`pin_kernels` (called by ``python -m analysis plots`` before numpy loads) makes the fits
behind the figures compute the same bits on every x86-64 CPU (docs/design.md section 10).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.metadata
import os
import sys
from collections.abc import Iterator

# numpy's names of its AVX-512 dispatch targets: grouped by x86-64 level from numpy 2.4 on.
_NPY_AVX512 = {
    "new": "X86_V4 AVX512_ICL AVX512_SPR",
    "old": "AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL "
           "AVX512_SPR",
}


def pin_kernels() -> bool:
    """Pins OpenBLAS to its Haswell kernels and numpy to its AVX2 code, whatever the CPU.

    Both pick their kernels by CPU at load time (OpenBLAS: Haswell, SkylakeX, Zen ...; numpy: AVX2
    or AVX-512 loops for exp, log, power and reductions), and each kernel rounds differently. A fit
    that differs in its last digits is harmless, but the power-law bootstrap's nearly flat fits can
    then settle elsewhere and move a band by pixels: measured here, the memory-scaling figures and
    the ladder changed when only the kernels did. Every x86-64 CPU since 2013 runs the AVX2 code.
    Variables already set in the environment win.

    Returns:
        False, changing nothing, when numpy is already loaded (the settings are read at load).
    """
    if "numpy" in sys.modules:
        return False
    os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")
    try:
        version = tuple(int(v) for v in importlib.metadata.version("numpy").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        version = (0, 0)
    os.environ.setdefault("NPY_DISABLE_CPU_FEATURES",
                          _NPY_AVX512["new" if version >= (2, 4) else "old"])
    return True


def _scipy_openblas():
    import scipy

    libdir = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    for path in glob.glob(os.path.join(libdir, "libscipy_openblas*.so*")):
        try:
            lib = ctypes.CDLL(path)  # already loaded by scipy.optimize: this reuses that copy
            return lib.scipy_openblas_get_num_threads, lib.scipy_openblas_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limits BLAS to one thread inside the block, restoring the previous setting after."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    fns = _scipy_openblas()
    if fns is None:
        yield
        return
    get, set_ = fns
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)
