"""Building one cache entry: scan, tokenizer, tokenization; parallel, bounded in memory, resumable.

What ``python -m engram_jax.data prepare`` (and a trial, on first use of a corpus) runs when no
prepared entry exists (docs/design.md section 3 (Corpora); docs/data.md for the user's view):

1. **Scan** every unit of files (``shards.scan_unit``) in N worker processes: content hashes, the
   document split's statistics, the BPE sample's candidates. The fingerprint, the corpus manifest
   (``manifest.py``) and the entry's key follow. An entry with that key already in the cache (the
   same corpus at another path, or a touched but unchanged corpus) is used as it is.
2. **Tokenizer**: the own byte-level BPE is trained on the sample, read back from the units that
   hold it; a user's tokenizer is copied into the entry.
3. **Tokenize** each unit in the workers into raw shard files; the main process appends them, in
   unit order, to ``train.npy`` and ``val.npy`` (data first, the ``.npy`` header written last) and
   deletes each shard once appended. At most a few units per worker are ever ahead of the append,
   so the disk holds the streams plus a few shards.

Everything happens in ``.<entry>.partial`` beside the entry, named from the corpus location and
settings: a build that is killed resumes there (the scan, the tokenizer and every appended unit
are recorded; a unit in progress is redone) and the finished folder is moved into place with
``os.replace``. The output depends only on the corpus and the settings, never on the number of
workers: units are fixed by the file list and appended in order.

The N workers are ``workers.py``'s: spawned processes, one core each.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from engram_jax.data import shards
from engram_jax.data.corpus import Listing, resolve_corpus
from engram_jax.data.manifest import (
    CorpusChanged,
    atomic_write_text,
    merge_rows,
    safe_name,
    stamp_digest,
    write_manifest,
)
from engram_jax.data.tokenizer import EOS_ID, EOS_TOKEN, TokenizerSpec, train_bpe
from engram_jax.data.wheels import CorpusError
from engram_jax.data.workers import Workers, progress_bar

FORMAT_VERSION = 1
NPY_HEADER_BYTES = 128  # a 1-D array's .npy header (format 1.0, padded to 64-byte alignment)


class EntryError(ValueError):
    """A cache entry (or an unfinished build) whose files are missing, unreadable or short."""


def entry_settings(fingerprint: str, vocab_size: int, val_fraction: float,
                   tokenizer: TokenizerSpec | None) -> dict:
    """What the cache key of an entry holds. For the own BPE these are the first versions'
    settings, so entries they built are found and used."""
    from engram_jax.data.tokenizer import bpe_sample_chars

    s = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "vocab_size": int(vocab_size),
         "val_fraction": float(val_fraction)}
    if tokenizer is None:
        s.update(bpe_sample_chars=bpe_sample_chars(vocab_size),
                 tokenizer=f"bytelevel-bpe/{EOS_TOKEN}")
    else:
        s["tokenizer"] = tokenizer.cache_id()
    return s


def _key(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def entry_name(name: str, settings: dict) -> str:
    return f"{safe_name(name)}-v{settings['vocab_size']}-{_key(settings)}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None):
    """An exclusive ``flock`` on ``path`` (released when the file closes, also if killed); when
    another process holds it, ``waiting`` is printed to stderr first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:  # "a": taking the lock changes nothing on disk
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------------
# the token streams


class _Stream:
    """A ``.npy`` file filled in place: 128 bytes kept for the header, tokens appended after it,
    the header written when the length is known."""

    def __init__(self, path: Path, dtype: np.dtype, count: int):
        self.path, self.dtype, self.count = path, np.dtype(dtype), int(count)
        self.fh = open(path, "r+b" if path.exists() else "w+b")
        self.fh.truncate(NPY_HEADER_BYTES + self.count * self.dtype.itemsize)
        self.fh.seek(0, os.SEEK_END)

    def append(self, src: Path, n: int) -> None:
        with open(src, "rb") as fh:
            shutil.copyfileobj(fh, self.fh, 16 << 20)
        self.count += n

    def sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def finish(self) -> None:
        import io

        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (self.count,)})
        header = buf.getvalue()
        assert len(header) == NPY_HEADER_BYTES, len(header)
        self.fh.seek(0)
        self.fh.write(header)
        self.sync()
        self.fh.close()


# ---------------------------------------------------------------------------------------------
# the build


class Build:
    """One entry's build in its ``.partial`` folder (see the module docstring).

    Args:
      listing: the corpus as listed when the preparation began.
      root: the cache root.
      vocab_size, val_fraction: the entry's settings.
      tokenizer: a user's tokenizer, or None for the own BPE.
      workers: processes (1: this one).
      progress: print what happens and tqdm bars to stderr.
      rescan: start over an unfinished build whose corpus changed.
      unit_bytes: the size of a unit of work (default ``shards.UNIT_BYTES``); a resumed build
        keeps the one it began with. It changes nothing in the output.
    """

    def __init__(self, listing: Listing, root: Path, *, vocab_size: int, val_fraction: float,
                 tokenizer: TokenizerSpec | None, workers: int, progress: bool, rescan: bool,
                 unit_bytes: int | None = None):
        self.listing, self.root = listing, Path(root)
        self.vocab_size, self.val_fraction, self.tok = vocab_size, val_fraction, tokenizer
        self.workers, self.progress, self.rescan = workers, progress, rescan
        base = entry_settings("", vocab_size, val_fraction, tokenizer)
        self.state = {"identity": listing.identity, "settings": base,
                      "stamps": stamp_digest(listing.stamps)}
        self.unit_bytes = int(unit_bytes or shards.UNIT_BYTES)
        self.partial = self.root / (f".{safe_name(listing.name)}-v{vocab_size}-"
                                    f"{_key([listing.identity, base])}.partial")
        self.dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
        self.eos_id = tokenizer.eos_id if tokenizer is not None else EOS_ID

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[data] {msg}", file=sys.stderr, flush=True)

    def run(self) -> tuple[Path, bool]:
        """Build (or resume) the entry. Returns (entry path, whether it was built here)."""
        t0 = time.time()
        self._claim_partial()
        corpus = resolve_corpus(self.listing.spec, check_empty=False)
        if stamp_digest(corpus.listing.stamps) != self.state["stamps"]:
            raise CorpusChanged(f"corpus {self.listing.spec!r} changed while the preparation "
                                "began (files added, removed or modified): run it again")
        units = shards.plan_units(corpus.files, self.unit_bytes)
        n = self.workers if len(units) > 1 else 1
        phases: dict[str, float] = {}  # seconds of each step this run (a resumed one skips some)
        with Workers(n, one_core=self.workers == 1) as pool:
            t = time.time()
            phases["start"] = round(t - t0, 2)
            scan = _read_json(self.partial / "scan.json") or self._scan(corpus, units, pool)
            phases["scan"] = round(time.time() - t, 2)
            settings = entry_settings(scan["fingerprint"], self.vocab_size, self.val_fraction,
                                      self.tok)
            entry = self.root / entry_name(self.listing.name, settings)
            if (entry / "meta.json").exists():
                self.log(f"{entry.name}: the corpus is unchanged, its prepared entry is used")
                shutil.rmtree(self.partial, ignore_errors=True)
                return entry, False
            t = time.time()
            if not (self.partial / "tokenizer.json").exists():
                self._tokenizer(units, scan)
            phases["bpe"] = round(time.time() - t, 2)
            t = time.time()
            counts = self._tokenize(units, scan, pool)
            phases["tokenize"] = round(time.time() - t, 2)
        meta = {**settings, "spec": self.listing.spec, "corpus_name": self.listing.name,
                "eos_id": self.eos_id, "dtype": self.dtype.name,
                "n_docs_train": scan["n_docs"] - scan["n_docs_val"],
                "n_docs_val": scan["n_docs_val"], "n_chars": scan["n_chars"],
                "bpe_docs": len(scan["bpe_keys"]) if self.tok is None else 0,
                "n_train_tokens": counts["train"], "n_val_tokens": counts["val"],
                "build_seconds": round(time.time() - t0, 2), "phase_seconds": phases}
        if self.tok is not None:
            meta.update(pad_id=self.tok.pad_id, eos_token=self.tok.eos_token,
                        pad_token=self.tok.pad_token, tokenizer_source=self.tok.source,
                        tokenizer_sha256=self.tok.sha256)
        self._finish(entry, meta, scan, counts)
        return entry, True

    # ---- steps

    def _claim_partial(self) -> None:
        old = _read_json(self.partial / "state.json")
        if old is not None and "unit_bytes" in old:  # a resumed build keeps its units
            self.unit_bytes = old.pop("unit_bytes")
        if self.partial.exists() and old != self.state:
            if old is not None and not self.rescan:
                raise CorpusChanged(
                    f"corpus {self.listing.spec!r} changed since an unfinished preparation began "
                    f"in {self.partial} (files added, removed or modified): pass --rescan to start "
                    "it over, or restore the files to resume it (nothing was changed)")
            shutil.rmtree(self.partial)
        if self.partial.exists():
            self.log(f"resuming the unfinished preparation in {self.partial}")
            return
        self.partial.mkdir(parents=True)
        atomic_write_text(self.partial / "state.json",
                          json.dumps({**self.state, "unit_bytes": self.unit_bytes}))

    def _scan(self, corpus, units, pool: Workers) -> dict:
        from engram_jax.data.tokenizer import bpe_sample_chars

        budget = bpe_sample_chars(self.vocab_size) if self.tok is None else None
        self.log(f"{corpus.name}: scanning {len(corpus.files):,} files "
                 f"({corpus.n_bytes / 1e6:,.1f} MB, {len(units)} units) with {pool.n} worker(s)")
        merge = shards.ScanMerge(len(units), budget)
        bar = progress_bar(corpus.n_bytes, f"scan {corpus.name}", "B", self.progress)
        pool.run(shards.scan_unit, [(i, u, self.val_fraction, budget) for i, u in enumerate(units)],
                 merge.add, bar)
        bar.close()
        scan = merge.result(corpus.spec)
        if self.listing.fingerprint is not None and scan["fingerprint"] != self.listing.fingerprint:
            raise CorpusError(f"corpus {corpus.name!r} read as fingerprint {scan['fingerprint']}, "
                              f"not its pinned {self.listing.fingerprint}")
        if self.listing.fingerprint is None:
            hashes = {k: (size, sha) for k, size, sha in scan["rows"]}
            write_manifest(self.root, self.listing, merge_rows(self.listing.stamps, hashes))
        atomic_write_text(self.partial / "scan.json", json.dumps(scan))
        return scan

    def _tokenizer(self, units, scan: dict) -> None:
        if self.tok is not None:
            shutil.copyfile(self.tok.path, self.partial / "tokenizer.json")
            return
        by_unit: dict[int, set[str]] = {}
        for ordinal, key in scan["bpe_keys"]:
            by_unit.setdefault(ordinal >> shards._ORDINAL_BITS, set()).add(key)
        self.log(f"training BPE V={self.vocab_size} on {len(scan['bpe_keys']):,} train docs")
        texts = (t for i in sorted(by_unit) for t in shards.unit_texts(units[i], by_unit[i]))
        tok = train_bpe(texts, self.vocab_size)
        if tok.get_vocab_size() != self.vocab_size:
            raise ValueError(
                f"corpus {self.listing.spec!r} is too small for vocab_size={self.vocab_size}: BPE "
                f"stopped at {tok.get_vocab_size()} tokens; use a smaller vocab_size or a larger "
                "corpus")
        tmp = self.partial / ".tokenizer.json.tmp"
        tok.save(str(tmp))
        os.replace(tmp, self.partial / "tokenizer.json")

    def _tokenize(self, units, scan: dict, pool: Workers) -> dict:
        out = self.partial / "shards"
        out.mkdir(exist_ok=True)
        prog = _read_json(self.partial / "progress.json") or {"appended": 0, "train": 0, "val": 0}
        # One line per appended unit (its marker), appended before progress.json moves on.
        log_path = self.partial / "units.jsonl"
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        appended = [json.loads(line) for line in lines[:prog["appended"]]]
        done = {}
        for i in range(prog["appended"], len(units)):  # checked before anything is written
            m = self._marker(out, i)
            if m is not None:
                done[i] = m
        if len(lines) != len(appended):  # a line of a unit whose append was cut short
            atomic_write_text(log_path, "".join(json.dumps(m) + "\n" for m in appended))
        for i in range(prog["appended"]):  # leftovers of a build killed right after appending
            for p in shards.shard_paths(out, i).values():
                p.unlink(missing_ok=True)
        streams = {s: _Stream(self.partial / f"{s}.npy", self.dtype, prog[s])
                   for s in ("train", "val")}
        todo = [i for i in range(prog["appended"], len(units)) if i not in done]
        if prog["appended"]:
            self.log(f"{prog['appended']} of {len(units)} units were tokenized before; "
                     f"{len(todo)} to go")

        def append_ready(m: dict | None = None) -> None:
            if m is not None:
                done[m["index"]] = m
            while prog["appended"] in done:
                i = prog["appended"]
                m = done.pop(i)
                paths = shards.shard_paths(out, i)
                for s in ("train", "val"):
                    streams[s].append(paths[s], m[s])
                    streams[s].sync()
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(m) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                appended.append(m)
                prog.update(appended=i + 1, train=streams["train"].count,
                            val=streams["val"].count)
                atomic_write_text(self.partial / "progress.json", json.dumps(prog))
                for p in paths.values():
                    p.unlink(missing_ok=True)

        split = {"val_fraction": self.val_fraction, "force_val": scan["force_val"],
                 "force_train": scan["force_train"]}
        tasks = [(i, units[i], str(self.partial / "tokenizer.json"), split, self.eos_id,
                  self.dtype.name, str(out)) for i in todo]
        chars_done = sum(m["chars"] for m in appended) + sum(m["chars"] for m in done.values())
        self.log(f"tokenizing {scan['n_chars']:,} characters with {pool.n} worker(s)")
        bar = progress_bar(scan["n_chars"], f"tokenize {self.listing.name}", "char", self.progress)
        bar.update(chars_done)
        pool.counter.value = chars_done
        append_ready()
        window = 4 * max(pool.n, 1)
        pool.run(shards.tokenize_unit, tasks, append_ready, bar,
                 ahead=lambda i: i - prog["appended"] < window)
        append_ready()
        bar.close()
        assert prog["appended"] == len(units), (prog["appended"], len(units))
        for s in streams.values():
            s.finish()
        return {"train": streams["train"].count, "val": streams["val"].count,
                "units": appended}

    def _marker(self, out: Path, i: int) -> dict | None:
        """A finished unit's counts, its shard files checked against them (None: not finished)."""
        paths = shards.shard_paths(out, i)
        if not paths["done"].exists():
            return None
        m = _read_json(paths["done"])
        if m is None:
            raise EntryError(f"shard marker {paths['done']} is unreadable: delete {self.partial} "
                             "to prepare the corpus from the start (nothing was changed)")
        for s in ("train", "val"):
            want = m[s] * self.dtype.itemsize
            try:
                got = paths[s].stat().st_size
            except OSError:
                got = None
            if got != want:
                what = "missing" if got is None else f"{got:,} bytes, {want:,} expected"
                raise EntryError(f"shard {paths[s]} is truncated or unreadable ({what}): delete "
                                 f"{self.partial} to prepare the corpus from the start (nothing "
                                 "was changed)")
        return m

    def _finish(self, entry: Path, meta: dict, scan: dict, counts: dict) -> None:
        units = [{"index": m["index"], "train": m["train"], "val": m["val"], "docs": m["docs"],
                  "chars": m["chars"]} for m in counts["units"]]
        manifest = {"corpus": {"name": self.listing.name, "spec": self.listing.spec,
                               "identity": self.listing.identity,
                               "fingerprint": scan["fingerprint"]},
                    "files": scan["rows"], "units": units,
                    "n_train_tokens": counts["train"], "n_val_tokens": counts["val"]}
        atomic_write_text(self.partial / "manifest.json", json.dumps(manifest, separators=(",", ":")))
        for name in ("scan.json", "progress.json", "units.jsonl", "state.json"):
            (self.partial / name).unlink(missing_ok=True)
        shutil.rmtree(self.partial / "shards", ignore_errors=True)
        atomic_write_text(self.partial / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
        with file_lock(self.root / f".{entry.name}.lock"):  # the lock the first versions took
            if (entry / "meta.json").exists():
                shutil.rmtree(self.partial)
                return
            if entry.exists():  # a stale, incomplete entry of an interrupted older build
                shutil.rmtree(entry)
            os.replace(self.partial, entry)
        ph = meta["phase_seconds"]
        self.log(f"prepared {entry}: {counts['train']:,} train and {counts['val']:,} val tokens "
                 f"in {meta['build_seconds']:.0f} s (scan {ph['scan']:.0f} s, tokenizer "
                 f"{ph['bpe']:.0f} s, tokenize {ph['tokenize']:.0f} s)")
