"""The input pipeline: corpus -> tokenizer -> token streams on disk -> batches (+ Engram hash ids).

Implements the data flow of one trial (docs/design.md section 2) up to the device batch. The
modules, one concern each:

- ``corpus.py``: where the text comes from (built-in corpora and user paths) as a deterministic
  stream of (key, text) documents; ``wheels.py``: the pinned wheel corpora (``pywheels-v1``).
- ``shards.py``: the document split, BPE training and tokenization into token streams.
- ``cache.py``: the on-disk cache of prepared corpora and :func:`prepare`.
- ``batches.py``: seeded training windows and fixed evaluation windows, hashed ahead.

Callers import from here: ``from engram_jax.data import prepare, make_hash_fn, BatchIterator``.
"""

from engram_jax.data.batches import BatchIterator, eval_batches, window_starts
from engram_jax.data.corpus import BUILTIN_CORPORA, Corpus, resolve_corpus
from engram_jax.data.cache import (
    PreparedData,
    default_cache_dir,
    epochs,
    make_hash_fn,
    prepare,
)

__all__ = [
    "BUILTIN_CORPORA",
    "BatchIterator",
    "Corpus",
    "PreparedData",
    "default_cache_dir",
    "epochs",
    "eval_batches",
    "make_hash_fn",
    "prepare",
    "resolve_corpus",
    "window_starts",
]
