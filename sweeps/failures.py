"""Which errors end a trial for good, and how the grid names them. No Ray and no JAX here.

Tune restarts a trial whose run raised (``--max-failures`` times, from its last checkpoint). That
is what a lost node or worker needs, and a waste for an error that would only happen again: the
trainable (``trainable.py``) catches what its run raised and ends the trial at once with
``final_error``'s reason as its last result, unless the error looks transient (``None``); then it
re-raises and Tune restarts the trial.

Final (the trial ends, its row says why):

- out of memory: ``MemoryError``, and any error whose message carries XLA's ``RESOURCE_EXHAUSTED``
  status or says "out of memory" (a device allocation, or a host allocation larger than the
  machine, on the CPU too);
- ``TrainingDiverged`` (the loss became NaN/Inf: it would again);
- every other error a run raises: a bad config, a shape or compile error, a missing corpus file,
  an incomplete checkpoint.

Transient (restarted): connection and timeout errors, other ``OSError`` (storage I/O; not a
missing file or a refused permission), XLA's ``UNAVAILABLE``, ``ABORTED``, ``CANCELLED``,
``DEADLINE_EXCEEDED`` and ``DATA_LOSS`` statuses, and errors of Ray itself. A worker or node that
dies never reaches the trainable: Tune sees it and restarts the trial. So does a worker killed for
lack of host memory (by Ray's memory monitor or the kernel); an allocation larger than the
machine fails in the process instead, as an out-of-memory error.
"""

from __future__ import annotations

OOM_MARKERS = ("resource_exhausted", "resource exhausted", "out of memory", "oom when allocating",
               "cuda_error_out_of_memory", "cudaerrormemoryallocation")
TRANSIENT_XLA = ("UNAVAILABLE", "ABORTED", "CANCELLED", "DEADLINE_EXCEEDED", "DATA_LOSS")
_CONFIG_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
LINE_LEN = 300  # characters of the error's first line kept in runs.csv


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(m in text for m in OOM_MARKERS)


def is_transient(exc: BaseException) -> bool:
    """An error a restart may get past (see the module docstring)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, _CONFIG_OS_ERRORS):
        return True
    if any(c.__module__.split(".")[0] == "ray" for c in type(exc).__mro__):
        return True
    status = _first_line(exc).split(":", 1)[0].strip()
    return status in TRANSIENT_XLA


def final_error(exc: BaseException, *, batch_size: int | None = None) -> str | None:
    """``"<kind>: <what happened>"`` for an error that ends the trial, None for a transient one.

    The kind (the text before the first colon) is what the grid's summary shows: ``out of
    memory``, ``TrainingDiverged`` or the exception's class name.
    """
    if is_out_of_memory(exc):
        hint = f" (batch_size {batch_size})" if batch_size else ""
        return (f"out of memory: {type(exc).__name__}: {_first_line(exc)}{hint}; not retried (it "
                "would run out again: lower batch_size or seq_len, or use a larger device)")
    if is_transient(exc):
        return None
    names = {c.__name__ for c in type(exc).__mro__}
    if "TrainingDiverged" in names:
        return f"TrainingDiverged: {_first_line(exc)}"
    return f"{type(exc).__name__}: {_first_line(exc)}; not retried (deterministic)"


def error_kind(error: str) -> str:
    """The kind of a runs.csv ``error`` cell (the text before its first colon)."""
    head = error.split(":", 1)[0].strip()
    return head if head and len(head) <= 60 else "error"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else repr(exc)
    return line if len(line) <= LINE_LEN else line[: LINE_LEN - 3] + "..."
