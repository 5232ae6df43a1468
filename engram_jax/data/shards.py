"""Token shards: the document split, BPE training and tokenization of one corpus.

The middle of the data flow of docs/design.md section 2: "corpus files -> byte-level BPE tokenizer
(HF ``tokenizers``, trained on the train split, cached) -> token shards on disk (memmapped
uint16/uint32)". ``cache.py`` owns the cache (keys, locking, atomic moves); this module fills one
entry directory: ``tokenizer.json``, ``train.npy`` and ``val.npy``.

- The split is by document: a document goes to val when a hash of its key falls below
  ``val_fraction``, never by position inside a file, so adding documents moves no other document
  across the split. A tiny corpus still gets one val document (the smallest hash) and keeps at
  least one train document.
- The tokenizer is a byte-level BPE (ByteLevel pre-tokenizer and decoder, ``<|endoftext|>`` as
  id 0) trained on the train split only: on a deterministic, hash-ordered subsample of at most
  ``bpe_sample_chars`` characters of it when the split is larger (``pystdlib``'s ~11.5M train
  characters are subsampled to 8M; its token count grows by under 1%, measured at V = 8192).
- Each document is tokenized whole and followed by ``<|endoftext|>``; the streams concatenate the
  documents of a split in corpus order.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engram_jax.data.corpus import Corpus

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
_ENCODE_BATCH_CHARS = 1_000_000


def _unit_hash(key: str, salt: str = "split") -> float:
    """A stable pseudo-random number in [0, 1) from a document key."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(corpus: Corpus, val_fraction: float) -> tuple[set[str], dict[str, int]]:
    """Split a corpus by document, from a hash of each document key.

    Returns:
      (val doc keys, {doc key: number of characters} for every document).

    Raises:
      ValueError: fewer than two documents (no split can keep both sides non-empty).
    """
    sizes: dict[str, int] = {}
    u: dict[str, float] = {}
    for key, text in corpus.documents():
        sizes[key], u[key] = len(text), _unit_hash(key)
    if len(sizes) < 2:
        raise ValueError(
            f"corpus {corpus.spec!r} has {len(sizes)} document(s): need at least 2 to hold out a "
            "validation document (the split is by document)"
        )
    val = {k for k, x in u.items() if x < val_fraction}
    if not val:
        val = {min(u, key=u.get)}
    if len(val) == len(sizes):
        val.discard(max(u, key=u.get))
    return val, sizes


def bpe_sample(train_sizes: dict[str, int], budget: int) -> set[str]:
    """Train doc keys for BPE training: hash-ordered, up to ``budget`` characters."""
    chosen, total = set(), 0
    for k in sorted(train_sizes, key=lambda k: _unit_hash(k, "bpe")):
        if total >= budget:
            break
        chosen.add(k)
        total += train_sizes[k]
    return chosen


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``<|endoftext|>`` as id 0 (it may stop short of vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID
    # Text that happens to contain "<|endoftext|>" is ordinary text, not a document boundary.
    tok.encode_special_tokens = True
    return tok


def build_shards(corpus: Corpus, settings: dict, out: Path, progress: bool) -> dict:
    """Split, train the tokenizer and write ``tokenizer.json``, ``train.npy``, ``val.npy`` to out.

    Args:
      corpus: the corpus.
      settings: the cache-key settings (``vocab_size``, ``val_fraction``, ``bpe_sample_chars``...).
      out: an empty directory.
      progress: print a line and a tqdm bar to stderr.

    Returns:
      The entry's metadata (settings plus document and token counts).

    Raises:
      ValueError: fewer than two documents, or BPE could not reach ``vocab_size``.
    """
    from tqdm.auto import tqdm

    vocab_size = settings["vocab_size"]
    val_keys, sizes = split_documents(corpus, settings["val_fraction"])
    train_sizes = {k: n for k, n in sizes.items() if k not in val_keys}
    bpe_keys = bpe_sample(train_sizes, settings["bpe_sample_chars"])
    if progress:
        print(f"[data] {corpus!r}: training BPE V={vocab_size} on {len(bpe_keys)} train docs",
              file=sys.stderr)
    tok = train_tokenizer((t for k, t in corpus.documents() if k in bpe_keys), vocab_size)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"corpus {corpus.spec!r} is too small for vocab_size={vocab_size}: BPE stopped at "
            f"{tok.get_vocab_size()} tokens; use a smaller vocab_size or a larger corpus"
        )
    tok.save(str(out / "tokenizer.json"))
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    bar = tqdm(total=sum(sizes.values()), unit="char", unit_scale=True, file=sys.stderr,
               desc=f"tokenize {corpus.name}", disable=not progress)
    with open(out / "train.bin", "wb") as ftrain, open(out / "val.bin", "wb") as fval:
        for keys, texts in _chunks(corpus.documents(), _ENCODE_BATCH_CHARS):
            for key, enc in zip(keys, tok.encode_batch(texts, add_special_tokens=False)):
                ids = np.asarray(enc.ids + [EOS_ID], dtype=dtype)
                (fval if key in val_keys else ftrain).write(ids.tobytes())
            bar.update(sum(map(len, texts)))
    bar.close()
    counts = {s: _bin_to_npy(out / f"{s}.bin", out / f"{s}.npy", dtype) for s in ("train", "val")}
    return {
        **settings,
        "spec": corpus.spec,
        "corpus_name": corpus.name,
        "eos_id": EOS_ID,
        "dtype": np.dtype(dtype).name,
        "n_docs_train": len(train_sizes),
        "n_docs_val": len(val_keys),
        "n_chars": sum(sizes.values()),
        "bpe_docs": len(bpe_keys),
        "n_train_tokens": counts["train"],
        "n_val_tokens": counts["val"],
    }


def _chunks(docs: Iterator[tuple[str, str]], max_chars: int):
    """Group (key, text) pairs into (keys, texts) lists of about ``max_chars`` characters."""
    keys: list[str] = []
    texts: list[str] = []
    n = 0
    for key, text in docs:
        keys.append(key)
        texts.append(text)
        n += len(text)
        if n >= max_chars:
            yield keys, texts
            keys, texts, n = [], [], 0
    if keys:
        yield keys, texts


def _bin_to_npy(src: Path, dst: Path, dtype, chunk: int = 1 << 24) -> int:
    """Copy a raw token file into a .npy file (streamed) and delete the raw file."""
    n = src.stat().st_size // np.dtype(dtype).itemsize
    raw = np.memmap(src, dtype=dtype, mode="r", shape=(n,))
    arr = np.lib.format.open_memmap(dst, mode="w+", dtype=dtype, shape=(n,))
    for i in range(0, n, chunk):
        arr[i : i + chunk] = raw[i : i + chunk]
    arr.flush()
    del raw, arr
    src.unlink()
    return n
