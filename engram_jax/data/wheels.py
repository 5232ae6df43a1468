"""Wheel corpora: the ``.py`` members of a pinned list of pure-Python wheels.

A wheel corpus (``pywheels-v1``) is defined by a manifest committed next to this module
(``engram_jax/corpora/<name>.json``): each wheel by project name, version, exact file name
(``py3-none-any`` only, so nothing depends on the platform) and SHA-256, plus the corpus
fingerprint those wheels must give. Nothing is installed: members are read straight out of the
wheel zip files, keyed ``wheels/<project>/<member path>``; members that are not ``.py``, not
UTF-8 text, or blank are skipped, and identical contents are kept once (the first key in sorted
order wins), as ``pysrc`` does. The corpus fingerprint is then a function of the pinned wheels
alone: the same on every machine and with any set of installed packages.

Wheels live under ``<cache>/wheels/`` (``<cache>``: ``$ENGRAM_CACHE``, default
``~/.cache/engram-suite``, the root of the token-shard cache). A missing wheel is fetched with
``python -m pip download --no-deps --only-binary :all: <project>==<version>`` (pip's configured
index) into a temporary folder and moved in once its SHA-256 matches the manifest; an offline
machine can have the same files copied there beforehand. A download failure or a wrong SHA-256
raises :class:`CorpusError` (a ``ValueError``) naming the wheel, before any work.

The first resolution reads every member once and writes a member index
(``<cache>/wheels/index-<name>-<digest>.json``, keyed by the manifest's wheel hashes) together with
the size and modification time of each verified wheel; later resolutions read the index and rehash
a wheel only when its size or modification time changed, so a trial start costs milliseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engram_jax.data.readers import SourceFile

MANIFEST_DIR = Path(__file__).resolve().parent.parent / "corpora"
INDEX_VERSION = 1
# The pip that fetches a missing wheel (its configured index, proxy and certificates apply).
PIP_COMMAND: list[str] = [sys.executable, "-m", "pip"]
_PIP_TIMEOUT_S = 900


class CorpusError(ValueError):
    """A built-in corpus that cannot be resolved: a wheel that is missing, fails to download or
    does not match its manifest."""


def manifest_names() -> tuple[str, ...]:
    """Names of the wheel corpora whose manifests ship with the package."""
    return tuple(sorted(p.stem for p in MANIFEST_DIR.glob("*.json")))


def load_manifest(path: str | Path) -> dict:
    """Read and check a wheel-corpus manifest (see :func:`check_manifest`)."""
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorpusError(f"cannot read wheel-corpus manifest {path}: {e}") from None
    return check_manifest(m, str(path))


def check_manifest(m: dict, where: str = "manifest") -> dict:
    """Check a manifest's shape and return it.

    Returns:
      ``{"name", "wheels": [{"project", "version", "filename", "sha256"}, ...], "fingerprint"?}``.
    """
    wheels = m.get("wheels") if isinstance(m, dict) else None
    if not isinstance(wheels, list) or not wheels or not isinstance(m.get("name"), str):
        raise CorpusError(f"{where}: a wheel-corpus manifest needs a name and a list of wheels")
    seen = set()
    for w in wheels:
        if not all(isinstance(w.get(k), str) for k in ("project", "version", "filename", "sha256")):
            raise CorpusError(f"{where}: each wheel needs project, version, filename and sha256: {w}")
        if not w["filename"].endswith("-none-any.whl") or "/" in w["filename"]:
            raise CorpusError(f"{where}: {w['filename']} is not a pure-Python (none-any) wheel")
        if w["project"] in seen:
            raise CorpusError(f"{where}: project {w['project']} is listed twice")
        seen.add(w["project"])
    return m


def wheel_dir(cache_dir: str | Path | None = None) -> Path:
    """Where wheels and member indexes are kept: ``<cache>/wheels``."""
    if cache_dir is None:
        from engram_jax.data.cache import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / "wheels"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _index_path(manifest: dict, wdir: Path) -> Path:
    h = hashlib.sha256(f"index-v{INDEX_VERSION}\n".encode())
    for w in sorted(manifest["wheels"], key=lambda w: w["project"]):
        h.update(f"{w['project']}\0{w['filename']}\0{w['sha256']}\n".encode())
    return wdir / f"index-{manifest['name']}-{h.hexdigest()[:16]}.json"


def _download(w: dict, wdir: Path) -> None:
    """Fetch one wheel with pip into a temporary folder, check it, move it into ``wdir``."""
    req = f"{w['project']}=={w['version']}"
    dest = wdir / w["filename"]
    with tempfile.TemporaryDirectory(dir=wdir, prefix=".download-") as tmp:
        cmd = [*PIP_COMMAND, "download", "--no-deps", "--only-binary", ":all:",
               "--dest", tmp, req]
        print(f"corpus: fetching {w['filename']} (pip download {req})",
              file=sys.stderr, flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
            err = p.stderr.strip().splitlines()[-3:] if p.returncode else []
        except (OSError, subprocess.TimeoutExpired) as e:
            p, err = None, [str(e)]
        got = Path(tmp) / w["filename"]
        if p is None or p.returncode or not got.exists():
            why = " | ".join(err) or (
                f"pip fetched {sorted(x.name for x in Path(tmp).iterdir())}, not {w['filename']}")
            raise CorpusError(
                f"could not download wheel {w['filename']} ({req}): {why}. Place the file in "
                f"{wdir} (it must have SHA-256 {w['sha256']}) to use the corpus offline"
            )
        sha = _sha256_file(got)
        if sha != w["sha256"]:
            raise CorpusError(
                f"downloaded wheel {w['filename']} has SHA-256 {sha}, the manifest pins "
                f"{w['sha256']}: the index serves a different file under that name"
            )
        os.replace(got, dest)


def _verify(w: dict, path: Path) -> None:
    sha = _sha256_file(path)
    if sha != w["sha256"]:
        raise CorpusError(
            f"wheel {path} has SHA-256 {sha}, the manifest pins {w['sha256']}; delete the file "
            "to download it again"
        )


def _wheel_members(project: str, path: Path) -> list[list]:
    """[key, member, size, sha256] of the usable ``.py`` members of one wheel."""
    from engram_jax.data.readers import _decode_text

    out, names = [], set()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename
            if info.is_dir() or not name.endswith(".py") or name in names:
                continue
            names.add(name)
            data = z.read(info)
            if _decode_text(data) is None:
                continue
            out.append([f"wheels/{project}/{name}", name, len(data),
                        hashlib.sha256(data).hexdigest()])
    return out


def _build_index(manifest: dict, wdir: Path) -> dict:
    """Read every wheel once: the deduplicated member list, sorted by key."""
    members = []
    for w in manifest["wheels"]:
        for key, name, size, sha in _wheel_members(w["project"], wdir / w["filename"]):
            members.append([key, w["filename"], name, size, sha])
    members.sort(key=lambda m: m[0])
    seen, kept = set(), []
    for m in members:
        if m[4] not in seen:
            seen.add(m[4])
            kept.append(m)
    return {"version": INDEX_VERSION, "name": manifest["name"], "members": kept}


def _read_index(path: Path) -> dict | None:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("version") == INDEX_VERSION else None


def _trusted(index: dict | None, manifest: dict, wdir: Path) -> bool:
    """Whether every wheel is the file that was verified when the index was written."""
    if index is None:
        return False
    stamps = index.get("stamps", {})
    for w in manifest["wheels"]:
        p = wdir / w["filename"]
        try:
            if stamps.get(w["filename"]) != _stamp(p):
                return False
        except OSError:
            return False
    return True


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_members(manifest: dict, cache_dir: str | Path | None = None) -> list[SourceFile]:
    """The source files (wheel members) of a wheel corpus, fetching and verifying wheels first.

    Raises:
      CorpusError: a wheel that cannot be downloaded or does not match the manifest.
    """
    from engram_jax.data.readers import SourceFile

    wdir = wheel_dir(cache_dir)
    index_path = _index_path(manifest, wdir)
    index = _read_index(index_path)
    if not _trusted(index, manifest, wdir):
        wdir.mkdir(parents=True, exist_ok=True)
        with open(wdir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch and one index build at a time
            index = _read_index(index_path)
            if not _trusted(index, manifest, wdir):
                old = index.get("stamps", {}) if index else {}
                stamps = {}
                for w in manifest["wheels"]:
                    p = wdir / w["filename"]
                    if not p.exists():
                        _download(w, wdir)
                    elif old.get(w["filename"]) != _stamp(p):
                        _verify(w, p)
                    stamps[w["filename"]] = _stamp(p)
                if index is None:
                    index = _build_index(manifest, wdir)
                index["stamps"] = stamps
                _atomic_write(index_path, json.dumps(index, separators=(",", ":")))
    return [SourceFile(key, wdir / fname, "wheel", size, sha, member)
            for key, fname, member, size, sha in index["members"]]


def read_members(files: list[SourceFile], sinks: list[dict] | None = None
                 ) -> Iterator[tuple[str, str]]:
    """(key, text) of wheel members, each wheel opened once while its members are read; the i-th
    sink (when given) gets the i-th member's ``sha256``, ``usable`` and ``size``."""
    from engram_jax.data.readers import _decode_text

    with contextlib.ExitStack() as stack:
        zips: dict[Path, zipfile.ZipFile] = {}
        for i, f in enumerate(files):
            z = zips.get(f.path)
            if z is None:
                z = zips[f.path] = stack.enter_context(zipfile.ZipFile(f.path))
            data = z.read(f.member)
            text = _decode_text(data)
            if sinks is not None:
                sinks[i].update(sha256=hashlib.sha256(data).hexdigest(), usable=text is not None,
                                size=len(data))
            if text is not None:
                yield f.key, text


def write_manifest(path: str | Path, name: str, wheels: list[Path], description: str = "") -> dict:
    """Write a manifest for local wheel files (``project-version-...-none-any.whl``) with the
    fingerprint they resolve to; a maintenance helper, see ``python -m engram_jax.data wheel-manifest``.
    """
    from engram_jax.data.corpus import Corpus

    entries = []
    for p in sorted(Path(w) for w in wheels):
        project, version = p.name.split("-")[:2]
        entries.append({"project": project.lower(), "version": version, "filename": p.name,
                        "sha256": _sha256_file(p)})
    manifest = {"name": name, "description": description, "wheels": entries}
    with tempfile.TemporaryDirectory() as tmp:
        wdir = Path(tmp) / "wheels"
        wdir.mkdir()
        for p in wheels:
            shutil.copy(p, wdir / Path(p).name)
        files = resolve_members(check_manifest(manifest), tmp)
        corpus = Corpus(name, name, files)
        manifest.update(fingerprint=corpus.fingerprint, n_files=len(files),
                        n_bytes=corpus.n_bytes)
    Path(path).write_text(_format_manifest(manifest))
    return manifest


def _format_manifest(m: dict) -> str:
    """JSON with one line per wheel."""
    head = {k: v for k, v in m.items() if k != "wheels"}
    rows = ",\n".join("  " + json.dumps(w) for w in m["wheels"])
    body = json.dumps(head, indent=1)[:-2]
    return f'{body},\n "wheels": [\n{rows}\n ]\n}}\n'



def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m engram_jax.data wheel-manifest",
                                 description="write a wheel-corpus manifest from local wheels")
    ap.add_argument("out", help="manifest path, e.g. engram_jax/corpora/pywheels-v2.json")
    ap.add_argument("wheels", nargs="+", help="pure-Python wheel files")
    ap.add_argument("--name", required=True)
    ap.add_argument("--description", default="")
    a = ap.parse_args(argv)
    m = write_manifest(a.out, a.name, [Path(w) for w in a.wheels], a.description)
    print(f"{a.out}: {len(m['wheels'])} wheels, {m['n_files']} files, {m['n_bytes'] / 1e6:.1f} MB, "
          f"fingerprint {m['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
