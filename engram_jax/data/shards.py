"""Token shards: the work of preparing a corpus, one unit of files at a time (run in workers).

The middle of the data flow of docs/design.md section 2: "corpus files -> byte-level BPE tokenizer
(HF ``tokenizers``, trained on the train split, cached) -> token shards on disk (memmapped
uint16/uint32)". ``build.py`` schedules the work over worker processes and owns the entry folder;
this module holds what one worker does, all of it deterministic for a given unit:

- **Units.** The corpus files, sorted by key, cut into consecutive groups of about ``UNIT_BYTES``
  (:func:`plan_units`): the same cut whatever the number of workers, so the output is too. A unit
  is the grain of parallelism and of resumption. A Parquet file larger than a unit is split by
  row groups (web corpora ship as a few files of gigabytes); other files are never split, so a
  corpus held in one huge JSONL or text file is read by one worker.
- **The scan** (:func:`scan_unit`) reads a unit's documents once: content SHA-256 of each file,
  document count and characters, the document split's statistics, and the unit's candidates for
  the BPE sample.
- **The split** is by document: a document goes to val when a hash of its key falls below
  ``val_fraction``, never by position inside a file, so adding documents moves no other document
  across the split. A tiny corpus still gets one val document (the smallest hash) and keeps at
  least one train document (the largest).
- **The BPE sample** is the train documents in order of a second hash of their key, taken until
  ``bpe_sample_chars`` characters are reached. :class:`BpeSample` keeps only the documents that can
  still be in it (a bounded heap; memory about the budget, never the corpus), and gives exactly
  the selection of sorting every train document by that hash.
- **Tokenization** (:func:`tokenize_unit`) encodes each document whole, follows it with the EOS
  id, and writes the unit's train and val tokens to two raw files, then a marker with the counts.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engram_jax.data.corpus import fingerprint_of
from engram_jax.data.readers import SourceFile, iter_file, iter_files
from engram_jax.data.manifest import CorpusChanged, atomic_write_text

UNIT_BYTES = 64 << 20
ENCODE_BATCH_CHARS = 1_000_000
_ORDINAL_BITS = 32  # a document's ordinal: unit index << 32 | position in the unit

# Set in each worker process (``build.py``): a shared counter of bytes or characters done.
_progress = None


def unit_hash(key: str, salt: str = "split") -> float:
    """A stable pseudo-random number in [0, 1) from a document key."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _parquet_parts(f: SourceFile, unit_bytes: int) -> list[SourceFile]:
    """A large Parquet file as slices of whole row groups of at least ``unit_bytes`` each."""
    import dataclasses

    import pyarrow.parquet as pq

    md = pq.ParquetFile(f.path).metadata
    parts, start, row, first_row, n = [], 0, 0, 0, 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        n += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        row += rg.num_rows
        if n >= unit_bytes or g == md.num_row_groups - 1:
            parts.append(dataclasses.replace(f, part=(start, g + 1, first_row, n)))
            start, first_row, n = g + 1, row, 0
    return parts or [f]


def plan_units(files: list[SourceFile], unit_bytes: int | None = None) -> list[list[SourceFile]]:
    """Consecutive files (in key order) grouped into units of at least ``unit_bytes`` (default
    ``UNIT_BYTES``; the last one smaller), a large Parquet file cut into units of row groups; a
    function of the files alone."""
    unit_bytes = unit_bytes or UNIT_BYTES
    units: list[list[SourceFile]] = []
    cur: list[SourceFile] = []
    n = 0
    for f in files:
        if f.kind == "parquet" and f.size > unit_bytes and f.part is None:
            if cur:
                units.append(cur)
                cur, n = [], 0
            units.extend([p] for p in _parquet_parts(f, unit_bytes))
            continue
        cur.append(f)
        n += f.size
        if n >= unit_bytes:
            units.append(cur)
            cur, n = [], 0
    if cur:
        units.append(cur)
    return units


def _advance(n: int) -> None:
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += n


def _check_stat(files: list[SourceFile]) -> None:
    """A file whose size or time differs from the listing changed after the preparation began."""
    for f in files:
        if f.kind == "wheel" or not f.mtime_ns:
            continue
        try:
            st = os.stat(f.path)
        except OSError as e:
            raise CorpusChanged(f"corpus file {f.key} cannot be read any more ({e})") from None
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise CorpusChanged(f"corpus file {f.key} changed after the preparation began "
                                "(its size or modification time): prepare again once the corpus "
                                "is complete")


def _unit_docs(files: list[SourceFile], sinks: list[dict] | None = None,
               per_file_bytes: bool = False) -> Iterator[tuple[str, str]]:
    """A unit's documents; with ``per_file_bytes`` the progress counter advances by each
    non-wheel file's size once it is read."""
    sinks = sinks if sinks is not None else [{} for _ in files]
    if not per_file_bytes:
        yield from iter_files(files, sinks)
        return
    wheel = [i for i, f in enumerate(files) if f.kind == "wheel"]
    if wheel:
        yield from iter_files(files, sinks)
        _advance(sum(f.size for f in files))
        return
    for f, sink in zip(files, sinks):
        yield from iter_file(f, sink)
        _advance(f.part[3] if f.part is not None else f.size)


class BpeSample:
    """The train documents a BPE sample of ``budget`` characters can still hold.

    The sample is the train documents sorted by ``unit_hash(key, "bpe")``, taken while fewer than
    ``budget`` characters are taken (the last one may cross it). Documents are pushed in any
    order; one is dropped as soon as the documents before it already reach the budget. Which
    documents are train is known only at the end (a corpus without a val document moves its
    smallest-split-hash document there), so while no val document has been seen the smallest one
    is ``held``: its characters do not count towards dropping others.

    Items are (bpe hash, ordinal, characters, key).
    """

    def __init__(self, budget: int):
        self.budget = budget
        self._heap: list[tuple[float, int, int, str]] = []  # (-hash, -ordinal, chars, key)
        self._chars: dict[int, int] = {}  # ordinal -> characters of the documents in the heap
        self._total = 0
        self.held: int | None = None  # ordinal of the document that may yet go to val

    def push(self, item: tuple[float, int, int, str]) -> None:
        u, ordinal, n, key = item
        heapq.heappush(self._heap, (-u, -ordinal, n, key))
        self._chars[ordinal] = n
        self._total += n
        self._trim()

    def hold(self, ordinal: int | None) -> None:
        """Hold this document (None: a val document exists, nothing is held)."""
        self.held = ordinal
        self._trim()

    def _trim(self) -> None:
        while self._heap:
            _, neg_ord, n, _ = self._heap[0]
            slack = 0
            if self.held is not None and self.held != -neg_ord:
                slack = self._chars.get(self.held, 0)
            if self._total - n - slack < self.budget:
                return
            heapq.heappop(self._heap)
            del self._chars[-neg_ord]
            self._total -= n

    def items(self) -> list[tuple[float, int, int, str]]:
        return [(-u, -o, n, k) for u, o, n, k in self._heap]

    def select(self, exclude: int | None = None) -> list[tuple[float, int, int, str]]:
        """The sample, in bpe-hash order, without the document ``exclude`` (moved to val)."""
        out, total = [], 0
        for item in sorted(i for i in self.items() if i[1] != exclude):
            if total >= self.budget:
                break
            out.append(item)
            total += item[2]
        return out


class UnitStats:
    """The statistics of a run of documents in corpus order: counts, the documents with the
    smallest and largest split hash, and the BPE sample's candidates among the train ones."""

    def __init__(self, index: int, val_fraction: float, bpe_budget: int | None):
        self.index, self.val_fraction = index, val_fraction
        self.n_docs = self.n_val = self.n_chars = 0
        self.lo: list | None = None  # [split hash, ordinal, key]
        self.hi: list | None = None
        self.sample = BpeSample(bpe_budget) if bpe_budget else None

    def add(self, key: str, n_chars: int) -> None:
        u = unit_hash(key)
        ordinal = (self.index << _ORDINAL_BITS) | self.n_docs
        self.n_docs += 1
        self.n_chars += n_chars
        new_low = self.lo is None or (u, ordinal) < (self.lo[0], self.lo[1])
        if new_low:
            self.lo = [u, ordinal, key]
        if self.hi is None or u > self.hi[0]:
            self.hi = [u, ordinal, key]
        if u < self.val_fraction:
            self.n_val += 1
            if self.sample is not None and self.sample.held is not None:
                self.sample.hold(None)
        elif self.sample is not None:
            if new_low and self.n_val == 0:  # the smallest split hash so far: it may go to val
                self.sample.hold(ordinal)
            self.sample.push((unit_hash(key, "bpe"), ordinal, n_chars, key))

    def result(self) -> dict:
        return {"index": self.index, "n_docs": self.n_docs, "n_val": self.n_val,
                "n_chars": self.n_chars, "min": self.lo, "max": self.hi,
                "bpe": [list(i) for i in self.sample.items()] if self.sample is not None else None}


def scan_unit(index: int, files: list[SourceFile], val_fraction: float,
              bpe_budget: int | None) -> dict:
    """Read one unit: file hashes, document statistics and BPE candidates.

    Returns:
      ``{"index", "files": [[key, size, sha256 ("" if no documents)]], "n_docs", "n_val",
      "n_chars", "min", "max" ([split hash, ordinal, key] of the extreme documents, or None),
      "bpe": [[bpe hash, ordinal, chars, key]] (None without a budget)}``.
    """
    _check_stat(files)
    sinks = [{} for _ in files]
    stats = UnitStats(index, val_fraction, bpe_budget)
    for key, text in _unit_docs(files, sinks, per_file_bytes=True):
        stats.add(key, len(text))
    rows = [[f.key, s.get("size", f.size), s["sha256"] if s.get("usable") else ""]
            for f, s in zip(files, sinks) if not s.get("skip")]
    return {**stats.result(), "files": rows}


def unit_texts(files: list[SourceFile], keys: set[str]) -> Iterator[str]:
    """The texts of the documents ``keys`` of a unit, in corpus order."""
    for key, text in _unit_docs(files):
        if key in keys:
            yield text


def shard_paths(out: Path, index: int) -> dict[str, Path]:
    """The raw train/val token files and the completion marker of one unit."""
    stem = f"{index:06d}"
    return {"train": out / f"{stem}.train.bin", "val": out / f"{stem}.val.bin",
            "done": out / f"{stem}.json"}


def tokenize_unit(index: int, files: list[SourceFile], tokenizer_path: str, split: dict,
                  eos_id: int, dtype: str, out: str) -> dict:
    """Tokenize one unit into ``out``: ``NNNNNN.train.bin``, ``NNNNNN.val.bin`` (raw tokens, each
    document followed by ``eos_id``) and then the marker ``NNNNNN.json`` with the counts.

    Args:
      split: ``{"val_fraction", "force_val", "force_train"}`` (keys of the documents the tiny-corpus
        rule moves, or None).

    Returns:
      The marker: ``{"index", "train", "val" (tokens), "docs", "chars"}``.
    """
    from tokenizers import Tokenizer

    _check_stat(files)
    tok = Tokenizer.from_file(tokenizer_path)
    tok.encode_special_tokens = True  # not saved in tokenizer.json
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    np_dtype = np.dtype(dtype)
    frac, force_val, force_train = split["val_fraction"], split["force_val"], split["force_train"]
    paths = shard_paths(Path(out), index)
    counts = {"index": index, "train": 0, "val": 0, "docs": 0, "chars": 0}
    with open(paths["train"], "wb") as ftrain, open(paths["val"], "wb") as fval:
        fh = {"train": ftrain, "val": fval}
        for keys, texts in _chunks(_unit_docs(files), ENCODE_BATCH_CHARS):
            parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            for key, enc in zip(keys, encode(texts, add_special_tokens=False)):
                is_val = (unit_hash(key) < frac or key == force_val) and key != force_train
                ids = np.empty(len(enc.ids) + 1, dtype=np_dtype)
                ids[:-1] = enc.ids
                ids[-1] = eos_id
                parts["val" if is_val else "train"].append(ids)
            for s in ("train", "val"):
                if parts[s]:
                    arr = np.concatenate(parts[s])
                    fh[s].write(arr.tobytes())
                    counts[s] += len(arr)
            n = sum(map(len, texts))
            counts["docs"] += len(texts)
            counts["chars"] += n
            _advance(n)
        for f in (ftrain, fval):
            f.flush()
            os.fsync(f.fileno())
    atomic_write_text(paths["done"], json.dumps(counts))
    return counts


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


class ScanMerge:
    """The scan's unit results (:func:`scan_unit`), merged in any order into the corpus's
    statistics, split and BPE sample (:meth:`result`)."""

    def __init__(self, n_units: int, budget: int | None):
        self.rows: list[list | None] = [None] * n_units
        self.n_docs = self.n_val = self.n_chars = 0
        self.lo = self.hi = None
        self.sample = BpeSample(budget) if budget else None

    def add(self, r: dict) -> None:
        self.rows[r["index"]] = r.get("files", [])
        self.n_docs += r["n_docs"]
        self.n_val += r["n_val"]
        self.n_chars += r["n_chars"]
        if r["min"] is not None and (self.lo is None or r["min"][:2] < self.lo[:2]):
            self.lo = r["min"]
        if r["max"] is not None and (self.hi is None or (r["max"][0], -r["max"][1])
                                     > (self.hi[0], -self.hi[1])):
            self.hi = r["max"]
        if self.sample is not None:
            self.sample.hold(self.lo[1] if self.n_val == 0 and self.lo else None)
            for item in r["bpe"]:
                self.sample.push(tuple(item))

    def result(self, spec: str) -> dict:
        if self.n_docs == 0:
            raise ValueError(f"corpus {spec!r} is empty: no UTF-8 text files or non-empty 'text' "
                             "records found")
        if self.n_docs < 2:
            raise ValueError(
                f"corpus {spec!r} has {self.n_docs} document(s): need at least 2 to hold out a "
                "validation document (the split is by document)")
        force_val = self.lo[2] if self.n_val == 0 else None
        force_train = self.hi[2] if self.n_val == self.n_docs else None
        n_docs_val = min(max(self.n_val, 1), self.n_docs - 1)
        if self.sample is None:
            bpe = []
        elif force_train is not None:
            bpe = [[self.hi[1], self.hi[2]]]
        else:
            exclude = self.lo[1] if force_val is not None else None
            bpe = [[o, k] for _, o, _, k in self.sample.select(exclude)]
        rows = [row for unit in self.rows for row in unit]
        return {"fingerprint": fingerprint_of((k, s, h) for k, s, h in rows if h), "rows": rows,
                "n_docs": self.n_docs, "n_docs_val": n_docs_val, "n_chars": self.n_chars,
                "force_val": force_val, "force_train": force_train, "bpe_keys": sorted(bpe)}
