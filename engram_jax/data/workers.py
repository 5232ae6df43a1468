"""Worker processes for preparing a corpus, and the progress bars that follow them.

``build.py`` runs each unit of work (``shards.scan_unit``, ``shards.tokenize_unit``) here. Workers
are spawned processes, not forked ones (a trial has JAX's threads running), each limited to one
core for the tokenizer (``RAYON_NUM_THREADS=1``, ``TOKENIZERS_PARALLELISM=false``); with one worker
the units run in the calling process. A shared counter of bytes or characters done feeds a tqdm
bar (with its ETA) on stderr while units are in flight.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import threading
import types
from collections.abc import Callable

from engram_jax.data import shards

_POLL_S = 0.2


def default_workers() -> int:
    """The CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Counter:
    """The in-process stand-in for a shared ``multiprocessing.Value``."""

    def __init__(self):
        self.value = 0

    def get_lock(self):
        return contextlib.nullcontext()


class WorkerDied(RuntimeError):
    """A worker process ended in the middle of the work (killed, out of memory)."""


def _init_worker(counter) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    shards._progress = counter


class Workers:
    """N worker processes (or the calling process, for one) with a shared progress counter.

    In the calling process the tokenizer is held to one core (``one_core``), unless one worker
    serves a single unit of a larger pool: then its batch encoding may use every core.

    ``run(fn, tasks, on_result, window)`` calls ``fn(*task)`` for each task and ``on_result``
    with each result in the calling process as it arrives, with at most ``window(i)`` tasks
    started ahead (a callable of the next task's position), updating a tqdm bar from the counter.
    """

    def __init__(self, n: int, *, one_core: bool = True):
        self.n, self.one_core = n, one_core
        self.pool = None
        if n == 1:
            self.counter = _Counter()
            return
        ctx = mp.get_context("spawn")
        self.counter = ctx.Value("q", 0)
        saved = {k: os.environ.get(k) for k in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
        main = sys.modules.get("__main__")
        try:
            os.environ.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            # The workers need nothing from __main__; re-importing a trial's main module
            # (engram_jax.train) would load JAX into every one of them.
            sys.modules["__main__"] = types.ModuleType("__main__")
            self.pool = ctx.Pool(n, initializer=_init_worker, initargs=(self.counter,))
            self._procs = list(self.pool._pool)  # a Pool replaces a dead worker, losing its task
        finally:
            if main is not None:
                sys.modules["__main__"] = main
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run(self, fn: Callable, tasks: list[tuple], on_result: Callable[[dict], None],
            bar=None, ahead: Callable[[int], bool] | None = None) -> None:
        if self.pool is None:
            prev = shards._progress
            shards._progress = self.counter
            try:
                with _one_core() if self.one_core else contextlib.nullcontext():
                    for t in tasks:
                        on_result(_in_thread(fn, t, bar, self.counter))
            finally:
                shards._progress = prev
            return
        queue = list(tasks)
        running = []
        while queue or running:
            while queue and len(running) < 2 * self.n and (ahead is None or ahead(queue[0][0])):
                running.append(self.pool.apply_async(fn, queue.pop(0)))
            if not running:  # nothing may start until an earlier result is taken
                raise RuntimeError("worker window is empty")
            running[0].wait(_POLL_S)
            still = []
            for r in running:
                if r.ready():
                    on_result(r.get())  # re-raises a worker's exception
                else:
                    still.append(r)
            running = still
            _update(bar, self.counter)
            dead = [p for p in self._procs if p.exitcode is not None]
            if dead and running:
                raise WorkerDied(
                    f"a worker process died (exit code {dead[0].exitcode}; killed for memory?) "
                    "while preparing the corpus; run the command again to resume, with fewer "
                    "--workers if memory is short")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _in_thread(fn: Callable, args: tuple, bar, counter):
    """``fn(*args)`` in a thread while this one moves the progress bar."""
    out: dict = {}

    def target():
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # re-raised below, in the caller's thread
            out["error"] = e

    t = threading.Thread(target=target, name="prepare-unit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(_POLL_S)
        _update(bar, counter)
    if "error" in out:
        raise out["error"]
    return out["result"]


@contextlib.contextmanager
def _one_core():
    """The tokenizer's batch encoding on one core in this process (it reads the variable at
    each call)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _update(bar, counter) -> None:
    if bar is not None:
        bar.update(max(0, counter.value - bar.n))


def progress_bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                dynamic_ncols=True, disable=not progress)
