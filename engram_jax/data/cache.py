"""The cache of prepared corpora and its entry point, :func:`prepare`.

Implements the data flow of one trial (docs/design.md section 2) up to the token streams:
corpus files (``corpus.py``) -> tokenizer (the own byte-level BPE trained on the train split, or
the user's) -> one flat token stream per split on disk (memmapped ``.npy``); ``batches.py`` then
cuts seeded windows and ``hashids.make_hash_fn`` gives the host-side n-gram hash ids.

Entries live under ``$ENGRAM_CACHE`` (default ``~/.cache/engram-suite``; it may be shared
storage), one folder per (corpus fingerprint, vocabulary, split, tokenizer):
``tokenizer.json``, ``train.npy``, ``val.npy``, ``meta.json`` (settings and counts) and
``manifest.json`` (the corpus files and each unit's token counts). A trial finds its entry
without reading the corpus: the corpus manifest (``manifest.py``) gives the fingerprint once a
stat of the files matches it, and the entry is checked for missing or short files
(:class:`EntryError`). Building (``build.py``) happens under a file lock per corpus location, in a
``.partial`` folder moved into place with ``os.replace``: concurrent trials share one build and
never read a partial one, a killed build resumes, and a changed corpus never reuses stale shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

import numpy as np

from engram_jax.data.build import (
    Build,
    EntryError,
    entry_name,
    entry_settings,
    file_lock,
)
from engram_jax.data.corpus import Listing, list_corpus, resolve_corpus
from engram_jax.data.manifest import (
    known_fingerprint,
    merge_rows,
    safe_name,
    write_manifest,
)
from engram_jax.data.tokenizer import TokenizerSpec, load_tokenizer_spec
from engram_jax.data.workers import default_workers
from engram_jax.hashing import compression_table, identity_compression

_COMPRESSION_FILE = "compression-v1.npy"


def default_cache_dir() -> Path:
    """``$ENGRAM_CACHE`` if set, else ``~/.cache/engram-suite``."""
    env = os.environ.get("ENGRAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "engram-suite"


def _damaged(path: Path, what: str) -> EntryError:
    return EntryError(f"cache entry {path} is damaged: {what}; delete the folder to prepare the "
                      "corpus again (nothing was changed)")


def _load_stream(entry: Path, name: str, n: int | None, dtype: str | None) -> np.memmap:
    path = entry / name
    if path.exists() and path.stat().st_size == 0:
        raise _damaged(entry, f"{name} is empty (0 bytes)")
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise _damaged(entry, f"{name} is missing") from None
    except (OSError, ValueError, EOFError) as e:
        raise _damaged(entry, f"{name} is unreadable or truncated ({e})") from None
    if arr.ndim != 1 or (dtype is not None and arr.dtype.name != dtype):
        raise _damaged(entry, f"{name} holds a {arr.dtype} array of shape {arr.shape}, not a "
                              f"1-D {dtype} stream")
    if n is not None and len(arr) != n:
        raise _damaged(entry, f"{name} holds {len(arr):,} tokens, meta.json says {n:,}")
    if len(arr) == 0:
        raise _damaged(entry, f"{name} is empty")
    return arr


class PreparedData:
    """A prepared corpus: tokenizer plus memmapped train/val token streams (one cache entry).

    Attributes:
      tokenizer: the HF ``tokenizers.Tokenizer`` (the own BPE, or the user's).
      train_tokens, val_tokens: 1-D memmapped uint16/uint32 token streams (docs joined by eos).
      vocab_size, eos_id, pad_id (the EOS id unless the tokenizer names a pad token; 0 for the
      own BPE), fingerprint, corpus_name, spec, n_train_tokens, n_val_tokens, cache_path, meta
      (the entry's ``meta.json``).

    Raises:
      EntryError: a file of the entry is missing, unreadable, short or empty.
    """

    def __init__(self, cache_path: Path):
        from tokenizers import Tokenizer

        self.cache_path = p = Path(cache_path)
        try:
            self.meta = json.loads((p / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise _damaged(p, f"meta.json is unreadable ({e})") from None
        try:
            self.tokenizer: Tokenizer = Tokenizer.from_file(str(p / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise _damaged(p, f"tokenizer.json does not load ({e})") from None
        self.tokenizer.encode_special_tokens = True  # not saved in tokenizer.json
        dtype = self.meta.get("dtype")
        self.train_tokens = _load_stream(p, "train.npy", self.meta.get("n_train_tokens"), dtype)
        self.val_tokens = _load_stream(p, "val.npy", self.meta.get("n_val_tokens"), dtype)
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]
        self.pad_id: int = self.meta.get("pad_id", self.eos_id)
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


def _root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _tokenizer(tokenizer, eos_token, vocab_size) -> TokenizerSpec | None:
    if isinstance(tokenizer, TokenizerSpec):
        return tokenizer
    if tokenizer is None:
        if eos_token is not None:
            raise ValueError("--eos-token names the EOS of a user's tokenizer (--tokenizer); the "
                             "own BPE's is <|endoftext|>")
        return None
    return load_tokenizer_spec(tokenizer, eos_token=eos_token, vocab_size=vocab_size)


def prepare_entry(
    spec: str,
    vocab_size: int,
    *,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.05,
    progress: bool = True,
    tokenizer: str | Path | TokenizerSpec | None = None,
    eos_token: str | None = None,
    workers: int | None = None,
    rescan: bool = False,
    unit_bytes: int | None = None,
    listing: Listing | None = None,
) -> tuple[PreparedData, bool]:
    """:func:`prepare`, also saying whether the entry was built by this call."""
    if not 257 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [257, 2**32] (256 bytes + eos), got {vocab_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    tok = _tokenizer(tokenizer, eos_token, vocab_size)
    root = _root(cache_dir)
    if listing is None:
        listing = list_corpus(spec)
    elif listing.spec != str(spec):
        raise ValueError(f"listing is of corpus {listing.spec!r}, not of {spec!r}")

    def ready() -> Path | None:
        fp = known_fingerprint(root, listing, rescan=rescan)
        if fp is None:
            return None
        entry = root / entry_name(listing.name, entry_settings(fp, vocab_size, val_fraction, tok))
        return entry if (entry / "meta.json").exists() else None

    entry = ready()
    if entry is not None:
        return PreparedData(entry), False
    lock = root / f".{safe_name(listing.name)}-{listing.idkey}.lock"
    with file_lock(lock, f"[data] waiting for another process preparing {spec} ({lock})"
                   if progress else None):
        entry = None if rescan else ready()  # another process may have built it meanwhile
        built = False
        if entry is None:
            entry, built = Build(listing, root, vocab_size=vocab_size, val_fraction=val_fraction,
                                 tokenizer=tok, workers=workers, progress=progress,
                                 rescan=rescan, unit_bytes=unit_bytes).run()
    return PreparedData(entry), built


def prepare(spec: str, vocab_size: int, **kwargs) -> PreparedData:
    """Resolve, split, tokenize a corpus (training its tokenizer, or with the user's); cached.

    The first call on a corpus scans and tokenizes it in ``workers`` processes (``build.py``); later
    calls find the entry by a stat of the corpus files against its manifest.

    Args:
      spec: corpus spec for :func:`resolve_corpus` (``"pystdlib"``, ``"pysrc"``,
        ``"pywheels-v1"`` or a path).
      vocab_size: the vocabulary size V (the own BPE's is exactly V, >= 257: 256 bytes + eos; a
        user's tokenizer must have V ids).
      cache_dir: cache root; default :func:`default_cache_dir`.
      val_fraction: expected share of documents held out for validation, in (0, 1).
      progress: show what happens and tqdm bars (with an ETA) on stderr while building.
      tokenizer: a user's ``tokenizer.json`` or Hugging Face tokenizer folder (None: own BPE).
      eos_token: the user's tokenizer's end-of-document token, when its config names none.
      workers: processes that scan and tokenize (default: the CPUs this process may use).
      rescan: read a corpus whose files no longer match its manifest again (unchanged contents
        keep their entry; changed ones get a new entry, the old one is left).
      unit_bytes: bytes of corpus per unit of work (default 64 MiB): the grain of parallelism
        and of resumption; the output does not depend on it.
      listing: the corpus's listing from :func:`check_corpus` moments before, so that a process
        that checked the corpus does not walk and stat its files a second time (None: list it).

    Returns:
      The prepared data, its token streams memmapped from the cache.

    Raises:
      CorpusChanged: the corpus files differ from the manifest of its preparation (no rescan).
      EntryError: the cache entry (or an unfinished build's shard) is damaged.
      TokenizerError: the tokenizer does not load, or disagrees with ``vocab_size``.
      ValueError: bad arguments, fewer than two documents, or a corpus too small for V.
      FileNotFoundError: no such corpus.
    """
    return prepare_entry(spec, vocab_size, **kwargs)[0]


def check_corpus(spec: str, *, cache_dir: str | Path | None = None) -> Listing:
    """A corpus checked before any work, without reading it when it was prepared here: it exists,
    and its files match the manifest of its preparation; else it holds a document.

    Raises:
      FileNotFoundError, CorpusError, CorpusChanged, ValueError (an empty corpus).
    """
    listing = list_corpus(spec)
    if known_fingerprint(_root(cache_dir), listing) is None and spec not in ("pystdlib", "pysrc"):
        resolve_corpus(spec)  # reads up to the first document
    return listing


def corpus_fingerprint(spec: str, *, cache_dir: str | Path | None = None) -> str:
    """The fingerprint of a corpus: from its manifest after a stat of its files, or (never
    prepared here) read and hashed once, its manifest then written.

    Raises:
      CorpusChanged: the files no longer match the manifest of its preparation.
    """
    root = _root(cache_dir)
    listing = list_corpus(spec)
    fp = known_fingerprint(root, listing)
    if fp is not None:
        return fp
    hashes = resolve_corpus(spec, check_empty=False).content_hashes()
    return write_manifest(root, listing, merge_rows(listing.stamps, hashes))["fingerprint"]
