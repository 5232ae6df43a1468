"""Reading corpus files: each reader yields a file's documents and hashes the bytes it reads.

``corpus.py`` lists and names the files; this module reads them (docs/design.md section 3
(Corpora)). A text file is one document if it decodes as UTF-8 and is not blank (files with NUL
bytes or invalid UTF-8 are skipped); a ``.jsonl``/``.jsonl.gz`` file gives one document per line
(its ``"text"`` field), a ``.parquet`` file one per row (its ``"text"`` column), possibly a slice of
its row groups; wheel members are read by ``wheels.read_members``. While reading, each reader
reports the file's content SHA-256 (of the bytes on disk: the compressed ones for ``.gz``) and
whether it counts in the corpus fingerprint, so preparing a corpus reads every file once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engram_jax.data import wheels as corpus_wheels


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file of a corpus: its key, location, reader kind, size and content hash ("" until it
    is read, for a path corpus), and modification time (for a wheel member: the wheel's path and
    the member's name, size and hash). ``part``: for a slice of a large Parquet file read by one
    worker, (first row group, row group after the last, number of the first row, bytes)."""

    key: str
    path: Path
    kind: str  # "text" | "jsonl" | "parquet" | "wheel"
    size: int
    sha256: str
    member: str = ""
    mtime_ns: int = 0
    part: tuple[int, int, int, int] | None = None



def _decode_text(data: bytes) -> str | None:
    """The text of a file, or None when it is binary, not UTF-8, or blank."""
    if b"\0" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


class _HashingReader(io.RawIOBase):
    """A binary file that hashes every byte read from it."""

    def __init__(self, fh):
        self.fh, self.sha = fh, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.fh.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
        return n

    def drain(self) -> str:
        """Hash what was not read (a reader may stop early) and return the hex digest."""
        for block in iter(lambda: self.fh.read(1 << 20), b""):
            self.sha.update(block)
        return self.sha.hexdigest()


def _read_text(f: SourceFile, sink: dict) -> Iterator[tuple[str, str]]:
    data = f.path.read_bytes()
    text = _decode_text(data)
    sink.update(sha256=hashlib.sha256(data).hexdigest(), usable=text is not None, size=len(data))
    if text is not None:
        yield f.key, text


def _read_jsonl(f: SourceFile, sink: dict) -> Iterator[tuple[str, str]]:
    with open(f.path, "rb") as raw:
        hr = _HashingReader(raw)
        buf = io.BufferedReader(hr, 1 << 20)
        binary = gzip.GzipFile(fileobj=buf, mode="rb") if f.path.name.endswith(".gz") else buf
        with io.TextIOWrapper(binary, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f.path}:{lineno}: invalid JSON ({e})") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise ValueError(
                        f'{f.path}:{lineno}: a JSONL corpus needs a "text" field per line')
                text = record["text"]
                if isinstance(text, str) and text.strip():
                    yield f"{f.key}:{lineno}", text
            sink.update(sha256=hr.drain(), usable=True, size=raw.tell())


def _read_parquet(f: SourceFile, sink: dict) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(
            f'{f.path}: a Parquet corpus needs a "text" column, found {pf.schema_arrow.names}'
        )
    groups, row = range(pf.num_row_groups), 0
    if f.part is not None:
        groups, row = range(f.part[0], f.part[1]), f.part[2]
    for batch in pf.iter_batches(columns=["text"], batch_size=4096, row_groups=list(groups)):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield f"{f.key}:{row}", text
            row += 1
    if f.part is not None and f.part[0] > 0:
        sink.update(skip=True)  # the file's first part hashes it
        return
    sink.update(sha256=corpus_wheels._sha256_file(f.path), usable=True,
                size=f.path.stat().st_size)


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}


def iter_file(f: SourceFile, sink: dict) -> Iterator[tuple[str, str]]:
    """The documents of one (non-wheel) file; once exhausted, ``sink`` holds its ``sha256``,
    ``usable`` (whether it counts in the fingerprint) and ``size`` as read."""
    return _READERS[f.kind](f, sink)


def iter_files(files: list[SourceFile], sinks: list[dict] | None = None
               ) -> Iterator[tuple[str, str]]:
    """The documents of files in order (wheel members read with their wheel opened once); the
    i-th sink gets the i-th file's hash as in :func:`iter_file`."""
    sinks = sinks if sinks is not None else [{} for _ in files]
    i = 0
    for wheel, run in itertools.groupby(files, key=lambda f: f.kind == "wheel"):
        run = list(run)
        if wheel:
            yield from corpus_wheels.read_members(run, sinks[i : i + len(run)])
        else:
            for f, sink in zip(run, sinks[i : i + len(run)]):
                yield from iter_file(f, sink)
        i += len(run)
