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

Two views of a corpus: :func:`list_corpus` only walks and stats (what a trial compares with the
manifest of a prepared corpus, ``manifest.py``), :func:`resolve_corpus` gives the documents. A
path corpus resolves lazily (its files are hashed while they are read, ``iter_file``); the
built-in Python corpora are hashed when resolved, since deduplication needs the hashes.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import site
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engram_jax.data import wheels as corpus_wheels
from engram_jax.data.readers import SourceFile, _decode_text, iter_file, iter_files
from engram_jax.data.wheels import CorpusError

WHEEL_CORPORA = ("pywheels-v1",)
BUILTIN_CORPORA = ("pystdlib", "pysrc", *WHEEL_CORPORA)
PYSRC_WARNING = ("warning: corpus 'pysrc' depends on the installed packages; pywheels-v1 is the "
                 "reproducible corpus")
_warned_pysrc = False

_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})

Stamp = tuple[str, int, int]  # (key, size in bytes, modification time in ns) of one file


@dataclass(frozen=True)
class Listing:
    """What a stat of a corpus gives, without reading it.

    Attributes:
      name, spec: as for :class:`Corpus`.
      identity: where the corpus lives (a built-in name and its roots, or an absolute path); the
        cache finds a corpus's manifest by it.
      stamps: (key, size, mtime_ns) of every file a change would show in, sorted by key.
      fingerprint: known without reading for a pinned corpus (the wheel corpora), else None.
    """

    name: str
    spec: str
    identity: dict
    stamps: tuple[Stamp, ...]
    fingerprint: str | None = None

    @property
    def idkey(self) -> str:
        """A short hash of the identity."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def n_bytes(self) -> int:
        return sum(s[1] for s in self.stamps)


def fingerprint_of(rows) -> str:
    """SHA-256 hex over (key, size, content hash) rows, sorted by key."""
    h = hashlib.sha256()
    for key, size, sha in sorted(rows):
        h.update(f"{key}\0{size}\0{sha}\n".encode())
    return h.hexdigest()


class Corpus:
    """A named collection of text documents.

    Args:
      name: short name (used in cache folder names and records).
      spec: what the user passed to :func:`resolve_corpus`.
      files: the files to read, sorted by key (for a path corpus: every file found, hashed and
        checked for text only when read).
      listing: the corpus's :class:`Listing` (default: from the files).
    """

    def __init__(self, name: str, spec: str, files: list[SourceFile],
                 listing: Listing | None = None):
        self.name = name
        self.spec = spec
        self.files = sorted(files, key=lambda f: f.key)
        self.listing = listing or Listing(
            name, spec, {"spec": spec}, tuple((f.key, f.size, f.mtime_ns) for f in self.files))

    @property
    def hashed(self) -> bool:
        """Whether every file's content hash is known (else reading computes them)."""
        return all(f.sha256 for f in self.files)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 hex over the sorted (key, size, content hash) of the files with documents
        (reads and hashes every file of a path corpus once; ``prepare`` does it while scanning)."""
        return fingerprint_of((k, size, sha) for k, (size, sha) in self.content_hashes().items())

    def content_hashes(self) -> dict[str, tuple[int, str]]:
        """key -> (size, content SHA-256) of the files with documents (reads a path corpus)."""
        out = {}
        for f in self.files:
            if f.sha256:
                out[f.key] = (f.size, f.sha256)
                continue
            sink: dict = {}
            for _ in iter_file(f, sink):
                pass
            if sink["usable"]:
                out[f.key] = (sink["size"], sink["sha256"])
        return out

    def documents(self) -> Iterator[tuple[str, str]]:
        """Yield (doc key, text) in a deterministic order (files by key, then position)."""
        yield from iter_files(self.files)

    @functools.cached_property
    def n_docs(self) -> int:
        """Number of documents (reads the files of a path corpus once)."""
        if self.hashed and all(f.kind in ("text", "wheel") for f in self.files):
            return len(self.files)
        return sum(1 for _ in self.documents())

    @property
    def n_bytes(self) -> int:
        """Total size of the corpus files on disk (of the members, for a wheel corpus)."""
        return sum(f.size for f in self.files)

    def __repr__(self) -> str:
        fp = self.fingerprint[:12] if self.hashed else "unread"
        return f"Corpus({self.name!r}, files={len(self.files)}, fingerprint={fp})"


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _stat_source(key: str, path: Path, kind: str | None = None) -> SourceFile:
    st = path.stat()
    return SourceFile(key, path, kind or _kind(path), st.st_size, "", mtime_ns=st.st_mtime_ns)


def _source(key: str, path: Path, kind: str | None = None) -> SourceFile | None:
    """Hash one file; None for a text file that holds no usable text."""
    st = path.stat()
    data = path.read_bytes()
    kind = kind or _kind(path)
    if kind == "text" and _decode_text(data) is None:
        return None
    return SourceFile(key, path, kind, len(data), hashlib.sha256(data).hexdigest(),
                      mtime_ns=st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# discovery


def _walk_stat(root: Path, pattern: str = "*",
               skip_dirs: frozenset[str] = frozenset()) -> list[tuple[tuple[str, ...], str, os.stat_result]]:
    """(path parts relative to root, path, stat) of the regular files under root matching
    pattern, in the order of their relative paths' parts, skipping hidden and excluded dirs (not
    entered at all: the standard library holds a site-packages folder). One ``stat`` per file
    (``os.scandir``'s entries know their type): a corpus of many small files is listed in a
    fraction of the time a trial takes to start. Symbolic links to files are followed; symbolic
    links to directories are not entered (as ``os.walk`` does by default)."""
    skip = _SKIP_DIRS | skip_dirs
    out = []
    stack: list[tuple[tuple[str, ...], str]] = [((), str(root))]
    while stack:
        rel, d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                name = e.name
                if name.startswith("."):
                    continue
                try:
                    if e.is_dir():
                        if not e.is_symlink() and name not in skip:
                            stack.append(((*rel, name), e.path))
                    elif fnmatch.fnmatchcase(name, pattern) and e.is_file():
                        out.append(((*rel, name), e.path, e.stat()))
                except OSError:  # vanished, or a link to nowhere
                    continue
    out.sort(key=lambda x: x[0])
    return out


def _walk(root: Path, pattern: str = "*", skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Regular files under root matching pattern, in path order (see ``_walk_stat``)."""
    return [Path(p) for _, p, _ in _walk_stat(root, pattern, skip_dirs)]


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


def _python_roots(include_site_packages: bool) -> list[tuple[str, Path, frozenset[str]]]:
    roots = [("stdlib", _stdlib_dir(), _STDLIB_TEST_DIRS)]
    if include_site_packages:
        for i, d in enumerate(_site_dirs()):
            roots.append(("site-packages" if i == 0 else f"site-packages-{i}", d, frozenset()))
    return roots


def _python_candidates(include_site_packages: bool) -> list[tuple[str, Path]]:
    return [(f"{prefix}/{p.relative_to(root).as_posix()}", p)
            for prefix, root, skip in _python_roots(include_site_packages)
            for p in _walk(root, "*.py", skip)]


def _python_sources(candidates: list[tuple[str, Path]]) -> list[SourceFile]:
    """Hash the candidates; keep the text files, the first of each content in key order."""
    files, seen = [], set()
    for key, p in candidates:
        src = _source(key, p, "text")
        if src is not None and src.sha256 not in seen:
            seen.add(src.sha256)
            files.append(src)
    return files


def _path_files(path: Path) -> list[SourceFile]:
    if path.is_file():
        return [_stat_source(path.name, path)]
    return [SourceFile("/".join(rel), Path(p), _kind(Path(rel[-1])), st.st_size, "",
                       mtime_ns=st.st_mtime_ns) for rel, p, st in _walk_stat(path)]


def _python_identity(spec: str) -> dict:
    roots = _python_roots(spec == "pysrc")
    return {"builtin": spec, "roots": [str(r) for _, r, _ in roots],
            "python": sys.version.split()[0]}


def _stamp(p: Path, key: str) -> Stamp:
    st = p.stat()
    return (key, st.st_size, st.st_mtime_ns)


def _warn(spec: str) -> None:
    global _warned_pysrc
    if spec == "pysrc" and not _warned_pysrc:
        _warned_pysrc = True
        print(PYSRC_WARNING, file=sys.stderr, flush=True)


def _missing(spec: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"corpus {spec!r} not found: expected one of {BUILTIN_CORPORA} or an existing "
        "directory / .txt / .jsonl[.gz] / .parquet path")


def list_corpus(spec: str) -> Listing:
    """Walk and stat a corpus without reading it (a wheel corpus: its wheels, fetched if missing).

    Raises:
      FileNotFoundError: the spec is neither a built-in name nor an existing path.
      CorpusError: a wheel of a wheel corpus is missing and cannot be downloaded.
    """
    spec = str(spec)
    if spec in WHEEL_CORPORA:
        return resolve_corpus(spec).listing
    if spec in BUILTIN_CORPORA:
        _warn(spec)
        stamps = tuple(sorted(_stamp(p, k) for k, p in _python_candidates(spec == "pysrc")))
        return Listing(spec, spec, _python_identity(spec), stamps)
    path = Path(spec).expanduser()
    if not path.exists():
        raise _missing(spec)
    files = _path_files(path.resolve())
    return Listing(_path_name(path), spec, {"path": str(path.resolve())},
                   tuple((f.key, f.size, f.mtime_ns) for f in sorted(files, key=lambda f: f.key)))


def _path_name(path: Path) -> str:
    return path.resolve().name.split(".")[0] or "corpus"


def resolve_corpus(spec: str, *, check_empty: bool = True) -> Corpus:
    """Turn a corpus spec into a :class:`Corpus`.

    Args:
      spec: ``"pystdlib"``, ``"pysrc"``, ``"pywheels-v1"``, or a path to a directory / text,
        JSONL or Parquet file.
      check_empty: read up to the first document to check there is one.

    Returns:
      The corpus: a path corpus lists its files without reading them (they are read, hashed and
      checked for text when its documents are); a built-in one is hashed.

    Raises:
      FileNotFoundError: the spec is neither a built-in name nor an existing path.
      CorpusError (a ValueError): a wheel of a wheel corpus is missing and cannot be downloaded,
        or does not match its manifest, or the corpus does not have the manifest's fingerprint.
      ValueError: the corpus holds no usable text, or a record file is malformed.
    """
    spec = str(spec)
    if spec in WHEEL_CORPORA:
        return resolve_wheel_corpus(corpus_wheels.MANIFEST_DIR / f"{spec}.json")
    if spec in BUILTIN_CORPORA:
        candidates = _python_candidates(include_site_packages=spec == "pysrc")
        files = _python_sources(candidates)
        listing = Listing(spec, spec, _python_identity(spec),
                          tuple(sorted(_stamp(p, k) for k, p in candidates)))
        corpus = Corpus(spec, spec, files, listing)
        _warn(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise _missing(spec)
        files = _path_files(path.resolve())
        listing = Listing(_path_name(path), spec, {"path": str(path.resolve())},
                          tuple((f.key, f.size, f.mtime_ns)
                                for f in sorted(files, key=lambda f: f.key)))
        corpus = Corpus(listing.name, spec, files, listing)
    if check_empty and next(corpus.documents(), None) is None:
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
    files = corpus_wheels.resolve_members(m, cache_dir)
    wdir = corpus_wheels.wheel_dir(cache_dir)
    stamps = tuple(sorted(_stamp(wdir / w["filename"], w["filename"]) for w in m["wheels"]))
    identity = {"wheels": m["name"],
                "pins": sorted(f"{w['filename']}:{w['sha256']}" for w in m["wheels"])}
    corpus = Corpus(m["name"], m["name"], files)
    if not corpus.files:
        raise CorpusError(f"corpus {m['name']!r} is empty: its wheels hold no UTF-8 .py files")
    want = m.get("fingerprint")
    if want and corpus.fingerprint != want:
        raise CorpusError(
            f"corpus {m['name']!r} resolved to fingerprint {corpus.fingerprint}, its manifest "
            f"({manifest}) pins {want}"
        )
    corpus.listing = Listing(m["name"], m["name"], identity, stamps, corpus.fingerprint)
    return corpus
