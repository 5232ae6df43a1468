"""Preparing a corpus once (engram_jax/data: build.py, shards.py, manifest.py, __main__.py).

The new preparation is checked against a small copy of the first version's algorithm (split by
key hash, BPE sample by a second hash up to a budget, whole documents encoded and followed by
EOS) on tiny synthetic corpora of text, JSONL, gzipped JSONL and multi-row-group Parquet files,
with several units and 1 or 2 workers; the bounded BPE heap against brute force on random
documents; resumption, the no-op rerun and every bad input of the CLI (exit 2, nothing
overwritten). The byte-identity of the built-in corpus with the first version is a slow test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random

import numpy as np
import pytest

from engram_jax.data import (
    CorpusChanged,
    EntryError,
    check_corpus,
    prepare,
    prepare_entry,
    resolve_corpus,
    shards,
)
from engram_jax.data import __main__ as cli
from engram_jax.data import build as build_mod
from engram_jax.data import tokenizer as tokenizer_mod
from engram_jax.data.tokenizer import train_bpe

V = 300
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "so", "pe", "di", "fu", "ba", "zo", "é", "ü"]


def make_docs(n: int, seed: int = 0, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ws = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(words)]
        lines = [" ".join(ws[j:j + 10]) + rng.choice(".,!:") for j in range(0, words, 10)]
        out.append(f"doc {i} {seed}\n" + "\n  ".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A corpus of every reader's kind and its documents in corpus order, written here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mixed")
    docs = make_docs(48)
    expected = []
    for i in range(20):  # text files, keys a/dNN.txt
        (root / "a").mkdir(exist_ok=True)
        (root / "a" / f"d{i:02d}.txt").write_text(docs[i])
        expected.append((f"a/d{i:02d}.txt", docs[i]))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[20:28]))
    expected += [(f"b.jsonl:{j + 1}", t) for j, t in enumerate(docs[20:28])]
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in docs[28:34]))
    expected += [(f"c.jsonl.gz:{j + 1}", t) for j, t in enumerate(docs[28:34])]
    pq.write_table(pa.table({"text": docs[34:48]}), root / "d.parquet", row_group_size=3)
    expected += [(f"d.parquet:{j}", t) for j, t in enumerate(docs[34:48])]
    (root / "e.bin").write_bytes(b"\0binary")  # not a document
    return root, expected


# ---------------------------------------------------------------------------------------------
# the first version's algorithm, copied


def _h(key: str, salt: str = "split") -> float:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big") / 2.0**64


def old_split_and_sample(docs, val_fraction, budget):
    u = {k: _h(k) for k, _ in docs}
    sizes = {k: len(t) for k, t in docs}
    val = {k for k, x in u.items() if x < val_fraction}
    if not val:
        val = {min(u, key=u.get)}
    if len(val) == len(sizes):
        val.discard(max(u, key=u.get))
    train_sizes = {k: n for k, n in sizes.items() if k not in val}
    chosen, total = set(), 0
    for k in sorted(train_sizes, key=lambda k: _h(k, "bpe")):
        if total >= budget:
            break
        chosen.add(k)
        total += train_sizes[k]
    return val, chosen


def old_prepare(docs, vocab, val_fraction, budget):
    val, chosen = old_split_and_sample(docs, val_fraction, budget)
    tok = train_bpe((t for k, t in docs if k in chosen), vocab)
    streams = {"train": [], "val": []}
    for k, t in docs:
        ids = tok.encode(t, add_special_tokens=False).ids + [0]
        streams["val" if k in val else "train"].extend(ids)
    return tok.to_str(), {s: np.asarray(v, np.uint16) for s, v in streams.items()}


@pytest.fixture
def budget(monkeypatch):
    """A BPE sample budget of ``n`` characters (the rule's floor), so tiny corpora sample."""
    def set_budget(n: int):
        monkeypatch.setattr(tokenizer_mod, "BPE_MIN_SAMPLE_CHARS", n)
        monkeypatch.setattr(tokenizer_mod, "BPE_CHARS_PER_TOKEN", 1)
    return set_budget


@pytest.mark.parametrize("workers, unit_bytes, val_fraction, sample", [
    (1, 4000, 0.2, 20_000),
    (2, 6000, 0.2, 20_000),
    (1, 4000, 0.001, 15_000),   # no document hashes below: the smallest goes to val
    (1, 4000, 0.999, 15_000),   # every document hashes below: the largest stays in train
])
def test_matches_the_first_versions_algorithm(mixed, tmp_path, monkeypatch, budget, workers,
                                              unit_bytes, val_fraction, sample):
    root, docs = mixed
    budget(sample)
    monkeypatch.setattr(shards, "UNIT_BYTES", unit_bytes)
    assert len(shards.plan_units(resolve_corpus(str(root)).files)) > 4, "several units"
    want_tok, want = old_prepare(docs, V, val_fraction, sample)
    d = prepare(str(root), V, cache_dir=tmp_path, val_fraction=val_fraction, progress=False,
                workers=workers)
    assert d.tokenizer.to_str() == want_tok
    np.testing.assert_array_equal(d.train_tokens, want["train"])
    np.testing.assert_array_equal(d.val_tokens, want["val"])
    val, chosen = old_split_and_sample(docs, val_fraction, sample)
    assert d.meta["n_docs_val"] == len(val) and d.meta["bpe_docs"] == len(chosen)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    manifest = json.loads((d.cache_path / "manifest.json").read_text())
    assert [r[0] for r in manifest["files"] if r[2]] == [
        *(f"a/d{i:02d}.txt" for i in range(20)), "b.jsonl", "c.jsonl.gz", "d.parquet"]
    assert manifest["files"][-1][0] == "e.bin" and manifest["files"][-1][2] == ""  # no document
    assert sum(u["train"] for u in manifest["units"]) == d.n_train_tokens


def test_bpe_heap_gives_the_sorted_selection(budget):
    """UnitStats per unit, merged in any order by ScanMerge, against brute force."""
    rng = random.Random(0)
    for case in range(300):
        n = rng.randint(2, 60)
        docs = [(f"k{case}-{i}", rng.randint(1, 400)) for i in range(n)]
        frac = rng.choice([0.0001, 0.05, 0.3, 0.9999])
        cap = rng.randint(1, 6000)
        want_val, want_sample = old_split_and_sample([(k, "x" * m) for k, m in docs], frac, cap)
        cuts = sorted(rng.sample(range(1, n), rng.randint(0, min(5, n - 1))))
        units = [docs[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
        results = []
        for i, unit in enumerate(units):
            st = shards.UnitStats(i, frac, cap)
            for k, m in unit:
                st.add(k, m)
            results.append(st.result())
        merge = shards.ScanMerge(len(units), cap)
        for r in rng.sample(results, len(results)):
            merge.add(r)
        got = merge.result("x")
        assert {k for _, k in got["bpe_keys"]} == want_sample, case
        val = {k for k, _ in docs if (_h(k) < frac or k == got["force_val"])
               and k != got["force_train"]}
        assert val == want_val and got["n_docs_val"] == len(want_val), case


# ---------------------------------------------------------------------------------------------
# resumption and the second run


def test_a_stopped_build_resumes_where_it_stopped(mixed, tmp_path, monkeypatch, budget):
    root, docs = mixed
    budget(20_000)
    monkeypatch.setattr(shards, "UNIT_BYTES", 4000)
    real_tok, real_scan = shards.tokenize_unit, shards.scan_unit
    calls = []

    def dies_after_three(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(a[0])
        return real_tok(*a, **k)

    monkeypatch.setattr(shards, "tokenize_unit", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(root), V, cache_dir=tmp_path / "c", progress=False, workers=1)
    partial = [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1
    assert json.loads((partial[0] / "progress.json").read_text())["appended"] == 3

    def no_rescan(*a, **k):
        raise AssertionError("the scan of a stopped build is not redone")

    monkeypatch.setattr(shards, "scan_unit", no_rescan)
    calls.clear()
    monkeypatch.setattr(shards, "tokenize_unit", lambda *a: calls.append(a[0]) or real_tok(*a))
    d, built = prepare_entry(str(root), V, cache_dir=tmp_path / "c", progress=False, workers=1)
    assert built and calls[0] == 3, calls  # units 0-2 were not tokenized again
    monkeypatch.setattr(shards, "scan_unit", real_scan)
    fresh = prepare(str(root), V, cache_dir=tmp_path / "fresh", progress=False, workers=1)
    np.testing.assert_array_equal(d.train_tokens, fresh.train_tokens)
    np.testing.assert_array_equal(d.val_tokens, fresh.val_tokens)
    assert not partial[0].exists()


def test_second_run_does_nothing_and_says_so(mixed, tmp_path, capsys):
    root, _ = mixed
    args = ["prepare", str(root), "--vocab", str(V), "--cache-dir", str(tmp_path), "--quiet"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["built"] and first["n_train_tokens"] > 0
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert "already prepared" in out.err and "nothing to do" in out.err
    assert json.loads(out.out)["built"] is False and json.loads(out.out)["entry"] == first["entry"]


@pytest.mark.slow
def test_a_killed_cli_run_resumes(mixed, tmp_path):
    """SIGKILL of `python -m engram_jax.data prepare` mid-tokenization, then a rerun."""
    import signal
    import subprocess
    import sys
    import time

    root, _ = mixed
    env = {**os.environ, "ENGRAM_CACHE": str(tmp_path)}
    code = ("import sys, time; from engram_jax.data import shards, __main__ as m; "
            "shards.UNIT_BYTES = 4000; real = shards.tokenize_unit; "
            "shards.tokenize_unit = lambda *a: (time.sleep(0.5), real(*a))[1]; "
            f"sys.exit(m.main(['prepare', {str(root)!r}, '--vocab', '{V}', '--workers', '1']))")
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        prog = list(tmp_path.glob(".*.partial/progress.json"))
        if prog and json.loads(prog[0].read_text())["appended"] >= 2:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list(tmp_path.glob(".*.partial"))
    r = subprocess.run([sys.executable, "-m", "engram_jax.data", "prepare", str(root), "--vocab",
                        str(V)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and not list(tmp_path.glob(".*.partial"))


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, nothing overwritten


def _snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def prepared_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(make_docs(10, seed=2)):
        (src / f"f{i}.txt").write_text(t)
    cache = tmp_path / "cache"
    assert cli.main(["prepare", str(src), "--vocab", str(V), "--cache-dir", str(cache),
                     "--quiet"]) == 0
    (entry,) = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith("src-")]
    return src, cache, entry


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"not a numpy file at all"), "unreadable or truncated"),
    (lambda p: os.truncate(p, p.stat().st_size - 10), "truncated"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.unlink(), "missing"),
])
def test_damaged_entry_is_refused(prepared_dir, capsys, damage, message):
    src, cache, entry = prepared_dir
    damage(entry / "train.npy")
    before = _snapshot(cache)
    rc = cli.main(["prepare", str(src), "--vocab", str(V), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and "is damaged" in err and message in err and "delete the folder" in err, err
    assert _snapshot(cache) == before


def test_changed_corpus_is_refused_until_rescanned(prepared_dir, capsys):
    src, cache, entry = prepared_dir
    (src / "f3.txt").write_text("an edited document\n" * 30)
    (src / "new.txt").write_text("a new document\n" * 30)
    before = _snapshot(cache)
    rc = cli.main(["prepare", str(src), "--vocab", str(V), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and "changed since it was prepared" in err, err
    assert "f3.txt" in err and "new.txt" in err and "--rescan" in err
    assert _snapshot(cache) == before
    assert cli.main(["prepare", str(src), "--vocab", str(V), "--cache-dir", str(cache), "--quiet",
                     "--rescan"]) == 0
    assert json.loads(capsys.readouterr().out)["entry"] != str(entry) and entry.exists()


def test_truncated_shard_of_a_stopped_build_is_refused(mixed, tmp_path, monkeypatch, capsys):
    root, _ = mixed
    monkeypatch.setattr(shards, "UNIT_BYTES", 4000)
    real = shards.tokenize_unit
    n = []

    def stop(*a):
        if n:
            raise KeyboardInterrupt
        n.append(1)
        return real(*a)

    monkeypatch.setattr(shards, "tokenize_unit", stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(root), V, cache_dir=tmp_path, progress=False, workers=1)
    (partial,) = tmp_path.glob(".*.partial")
    paths = shards.shard_paths(partial / "shards", 1)  # unit 1, as if finished but cut short
    paths["train"].write_bytes(b"\1\0" * 5)
    paths["val"].write_bytes(b"")
    paths["done"].write_text(json.dumps({"index": 1, "train": 50, "val": 0, "docs": 1,
                                         "chars": 9}))
    before = _snapshot(tmp_path)
    rc = cli.main(["prepare", str(root), "--vocab", str(V), "--cache-dir", str(tmp_path),
                   "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "is truncated or unreadable" in err and "000001.train.bin" in err, err
    assert _snapshot(tmp_path) == before


def _bpe_tokenizer(path, vocab=280, specials=("<pad>", "<|endoftext|>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(make_docs(20, seed=5), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("garbage", "does not load"),
    ("vocab", "vocab_size"),
    ("no-eos", "--eos-token"),
    ("empty-corpus", "is empty"),
    ("workers", "--workers must be at least 1"),
    ("missing", "not found"),
])
def test_bad_input_exits_2(tmp_path, capsys, case, message):
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(make_docs(4, seed=3)):
        (src / f"f{i}.txt").write_text(t)
    args = ["prepare", str(src), "--vocab", "280", "--cache-dir", str(tmp_path / "cache")]
    if case == "garbage":
        (tmp_path / "tok.json").write_text("{not json")
        args += ["--tokenizer", str(tmp_path / "tok.json")]
    elif case == "vocab":
        args = [*args[:3], "300", *args[4:], "--tokenizer",
                str(_bpe_tokenizer(tmp_path / "tok.json"))]
    elif case == "no-eos":
        args += ["--tokenizer", str(_bpe_tokenizer(tmp_path / "tok.json", specials=("<pad>",)))]
    elif case == "empty-corpus":
        for p in src.iterdir():
            p.write_bytes(b"\0\1")
    elif case == "workers":
        args += ["--workers", "0"]
    elif case == "missing":
        args[1] = str(tmp_path / "nope")
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "cache").exists() or not [
        p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name.startswith("src-")]


def test_errors_are_value_errors():
    assert issubclass(CorpusChanged, ValueError) and issubclass(EntryError, ValueError)
    assert build_mod.EntryError is EntryError


# ---------------------------------------------------------------------------------------------
# compatibility with the first version on the built-in corpus (SHA-256 recorded before the change)

PYSTDLIB_FINGERPRINT = "cb31b44196e9be91f8fee8095b104840af06fd6f7c87aab30d625a84dc50914a"
FIRST_VERSION = {  # python 3.11.7, tokenizers 0.23.3: engram_jax/data.py at a25b538
    512: ("pystdlib-v512-e18f0a909953eb85", {
        "train.npy": "0828dfea2a951d9f85b4de9d0a929794cf10581d60727b1d41f9820b44302bad",
        "val.npy": "ff9f039e553f77df6b6e2c8dcbdb556caed9fec1f2044bf098c8a4fe6915c9f3",
        "tokenizer.json": "72326abcb91c20e644b7e4905791537a70e6551a8e13c8bd2b9f77cd019fdd6e"}),
    2048: ("pystdlib-v2048-6c91fa79351c97f6", {
        "train.npy": "a8523727bb4b88287d7ed06d821340599b94cd293e57a772683fc0bfa0183409",
        "val.npy": "24be84eb2ccbb022ad51d247378d97478d66d534ea548ef1497c8ddfb97bee93",
        "tokenizer.json": "8060b5c34ca7b585c8ec573268190ee4d9b804857ab50b55b1ced5a5d4d63f60"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [512, 2048])
def test_pystdlib_streams_are_those_of_the_first_version(tmp_path, monkeypatch, vocab):
    """Byte-identical tokenizer and streams, and the same cache entry name, as the first version
    produced on this interpreter (skipped where the standard library differs)."""
    from engram_jax.data import list_corpus, resolve_corpus

    if resolve_corpus("pystdlib").fingerprint != PYSTDLIB_FINGERPRINT:
        pytest.skip("another Python's standard library: the recorded hashes do not apply")
    assert list_corpus("pystdlib").stamps
    monkeypatch.setattr(shards, "UNIT_BYTES", 2_000_000)  # several units, as a large corpus
    d = prepare("pystdlib", vocab, cache_dir=tmp_path, progress=False, workers=2)
    name, hashes = FIRST_VERSION[vocab]
    assert d.cache_path.name == name
    for f, sha in hashes.items():
        assert hashlib.sha256((d.cache_path / f).read_bytes()).hexdigest() == sha, f


def test_a_worker_killed_mid_task_is_reported_not_waited_for():
    import signal
    import threading
    import time

    from engram_jax.data.workers import WorkerDied, Workers

    with Workers(2) as w:
        victim = w._procs[0].pid
        threading.Timer(1.0, lambda: os.kill(victim, signal.SIGKILL)).start()
        t0 = time.perf_counter()
        with pytest.raises(WorkerDied, match="killed for memory"):
            w.run(time.sleep, [(4,)] * 4, lambda r: None)
        assert time.perf_counter() - t0 < 4


def test_a_checked_listing_is_not_listed_again(mixed, tmp_path, monkeypatch):
    """check_corpus's listing passed to prepare spares a second walk of the corpus: a trial
    started from the CLI stats each corpus file once."""
    from engram_jax.data import cache as cache_mod

    root, _ = mixed
    first = prepare(str(root), V, cache_dir=tmp_path, progress=False, workers=1)
    phases = json.loads((first.cache_path / "meta.json").read_text())["phase_seconds"]
    assert {"scan", "bpe", "tokenize"} <= set(phases) and min(phases.values()) >= 0
    listing = check_corpus(str(root), cache_dir=tmp_path)
    monkeypatch.setattr(cache_mod, "list_corpus", lambda spec: pytest.fail(f"listed {spec} again"))
    again = prepare(str(root), V, cache_dir=tmp_path, progress=False, listing=listing)
    assert again.cache_path == first.cache_path
    with pytest.raises(ValueError, match="listing is of corpus"):
        prepare("pystdlib", V, cache_dir=tmp_path, progress=False, listing=listing)


def test_the_training_cli_lists_its_corpus_once(mixed, tmp_path, monkeypatch):
    from engram_jax import train
    from engram_jax.data import cache as cache_mod

    root, _ = mixed
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    calls, seen = [], {}
    real = cache_mod.list_corpus
    monkeypatch.setattr(cache_mod, "list_corpus", lambda spec: calls.append(spec) or real(spec))

    def fake_run_trial(cfg, tcfg, **kw):  # what the CLI hands the trial, without training
        seen.update(kw)
        return {"val_loss": 0.0, "best_val_loss": 0.0, "train_loss": 0.0, "tokens_per_s": 0.0,
                "epochs": 0.0, "params_total": 0}

    monkeypatch.setattr(train, "run_trial", fake_run_trial)
    assert train.main(["--preset", "tiny", "--corpus", str(root), "--steps", "1",
                       "--out", str(tmp_path / "run"), "--no-progress",
                       "--host-malloc", "default"]) == 0
    assert calls == [str(root)]
    assert seen["listing"] is not None and seen["listing"].spec == str(root)
