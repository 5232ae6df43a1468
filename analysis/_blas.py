"""Run tiny optimisations with single-threaded BLAS.

scipy's L-BFGS-B calls BLAS on 3-vectors; with OpenBLAS's default thread pool on a busy small
machine those calls spin-wait for idle cores and a power-law bootstrap slows down ~15x (measured:
8.4 s vs 0.5 s on a shared 2-core CPU). threadpoolctl is used when installed; otherwise scipy's
bundled OpenBLAS is asked directly; if neither works nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from collections.abc import Iterator


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
