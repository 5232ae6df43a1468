"""Wheel corpora (engram_jax/data/wheels.py): pinned pure-Python wheels read without installing."""

import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from engram_jax.data import corpus as corpus_lib
from engram_jax.data import wheels as corpus_wheels
from engram_jax.data.corpus import Corpus, CorpusError, resolve_corpus, resolve_wheel_corpus

A = "def a():\n    return 1\n"
B = "class B:\n    pass\n"
SHARED = "# the same file in both wheels\nX = 1\n"


def _wheel(path: Path, members: dict[str, bytes | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def wheels(tmp_path):
    """Two tiny wheels in tmp_path/src and a manifest pinning them (no fingerprint yet)."""
    w1 = _wheel(tmp_path / "src" / "alpha-1.0-py3-none-any.whl", {
        "alpha/__init__.py": A,
        "alpha/b.py": B,
        "alpha/copy_of_a.py": A,                      # same content: kept once
        "alpha/shared.py": SHARED,
        "alpha/data.json": '{"not": "python"}',       # not .py
        "alpha/README.txt": "text, not .py",
        "alpha/binary.py": b"x = 1\0\1\2",            # NUL bytes
        "alpha/latin1.py": "s = 'caf\xe9'\n".encode("latin-1"),  # not UTF-8
        "alpha/blank.py": "  \n",
        "alpha-1.0.dist-info/METADATA": "Name: alpha\n",
    })
    w2 = _wheel(tmp_path / "src" / "beta-2.0-py3-none-any.whl", {
        "beta/core.py": "import alpha\n",
        "beta/shared.py": SHARED,                      # duplicate of alpha/shared.py
    })
    manifest = {"name": "tiny-v1", "wheels": [
        {"project": p, "version": v, "filename": w.name, "sha256": _sha(w)}
        for p, v, w in (("alpha", "1.0", w1), ("beta", "2.0", w2))]}
    return tmp_path, [w1, w2], manifest


def _place(wheel_files, cache: Path) -> None:
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    for w in wheel_files:
        shutil.copy(w, cache / "wheels" / w.name)


def _write(manifest: dict, path: Path) -> Path:
    path.write_text(json.dumps(manifest))
    return path


def _failing_pip(monkeypatch, message="no network"):
    monkeypatch.setattr(corpus_wheels, "PIP_COMMAND", [
        sys.executable, "-c", f"import sys; print({message!r}, file=sys.stderr); sys.exit(1)"])


def test_members_read_skipped_and_deduplicated(wheels):
    tmp, files, manifest = wheels
    _place(files, tmp / "cache")
    c = resolve_wheel_corpus(_write(manifest, tmp / "m.json"), tmp / "cache")
    docs = dict(c.documents())
    assert list(docs) == [
        "wheels/alpha/alpha/__init__.py",   # copy_of_a.py has the same content and a later key
        "wheels/alpha/alpha/b.py",
        "wheels/alpha/alpha/shared.py",     # beta/shared.py is its duplicate
        "wheels/beta/beta/core.py",
    ]
    assert docs["wheels/alpha/alpha/__init__.py"] == A and docs["wheels/alpha/alpha/b.py"] == B
    assert c.n_docs == 4 and c.n_bytes == sum(len(t.encode()) for t in docs.values())
    assert c.name == "tiny-v1" and all(f.kind == "wheel" for f in c.files)


def test_fingerprint_deterministic_and_index_reused(wheels, monkeypatch):
    tmp, files, manifest = wheels
    _place(files, tmp / "c1")
    _place(files, tmp / "c2")
    mpath = _write(manifest, tmp / "m.json")
    first = resolve_wheel_corpus(mpath, tmp / "c1")
    other_cache = resolve_wheel_corpus(mpath, tmp / "c2")
    assert first.fingerprint == other_cache.fingerprint

    def no_rebuild(*a, **k):
        raise AssertionError("the member index was rebuilt")

    monkeypatch.setattr(corpus_wheels, "_build_index", no_rebuild)
    monkeypatch.setattr(corpus_wheels, "_sha256_file", no_rebuild)  # verified wheels are trusted
    again = resolve_wheel_corpus(mpath, tmp / "c1")
    assert again.fingerprint == first.fingerprint
    assert dict(again.documents()) == dict(first.documents())

    # The fingerprint pinned in the manifest is checked.
    assert resolve_wheel_corpus(_write({**manifest, "fingerprint": first.fingerprint},
                                       tmp / "m2.json"), tmp / "c1").fingerprint == first.fingerprint
    with pytest.raises(CorpusError, match=r"resolved to fingerprint .* pins 0000"):
        resolve_wheel_corpus(_write({**manifest, "fingerprint": "0000"}, tmp / "m3.json"),
                             tmp / "c1")


def test_sha_mismatch_is_a_clear_error(wheels):
    tmp, files, manifest = wheels
    _place(files, tmp / "cache")
    bad = tmp / "cache" / "wheels" / files[1].name
    _wheel(bad, {"beta/core.py": "import os\n"})  # same name, other content
    with pytest.raises(CorpusError, match=rf"wheel .*{files[1].name} has SHA-256 [0-9a-f]{{64}}, "
                                          rf"the manifest pins {manifest['wheels'][1]['sha256']}"):
        resolve_wheel_corpus(_write(manifest, tmp / "m.json"), tmp / "cache")


def test_changed_wheel_after_indexing_is_rehashed(wheels):
    tmp, files, manifest = wheels
    _place(files, tmp / "cache")
    mpath = _write(manifest, tmp / "m.json")
    resolve_wheel_corpus(mpath, tmp / "cache")
    w = tmp / "cache" / "wheels" / files[0].name
    _wheel(w, {"alpha/__init__.py": "changed = True\n"})
    os.utime(w, ns=(1, 1))
    with pytest.raises(CorpusError, match=f"{files[0].name} has SHA-256"):
        resolve_wheel_corpus(mpath, tmp / "cache")


def test_missing_wheel_and_failed_pip_is_a_clear_error(wheels, monkeypatch):
    tmp, files, manifest = wheels
    _place(files[:1], tmp / "cache")  # beta is missing
    _failing_pip(monkeypatch, "ERROR: network is unreachable")
    with pytest.raises(CorpusError, match=(
            rf"could not download wheel {files[1].name} \(beta==2.0\): ERROR: network is "
            rf"unreachable\. Place the file in .*wheels \(it must have SHA-256 ")):
        resolve_wheel_corpus(_write(manifest, tmp / "m.json"), tmp / "cache")
    assert not (tmp / "cache" / "wheels" / files[1].name).exists()


def test_missing_wheel_is_fetched_with_pip_and_verified(wheels, monkeypatch):
    tmp, files, manifest = wheels
    fake_index = tmp / "src"
    # A stand-in for `pip download ... --dest DIR beta==2.0`: copies the wheel from fake_index.
    script = ("import shutil, sys, glob; a = sys.argv; d = a[a.index('--dest') + 1]; "
              "n = a[-1].split('==')[0]; "
              f"[shutil.copy(p, d) for p in glob.glob({str(fake_index)!r} + '/' + n + '-*.whl')]")
    monkeypatch.setattr(corpus_wheels, "PIP_COMMAND", [sys.executable, "-c", script])
    mpath = _write(manifest, tmp / "m.json")
    c = resolve_wheel_corpus(mpath, tmp / "cache")
    assert sorted(p.name for p in (tmp / "cache" / "wheels").glob("*.whl")) == sorted(
        w.name for w in files)
    assert len(c.files) == 4
    assert not list((tmp / "cache" / "wheels").glob(".download-*"))  # no leftovers

    # The index serves another file under the pinned name: refused, nothing moved in.
    (tmp / "cache" / "wheels" / files[1].name).unlink()
    _wheel(fake_index / files[1].name, {"beta/core.py": "tampered = 1\n"})
    with pytest.raises(CorpusError, match=f"downloaded wheel {files[1].name} has SHA-256"):
        resolve_wheel_corpus(mpath, tmp / "cache")
    assert not (tmp / "cache" / "wheels" / files[1].name).exists()


def test_manifest_checks(tmp_path):
    with pytest.raises(CorpusError, match="not a pure-Python"):
        corpus_wheels.check_manifest({"name": "x", "wheels": [
            {"project": "numpy", "version": "2", "sha256": "0" * 64,
             "filename": "numpy-2-cp311-cp311-manylinux_2_17_x86_64.whl"}]})
    with pytest.raises(CorpusError, match="cannot read"):
        corpus_wheels.load_manifest(tmp_path / "missing.json")


def test_builtin_name_cli_and_grid_fail_before_work(tmp_path, monkeypatch, capsys):
    """An unreachable wheel fails `python -m engram_jax.train` and grid validation with exit 2 /
    a GridError, naming the wheel."""
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "empty-cache"))
    _failing_pip(monkeypatch)
    assert "pywheels-v1" in corpus_lib.BUILTIN_CORPORA
    first = corpus_wheels.load_manifest(
        corpus_wheels.MANIFEST_DIR / "pywheels-v1.json")["wheels"][0]["filename"]
    from engram_jax import train

    rc = train.main(["--preset", "smoke", "--corpus", "pywheels-v1", "--steps", "1",
                     "--out", str(tmp_path / "run"), "--no-progress", "--host-malloc", "default"])
    assert rc == 2 and f"could not download wheel {first}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    from sweeps.grid import GridError, load_grid

    g = tmp_path / "g.yaml"
    g.write_text("budget: smoke\ncorpus: pywheels-v1\n")
    with pytest.raises(GridError, match=f"corpus: could not download wheel {first}"):
        load_grid(g)


def test_pysrc_warns_once(monkeypatch, capsys, tmp_path):
    (tmp_path / "m.py").write_text("x = 1\n")
    monkeypatch.setattr(corpus_lib, "_python_candidates",
                        lambda include_site_packages: [("stdlib/m.py", tmp_path / "m.py")])
    monkeypatch.setattr(corpus_lib, "_warned_pysrc", False)
    resolve_corpus("pysrc")
    resolve_corpus("pysrc")
    resolve_corpus("pystdlib")
    err = capsys.readouterr().err
    assert err.count("depends on the installed packages; pywheels-v1 is the reproducible "
                     "corpus") == 1


def test_real_manifest_resolves_to_its_fingerprint(tmp_path):
    """The committed manifest's wheels give the committed fingerprint, from a fresh member index
    (wheels from the default cache when they are there, else fetched with pip)."""
    manifest = corpus_wheels.load_manifest(corpus_wheels.MANIFEST_DIR / "pywheels-v1.json")
    have = corpus_wheels.wheel_dir()
    (tmp_path / "wheels").mkdir()
    for w in manifest["wheels"]:
        if (have / w["filename"]).exists():
            (tmp_path / "wheels" / w["filename"]).symlink_to(have / w["filename"])
    c = resolve_wheel_corpus(corpus_wheels.MANIFEST_DIR / "pywheels-v1.json", tmp_path)
    assert isinstance(c, Corpus) and c.fingerprint == manifest["fingerprint"]
    assert len(c.files) == manifest["n_files"] and c.n_bytes == manifest["n_bytes"]
