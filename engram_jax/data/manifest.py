"""Corpus manifests: what a prepared corpus looked like on disk, checked by a stat of its files.

Preparing a corpus reads every file once and records, per corpus location (a built-in corpus of
this interpreter, or an absolute path), each file's key, size, modification time and content
SHA-256, and the fingerprint they give (``<cache>/corpora/<name>-<id>.json``). A trial, a grid
load and ``sweeps.run``'s continuation check then stat the files and compare sizes and
modification times with the manifest, never rereading the corpus: a corpus of hundreds of GB
costs a directory walk, not an hour of hashing. Files whose stat differs make the check fail
(:class:`CorpusChanged`, naming them) rather than silently using token streams of another corpus;
``python -m engram_jax.data prepare CORPUS --rescan`` hashes the corpus again (a touched but
unchanged corpus keeps its prepared streams; a changed one is prepared anew beside the old).

The pinned wheel corpora need no manifest: their fingerprint follows from the pinned wheel
hashes, and ``wheels.py`` checks the wheels' sizes and times itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path

from engram_jax.data.corpus import Listing, Stamp, fingerprint_of
from engram_jax.data.wheels import CorpusError

MANIFEST_VERSION = 1


class CorpusChanged(CorpusError):
    """The files of a corpus differ from the manifest of its preparation."""


def safe_name(name: str) -> str:
    """A corpus name made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a unique temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def manifest_path(root: Path, listing: Listing) -> Path:
    return Path(root) / "corpora" / f"{safe_name(listing.name)}-{listing.idkey}.json"


def read_manifest(root: Path, listing: Listing) -> dict | None:
    """The corpus manifest of this location, or None (never prepared here, or unreadable)."""
    try:
        m = json.loads(manifest_path(root, listing).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION:
        return None
    return m


def write_manifest(root: Path, listing: Listing, rows: list[list]) -> dict:
    """Record a corpus as read: rows ``[key, size, mtime_ns, sha256]`` of every listed file
    (sha256 "" for a file without documents: not text, or a duplicate in a built-in corpus)."""
    fingerprint = fingerprint_of((k, s, h) for k, s, _, h in rows if h)
    m = {"version": MANIFEST_VERSION, "name": listing.name, "spec": listing.spec,
         "identity": listing.identity, "fingerprint": fingerprint,
         "n_files": len(rows), "n_bytes": sum(r[1] for r in rows),
         "written": time.strftime("%Y-%m-%d %H:%M:%S"), "files": rows}
    atomic_write_text(manifest_path(root, listing), json.dumps(m, separators=(",", ":")))
    return m


def stamp_digest(stamps) -> str:
    """A short hash of a listing's stamps (detects any change between two stats)."""
    h = hashlib.sha256()
    for key, size, mtime in stamps:
        h.update(f"{key}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def describe_changes(old: list, new) -> str:
    """What differs between two file lists of (key, size, mtime_ns, ...) ("" if nothing)."""
    a = {r[0]: (r[1], r[2]) for r in old}
    b = {r[0]: (r[1], r[2]) for r in new}
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    parts = []

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    if changed:
        k = changed[0]
        what = (f"size {a[k][0]:,} -> {b[k][0]:,} bytes" if a[k][0] != b[k][0]
                else "modification time changed")
        parts.append(f"{len(changed)} file(s) changed: {names(changed)} ({k}: {what})")
    if added:
        parts.append(f"{len(added)} file(s) added: {names(added)}")
    if removed:
        parts.append(f"{len(removed)} file(s) removed: {names(removed)}")
    return "; ".join(parts)


def changed_error(listing: Listing, why: str, when: str = "", *, vocab: str = "V") -> CorpusChanged:
    since = f" on {when}" if when else ""
    return CorpusChanged(
        f"corpus {listing.spec!r} changed since it was prepared{since}: {why}. Its prepared "
        "token streams describe the old files, so they are not used. Prepare it again with "
        f"`python -m engram_jax.data prepare {listing.spec} --vocab {vocab} --rescan` (a corpus "
        "whose contents did not change keeps its streams; the old preparation stays in the "
        "cache), or restore the files (nothing was changed)")


def known_fingerprint(root: Path, listing: Listing, *, rescan: bool = False) -> str | None:
    """The fingerprint of a listed corpus without reading it, or None if it was never prepared
    here (or ``rescan``: it is to be read again).

    Raises:
      CorpusChanged: a manifest exists and the files on disk no longer match it.
    """
    if listing.fingerprint is not None:
        return listing.fingerprint
    m = read_manifest(root, listing)
    if m is None:
        return None
    why = describe_changes(m["files"], listing.stamps)
    if why:
        if rescan:
            return None
        raise changed_error(listing, why, m.get("written", ""))
    return m["fingerprint"]


def merge_rows(stamps: tuple[Stamp, ...], hashes: dict[str, tuple[int, str]]) -> list[list]:
    """Manifest rows: each listed file's stamp with its content hash ("" if it has no
    documents). ``hashes``: key -> (size as read, sha256) of the files that were read.

    Raises:
      CorpusChanged: a file's size as read differs from its stat (it changed while read).
    """
    rows = []
    for key, size, mtime in stamps:
        got = hashes.get(key)
        if got is not None and got[0] != size:
            raise CorpusChanged(f"corpus file {key} changed while it was being read ({size:,} "
                                f"bytes at the start, {got[0]:,} when read): prepare again once "
                                "the corpus is complete")
        rows.append([key, size, mtime, got[1] if got else ""])
    return rows
