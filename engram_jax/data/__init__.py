"""The input pipeline: corpus -> tokenizer -> token streams on disk -> batches (+ Engram hash ids).

Implements the data flow of one trial (docs/design.md section 2) up to the device batch; how a
user prepares a corpus once and brings a tokenizer is in docs/data.md. The modules, one concern
each:

- ``corpus.py``: where the text comes from (built-in corpora and user paths) as a deterministic
  stream of (key, text) documents; ``wheels.py``: the pinned wheel corpora (``pywheels-v1``).
- ``tokenizer.py``: the own byte-level BPE, or a user's tokenizer with its EOS and pad ids.
- ``manifest.py``: what a prepared corpus looked like (files, sizes, times, hashes), checked by a
  stat of its files.
- ``shards.py``: one unit of work (scan, tokenize) as a worker runs it; ``build.py``: a cache
  entry built from them in parallel, resumably.
- ``cache.py``: the cache of prepared corpora, :func:`prepare` and the cheap checks trials and
  grids run before any work.
- ``batches.py``: seeded training windows and fixed evaluation windows, hashed ahead;
  ``hashids.py``: the Engram hash function of a prepared corpus.
- ``__main__.py``: ``python -m engram_jax.data prepare CORPUS --vocab V ...``.

Callers import from here: ``from engram_jax.data import prepare, make_hash_fn, BatchIterator``.
"""

from engram_jax.data.batches import BatchIterator, eval_batches, window_starts
from engram_jax.data.build import EntryError
from engram_jax.data.cache import (
    PreparedData,
    check_corpus,
    corpus_fingerprint,
    default_cache_dir,
    prepare,
    prepare_entry,
)
from engram_jax.data.corpus import BUILTIN_CORPORA, Corpus, list_corpus, resolve_corpus
from engram_jax.data.hashids import epochs, make_hash_fn
from engram_jax.data.manifest import CorpusChanged
from engram_jax.data.tokenizer import TokenizerError, TokenizerSpec, load_tokenizer_spec
from engram_jax.data.wheels import CorpusError
from engram_jax.data.workers import default_workers

__all__ = [
    "BUILTIN_CORPORA",
    "BatchIterator",
    "Corpus",
    "CorpusChanged",
    "CorpusError",
    "EntryError",
    "PreparedData",
    "TokenizerError",
    "TokenizerSpec",
    "check_corpus",
    "corpus_fingerprint",
    "default_cache_dir",
    "default_workers",
    "epochs",
    "eval_batches",
    "list_corpus",
    "load_tokenizer_spec",
    "make_hash_fn",
    "prepare",
    "prepare_entry",
    "resolve_corpus",
    "window_starts",
]
