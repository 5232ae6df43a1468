"""Batches from a flat token stream: seeded random train windows and fixed eval windows.

The last host-side step of the data flow of docs/design.md section 2: "seeded random windows
[B, T+1] -> on the host: compressed ids -> n-gram hash ids for each Engram layer [B, T, G]". Hash
ids are computed in a background thread so that hashing overlaps the device step (docs/paper.md
section 1.2: addressing is deterministic from token ids, so it can be prefetched).

A batch is ``{"tokens": int32 [B, T+1], "hash_ids": {layer_id: int32 [B, T, G]}}``; the model reads
``tokens[:, :T]``, the loss targets are ``tokens[:, 1:]``, and hash ids belong to the inputs.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable

import numpy as np

HashFn = Callable[[np.ndarray], dict[int, np.ndarray]]


def window_starts(n_tokens: int, batch_size: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """Start offsets of the B training windows of one step: a function of (seed, step) only.

    Returns:
      int64 [B], each in [0, n_tokens - (T + 1)].
    """
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=batch_size, dtype=np.int64)


def _gather(tokens: np.ndarray, starts_B: np.ndarray, seq_len: int, hash_fn: HashFn | None) -> dict:
    idx_BxT1 = starts_B[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    tokens_BxT1 = np.asarray(tokens[idx_BxT1], dtype=np.int32)
    hash_ids = hash_fn(tokens_BxT1[:, :seq_len]) if hash_fn is not None else {}
    return {"tokens": tokens_BxT1, "hash_ids": hash_ids}


def _train_batch(tokens, batch_size, seq_len, seed, hash_fn, step: int, post_fn=None) -> dict:
    starts_B = window_starts(len(tokens), batch_size, seq_len, seed, step)
    batch = _gather(tokens, starts_B, seq_len, hash_fn)
    return batch if post_fn is None else post_fn(batch)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _produce(make_batch: Callable[[int], dict], step: int, q: queue.Queue, stop) -> None:
    """Worker loop: put the batches of step, step + 1, ... (or a failure) into q until stopped.

    It holds no reference to the iterator, so an iterator dropped without ``close()`` is still
    collected (and its ``__del__`` stops this thread).
    """
    while not stop.is_set():
        try:
            item = make_batch(step)
        except BaseException as e:  # handed to the consumer, which re-raises it
            item = _Failure(e)
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if isinstance(item, _Failure):
            return
        step += 1


def _check_length(n_tokens: int, seq_len: int, what: str) -> None:
    if n_tokens < seq_len + 1:
        raise ValueError(
            f"{what} stream has {n_tokens} tokens, shorter than one window of seq_len + 1 = "
            f"{seq_len + 1}: use a shorter seq_len or a larger corpus / val_fraction"
        )


class BatchIterator:
    """Endless iterator of random training batches, hashed ahead in a background thread.

    The windows of step s depend only on (seed, s), so an iterator built with ``start_step=s``
    yields exactly the batches s, s+1, ... of an uninterrupted run (resumption is exact).

    Args:
      tokens: 1-D token stream (e.g. ``PreparedData.train_tokens``).
      batch_size: B.
      seq_len: T; windows hold T + 1 tokens (inputs plus the shifted targets).
      seed: data seed.
      hash_fn: ids [B, T] -> {layer_id: int32 [B, T, G]} (see ``data.make_hash_fn``); None: ``{}``.
      start_step: step of the first batch.
      prefetch: ready batches kept in the queue; 0 computes each batch in ``__next__``.
      post_fn: batch -> batch, run after hashing in the same (background) thread; offloaded
        Engram tables use it to gather the batch's rows ahead (``offload.HostTables.prefetch``).

    Yields:
      ``{"tokens": int32 [B, T+1], "hash_ids": {layer_id: int32 [B, T, G]}}``. ``self.step`` is the
      step of the next batch. Use as a context manager or call :meth:`close`; errors raised while
      building a batch in the worker are re-raised by ``next()``.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        hash_fn: HashFn | None = None,
        start_step: int = 0,
        prefetch: int = 4,
        post_fn: Callable[[dict], dict] | None = None,
    ):
        _check_length(len(tokens), seq_len, "training")
        if batch_size < 1 or prefetch < 0 or start_step < 0:
            raise ValueError("need batch_size >= 1, prefetch >= 0 and start_step >= 0")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.hash_fn = hash_fn
        self.post_fn = post_fn
        self.step = start_step
        self._closed = False
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._thread: threading.Thread | None = None
        if prefetch > 0:
            make_batch = functools.partial(_train_batch, tokens, batch_size, seq_len, seed, hash_fn,
                                           post_fn=post_fn)
            self._thread = threading.Thread(
                target=_produce, args=(make_batch, start_step, self._queue, self._stop),
                name="batch-prefetch", daemon=True,
            )
            self._thread.start()

    def batch_at(self, step: int) -> dict:
        """The batch of one step (pure: same step, same batch)."""
        return _train_batch(
            self.tokens, self.batch_size, self.seq_len, self.seed, self.hash_fn, step,
            post_fn=self.post_fn,
        )

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            batch = self.batch_at(self.step)
        else:
            item = self._get()
            if isinstance(item, _Failure):
                self.close()
                raise item.exc
            batch = item
        self.step += 1
        return batch

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    try:  # it may have queued its last item just before exiting
                        return self._queue.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("the batch prefetch thread stopped") from None

    def close(self) -> None:
        """Stop the worker thread and drop queued batches (idempotent)."""
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                self._thread.join(timeout=0.05)
            self._thread = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self.close()


def eval_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    n_batches: int,
    hash_fn: HashFn | None = None,
) -> list[dict]:
    """Deterministic evaluation batches: evenly spaced windows over the whole stream.

    Uses min(n_batches, windows_that_fit // B) batches (at least one) of B windows of T + 1
    tokens, spread evenly from the start to the end of the stream; the windows do not overlap
    unless fewer than B windows fit at all, in which case one batch of B evenly spaced,
    overlapping windows is returned.

    Returns:
      A list of batches ``{"tokens": int32 [B, T+1], "hash_ids": {layer_id: int32 [B, T, G]}}``.
    """
    n = len(tokens)
    _check_length(n, seq_len, "evaluation")
    if batch_size < 1 or n_batches < 1:
        raise ValueError("need batch_size >= 1 and n_batches >= 1")
    width = seq_len + 1
    n_eff = max(1, min(n_batches, (n // width) // batch_size))
    count = n_eff * batch_size
    i = np.arange(count, dtype=np.int64)
    starts = (i * (n - width)) // max(count - 1, 1)
    return [
        _gather(tokens, starts[b * batch_size : (b + 1) * batch_size], seq_len, hash_fn)
        for b in range(n_eff)
    ]
