"""The cache of prepared corpora and its entry point, :func:`prepare`.

Implements the data flow of one trial (docs/design.md section 2) up to the token streams:
corpus files (``corpus.py``) -> byte-level BPE tokenizer trained on the train split -> one flat
token stream per split on disk (memmapped ``.npy``); ``batches.py`` then cuts seeded windows and
``make_hash_fn`` gives the host-side n-gram hash ids (``hashing.py``, in a background thread).
Hashing stays out of the jitted model (docs/paper.md section 1.2).

Shards are cached under ``$ENGRAM_CACHE`` (default ``~/.cache/engram-suite``), keyed by the
corpus fingerprint and tokenizer settings; an entry is built in a temp dir under a file lock and
moved in with ``os.replace``, so concurrent trials share one build and never read a partial one,
and a changed corpus never reuses stale shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engram_jax.data import shards
from engram_jax.data.batches import BatchIterator, eval_batches, window_starts
from engram_jax.data.corpus import BUILTIN_CORPORA, Corpus, resolve_corpus
from engram_jax.hashing import NgramHasher, compress, compression_table, identity_compression

if TYPE_CHECKING:
    from engram_jax.config import EngramConfig

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

FORMAT_VERSION = 1
BPE_SAMPLE_CHARS = 8_000_000
_COMPRESSION_FILE = "compression-v1.npy"


def default_cache_dir() -> Path:
    """``$ENGRAM_CACHE`` if set, else ``~/.cache/engram-suite``."""
    env = os.environ.get("ENGRAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "engram-suite"


class PreparedData:
    """A prepared corpus: tokenizer plus memmapped train/val token streams (one cache entry).

    Attributes:
      tokenizer: the trained HF ``tokenizers.Tokenizer``.
      train_tokens, val_tokens: 1-D memmapped uint16/uint32 token streams (docs joined by eos).
      vocab_size, eos_id (= pad id, 0), fingerprint, corpus_name, spec, n_train_tokens,
      n_val_tokens, cache_path, meta (the entry's ``meta.json``).
    """

    def __init__(self, cache_path: Path):
        from tokenizers import Tokenizer

        self.cache_path = Path(cache_path)
        self.meta = json.loads((self.cache_path / "meta.json").read_text())
        self.tokenizer: Tokenizer = Tokenizer.from_file(str(self.cache_path / "tokenizer.json"))
        self.tokenizer.encode_special_tokens = True  # not saved in tokenizer.json
        self.train_tokens = np.load(self.cache_path / "train.npy", mmap_mode="r")
        self.val_tokens = np.load(self.cache_path / "val.npy", mmap_mode="r")
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]
        self.fingerprint: str = self.meta["fingerprint"]
        self.corpus_name: str = self.meta["corpus_name"]
        self.spec: str = self.meta["spec"]
        self.n_train_tokens = int(self.train_tokens.shape[0])
        self.n_val_tokens = int(self.val_tokens.shape[0])
        self._compression: tuple[np.ndarray, int] | None = None

    def compression(self, enabled: bool = True) -> tuple[np.ndarray, int]:
        """The token compression table (cached next to the tokenizer), or identity if disabled.

        Returns:
          (lookup int64 [V], compressed vocabulary size V').
        """
        if not enabled:
            return identity_compression(self.vocab_size)
        if self._compression is None:
            path = self.cache_path / _COMPRESSION_FILE
            if path.exists():
                lookup = np.load(path)
            else:
                lookup, _ = compression_table(self.tokenizer)
                with contextlib.suppress(OSError):
                    _atomic_save(path, lookup)
            self._compression = (lookup, int(lookup.max()) + 1)
        return self._compression

    def __repr__(self) -> str:
        return (
            f"PreparedData({self.corpus_name!r}, V={self.vocab_size}, "
            f"train={self.n_train_tokens:,} tok, val={self.n_val_tokens:,} tok)"
        )


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


def prepare(
    spec: str,
    vocab_size: int,
    *,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.05,
    progress: bool = True,
) -> PreparedData:
    """Resolve, split, train a tokenizer on and tokenize a corpus; cached on disk.

    Args:
      spec: corpus spec for :func:`resolve_corpus` (``"pystdlib"``, ``"pysrc"``,
        ``"pywheels-v1"`` or a path).
      vocab_size: exact BPE vocabulary size V (>= 257: 256 bytes + ``<|endoftext|>``).
      cache_dir: cache root; default :func:`default_cache_dir`.
      val_fraction: expected share of documents held out for validation, in (0, 1).
      progress: show tqdm progress on stderr while building.

    Returns:
      The prepared data, its token streams memmapped from the cache.

    Raises:
      ValueError: bad arguments, fewer than two documents, or a corpus too small for V.
    """
    if not 257 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [257, 2**32] (256 bytes + eos), got {vocab_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    corpus = resolve_corpus(spec)
    settings = {
        "format": FORMAT_VERSION,
        "fingerprint": corpus.fingerprint,
        "vocab_size": int(vocab_size),
        "val_fraction": float(val_fraction),
        "bpe_sample_chars": BPE_SAMPLE_CHARS,
        "tokenizer": f"bytelevel-bpe/{shards.EOS_TOKEN}",
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = root / f"{re.sub(r'[^A-Za-z0-9_-]+', '_', corpus.name)}-v{vocab_size}-{key}"
    if not (entry / "meta.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{entry.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (entry / "meta.json").exists():
                _build_entry(corpus, settings, entry, progress)
    return PreparedData(entry)


def _build_entry(corpus: Corpus, settings: dict, entry: Path, progress: bool) -> None:
    """Build one cache entry in a temp dir, then move it into place atomically."""
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        t0 = time.time()
        meta = shards.build_shards(corpus, settings, tmp, progress)
        meta["build_seconds"] = round(time.time() - t0, 2)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if entry.exists():  # a stale, incomplete entry from an interrupted older build
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_hash_fn(
    engram_cfg: EngramConfig | None, data: PreparedData | None, vocab_size: int
) -> Callable[[np.ndarray], dict[int, np.ndarray]]:
    """The host-side hash function of a model's Engram layers: raw token ids -> hash ids.

    Args:
      engram_cfg: the model's ``EngramConfig`` (None: no Engram, the function returns ``{}``).
      data: the prepared data whose tokenizer defines the compression (None: identity).
      vocab_size: the model's vocabulary size V.

    Returns:
      fn(ids int [B, T]) -> {layer_id: int32 [B, T, G]}, G = (max_ngram - 1) * heads_per_ngram.
    """
    if engram_cfg is None:
        return lambda ids_BxT: {}
    if data is not None and data.vocab_size != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} differs from the data's {data.vocab_size}")
    if data is None or not engram_cfg.compress:
        lookup, v_compressed = identity_compression(vocab_size)
    else:
        lookup, v_compressed = data.compression(True)
    eos_id = data.eos_id if data is not None else shards.EOS_ID
    hasher = NgramHasher(
        vocab_size=v_compressed,
        table_sizes=engram_cfg.table_sizes,
        max_ngram=engram_cfg.max_ngram,
        heads_per_ngram=engram_cfg.heads_per_ngram,
        layer_ids=engram_cfg.layer_ids,
        pad_id=int(lookup[eos_id]),
        seed=engram_cfg.seed,
    )
    top = max(p for per_order in hasher.primes.values() for heads in per_order for p in heads)
    assert top < 2**31, f"hash table prime {top} does not fit int32"

    def hash_fn(ids_BxT: np.ndarray) -> dict[int, np.ndarray]:
        hashed = hasher(compress(lookup, ids_BxT))
        return {lid: h_BxTxG.astype(np.int32) for lid, h_BxTxG in hashed.items()}

    return hash_fn


def epochs(n_tokens_seen: int, data: PreparedData) -> float:
    """Passes over the training split: tokens seen / train tokens."""
    return n_tokens_seen / data.n_train_tokens
