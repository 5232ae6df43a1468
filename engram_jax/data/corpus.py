"""Corpora: where the text comes from, as a deterministic stream of (key, text) documents.

The first step of the data flow of docs/design.md section 2 ("corpus files -> byte-level BPE
tokenizer -> ..."; docs/design.md section 3 (Corpora)). Two built-in corpora need no download,
the Python sources of the running interpreter:

- ``pystdlib``: the standard library ``.py`` files (~13 MB), without ``site-packages`` and
  without the ``test``/``tests``/``idle_test`` packages (those hold deliberately odd files:
  bad encodings, generated data).
- ``pysrc``: ``pystdlib`` plus every ``.py`` file under the interpreter's site-packages,
  deduplicated by content (the first file in key order wins). It changes whenever a package is
  installed or upgraded, so its fingerprint differs between machines and over time; resolving it
  prints a warning.

One built-in corpus does not depend on the installation at all:

- ``pywheels-v1``: the ``.py`` members (~142 MB) of 14 pure-Python wheels (``py3-none-any``:
  sympy, Django, transformers, jax, twisted, networkx, dask, pip, setuptools, Pygments, Sphinx,
  docutils, pylint, astroid), each pinned by file name and SHA-256 in
  ``engram_jax/corpora/pywheels-v1.json`` together with the fingerprint they give. The wheels are
  fetched with ``pip download`` into ``$ENGRAM_CACHE/wheels`` on first use (or copied there
  beforehand on an offline machine) and read without installing them; see ``wheels.py``.
  8,479 files after deduplication; 68.8M train and 3.6M validation tokens at vocabulary 512. Its
  fingerprint is the same on every machine and with any packages installed, so science grids use
  it: their results can be reproduced, and a grid continued, on another machine (``sweeps.run``
  refuses to continue a grid on a corpus whose fingerprint differs from its finished rows').

Any other spec is a path: a directory (walked recursively, hidden entries and ``__pycache__``
skipped) or one file. Each file is read by its suffix: ``.jsonl``/``.jsonl.gz`` give one document
per line (a ``"text"`` field), ``.parquet`` one per row (a ``"text"`` column), and any other file is
one document if it decodes as UTF-8 text (files with NUL bytes or invalid UTF-8 are skipped).
Empty or whitespace-only texts are never documents.

Document keys are stable strings (``stdlib/json/decoder.py``, ``shard0.jsonl:17``,
``wheels/sympy/sympy/core/basic.py``); the train/val split hashes them. The fingerprint is a
SHA-256 over the sorted (file key, size, content SHA-256) of the files (wheel members) that
contribute documents, so it changes whenever the corpus does.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import json
import site
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engram_jax.data import wheels as corpus_wheels
from engram_jax.data.wheels import CorpusError

WHEEL_CORPORA = ("pywheels-v1",)
BUILTIN_CORPORA = ("pystdlib", "pysrc", *WHEEL_CORPORA)
PYSRC_WARNING = ("warning: corpus 'pysrc' depends on the installed packages; pywheels-v1 is the "
                 "reproducible corpus")
_warned_pysrc = False

_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file of a corpus: its key, location, reader kind, size and content hash (for a wheel
    member: the wheel's path and the member's name, size and hash)."""

    key: str
    path: Path
    kind: str  # "text" | "jsonl" | "parquet" | "wheel"
    size: int
    sha256: str
    member: str = ""


class Corpus:
    """A named, fingerprinted collection of text documents.

    Args:
      name: short name (used in cache folder names and records).
      spec: what the user passed to :func:`resolve_corpus`.
      files: the contributing files, sorted by key.
    """

    def __init__(self, name: str, spec: str, files: list[SourceFile]):
        self.name = name
        self.spec = spec
        self.files = sorted(files, key=lambda f: f.key)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 hex over the sorted (key, size, content hash) of the corpus files."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.key}\0{f.size}\0{f.sha256}\n".encode())
        return h.hexdigest()

    def documents(self) -> Iterator[tuple[str, str]]:
        """Yield (doc key, text) in a deterministic order (files by key, then position)."""
        for wheel, run in itertools.groupby(self.files, key=lambda f: f.kind == "wheel"):
            if wheel:
                yield from corpus_wheels.read_members(list(run))
            else:
                for f in run:
                    yield from _READERS[f.kind](f)

    @functools.cached_property
    def n_docs(self) -> int:
        """Number of documents (parses record files once)."""
        if all(f.kind in ("text", "wheel") for f in self.files):
            return len(self.files)
        return sum(1 for _ in self.documents())

    @property
    def n_bytes(self) -> int:
        """Total size of the corpus files on disk (of the members, for a wheel corpus)."""
        return sum(f.size for f in self.files)

    def __repr__(self) -> str:
        fp = self.fingerprint[:12]
        return f"Corpus({self.name!r}, files={len(self.files)}, fingerprint={fp})"


# ---------------------------------------------------------------------------------------------
# readers


def _decode_text(data: bytes) -> str | None:
    """The text of a file, or None when it is binary, not UTF-8, or blank."""
    if b"\0" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def _read_text(f: SourceFile) -> Iterator[tuple[str, str]]:
    text = _decode_text(f.path.read_bytes())
    if text is not None:
        yield f.key, text


def _read_jsonl(f: SourceFile) -> Iterator[tuple[str, str]]:
    opener = gzip.open if f.path.name.endswith(".gz") else open
    with opener(f.path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f.path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise ValueError(f'{f.path}:{lineno}: a JSONL corpus needs a "text" field per line')
            text = record["text"]
            if isinstance(text, str) and text.strip():
                yield f"{f.key}:{lineno}", text


def _read_parquet(f: SourceFile) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(
            f'{f.path}: a Parquet corpus needs a "text" column, found {pf.schema_arrow.names}'
        )
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield f"{f.key}:{row}", text
            row += 1


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _source(key: str, path: Path, kind: str | None = None) -> SourceFile | None:
    """Hash one file; None for a text file that holds no usable text."""
    data = path.read_bytes()
    kind = kind or _kind(path)
    if kind == "text" and _decode_text(data) is None:
        return None
    return SourceFile(key, path, kind, len(data), hashlib.sha256(data).hexdigest())


# ---------------------------------------------------------------------------------------------
# discovery


def _walk(root: Path, pattern: str = "*", skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Regular files under root matching pattern, sorted, skipping hidden and excluded dirs."""
    out = []
    for p in root.rglob(pattern):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") or part in _SKIP_DIRS | skip_dirs for part in rel[:-1]):
            continue
        if rel[-1].startswith(".") or not p.is_file():
            continue
        out.append(p)
    return sorted(out)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _site_dirs() -> list[Path]:
    paths = site.getsitepackages() + [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    out: list[Path] = []
    for p in paths:
        rp = Path(p).resolve()
        if rp.is_dir() and rp not in out:
            out.append(rp)
    return out


def _python_sources(include_site_packages: bool) -> list[SourceFile]:
    roots = [("stdlib", _stdlib_dir(), _STDLIB_TEST_DIRS)]
    if include_site_packages:
        for i, d in enumerate(_site_dirs()):
            roots.append(("site-packages" if i == 0 else f"site-packages-{i}", d, frozenset()))
    files, seen = [], set()
    for prefix, root, skip in roots:
        for p in _walk(root, "*.py", skip):
            src = _source(f"{prefix}/{p.relative_to(root).as_posix()}", p, "text")
            if src is not None and src.sha256 not in seen:
                seen.add(src.sha256)
                files.append(src)
    return files


def _path_sources(path: Path) -> list[SourceFile]:
    if path.is_file():
        pairs = [(path.name, path)]
    else:
        pairs = [(p.relative_to(path).as_posix(), p) for p in _walk(path)]
    return [s for key, p in pairs if (s := _source(key, p)) is not None]


def resolve_corpus(spec: str) -> Corpus:
    """Turn a corpus spec into a :class:`Corpus`.

    Args:
      spec: ``"pystdlib"``, ``"pysrc"``, ``"pywheels-v1"``, or a path to a directory / text,
        JSONL or Parquet file.

    Returns:
      The corpus, checked to hold at least one document.

    Raises:
      FileNotFoundError: the spec is neither a built-in name nor an existing path.
      CorpusError (a ValueError): a wheel of a wheel corpus is missing and cannot be downloaded,
        or does not match its manifest, or the corpus does not have the manifest's fingerprint.
      ValueError: the corpus holds no usable text, or a record file is malformed.
    """
    global _warned_pysrc
    spec = str(spec)
    if spec in WHEEL_CORPORA:
        return resolve_wheel_corpus(corpus_wheels.MANIFEST_DIR / f"{spec}.json")
    if spec in BUILTIN_CORPORA:
        name, files = spec, _python_sources(include_site_packages=spec == "pysrc")
        if spec == "pysrc" and not _warned_pysrc:
            _warned_pysrc = True
            print(PYSRC_WARNING, file=sys.stderr, flush=True)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"corpus {spec!r} not found: expected one of {BUILTIN_CORPORA} or an existing "
                "directory / .txt / .jsonl[.gz] / .parquet path"
            )
        name = path.resolve().name.split(".")[0] or "corpus"
        files = _path_sources(path.resolve())
    corpus = Corpus(name, spec, files)
    if next(corpus.documents(), None) is None:
        raise ValueError(
            f"corpus {spec!r} is empty: no UTF-8 text files or non-empty 'text' records found"
            + (f" (python {sys.version.split()[0]})" if spec in BUILTIN_CORPORA else "")
        )
    return corpus


def resolve_wheel_corpus(manifest: str | Path, cache_dir: str | Path | None = None) -> Corpus:
    """The corpus of a wheel-corpus manifest (``wheels.py``), its fingerprint checked.

    Args:
      manifest: path of the manifest (``engram_jax/corpora/<name>.json``).
      cache_dir: cache root (wheels go to ``<cache_dir>/wheels``); default ``$ENGRAM_CACHE`` or
        ``~/.cache/engram-suite``.

    Raises:
      CorpusError: see :func:`resolve_corpus`.
    """
    m = corpus_wheels.load_manifest(manifest)
    corpus = Corpus(m["name"], m["name"], corpus_wheels.resolve_members(m, cache_dir))
    if not corpus.files:
        raise CorpusError(f"corpus {m['name']!r} is empty: its wheels hold no UTF-8 .py files")
    want = m.get("fingerprint")
    if want and corpus.fingerprint != want:
        raise CorpusError(
            f"corpus {m['name']!r} resolved to fingerprint {corpus.fingerprint}, its manifest "
            f"({manifest}) pins {want}"
        )
    return corpus
