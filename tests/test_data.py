"""Input pipeline: corpora, document split, tokenizer, shard cache, batches and hash ids.

Most tests build tiny synthetic corpora in tmp_path (a few tens of kB, BPE vocab ~300), so the
whole file runs in seconds; only the full ``pystdlib`` tokenization is marked ``slow``.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import threading
import time

import numpy as np
import pytest

from engram_jax import data
from engram_jax.data import build as build_mod
from engram_jax.data import cache as cache_mod
from engram_jax.config import EngramConfig
from engram_jax.data import (
    BatchIterator,
    Corpus,
    CorpusChanged,
    PreparedData,
    epochs,
    eval_batches,
    make_hash_fn,
    prepare,
    resolve_corpus,
)
from engram_jax.hashing import NgramHasher, compress

V = 300
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "so", "pe", "di", "fu", "ba", "zo", "é", "ü"]


def make_docs(n: int, seed: int = 0, words: int = 250) -> list[str]:
    """n distinct pseudo-text documents of a few kB each."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        ws = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(words)]
        ws = [w.capitalize() if rng.random() < 0.1 else w for w in ws]
        lines = [" ".join(ws[j : j + 10]) + rng.choice([".", ",", "!", ":"])
                 for j in range(0, words, 10)]
        docs.append(f"doc {i}\n" + "\n    ".join(lines) + "\n")
    return docs


def write_text_dir(root, docs):
    for i, text in enumerate(docs):
        sub = root / ("a" if i % 2 else "b") / f"d{i:03d}"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.with_suffix(".txt" if i % 3 else ".md").write_text(text, encoding="utf-8")
    return root


def split_docs(tok, stream) -> list[str]:
    """Decode a token stream back into its documents (each one ends with eos = 0)."""
    arr = np.asarray(stream)
    assert arr[-1] == 0, "every document, the last one too, is followed by eos"
    ends = np.flatnonzero(arr == 0)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(arr[s:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_text_dir(tmp_path_factory.mktemp("corpus"), make_docs(30))


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    return prepare(str(corpus_dir), V, cache_dir=tmp_path_factory.mktemp("cache"),
                   val_fraction=0.2, progress=False)


# ---------------------------------------------------------------------------------------------
# corpora


def test_text_dir_resolves_and_skips_unusable_files(tmp_path):
    docs = make_docs(3)
    write_text_dir(tmp_path, docs)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.py").write_text("cached = 1")
    (tmp_path / "cfg.json").write_text('{"a": 1}')
    c = resolve_corpus(str(tmp_path))
    got = dict(c.documents())
    assert sorted(got) == ["a/d001.txt", "b/d000.md", "b/d002.txt", "cfg.json"]
    assert got["a/d001.txt"] == docs[1] and c.n_docs == 4
    assert len(c.fingerprint) == 64 and c.name == tmp_path.name


def test_jsonl_and_parquet_corpora(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(6, seed=1)
    jl = tmp_path / "jl"
    jl.mkdir()
    (jl / "part0.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs[:3])) + "\n\n")
    with gzip.open(jl / "part1.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in docs[3:] + [""]:
            f.write(json.dumps({"text": t}) + "\n")
    c = resolve_corpus(str(jl))
    assert [k for k, _ in c.documents()] == [
        "part0.jsonl:1", "part0.jsonl:2", "part0.jsonl:3",
        "part1.jsonl.gz:1", "part1.jsonl.gz:2", "part1.jsonl.gz:3"]
    assert [t for _, t in c.documents()] == docs and c.n_docs == 6

    pq_path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"text": docs + [None], "n": list(range(7))}), pq_path)
    c = resolve_corpus(str(pq_path))
    assert c.name == "shard" and [t for _, t in c.documents()] == docs
    for spec in (jl, pq_path):
        d = prepare(str(spec), V, cache_dir=tmp_path / "cache", val_fraction=0.3, progress=False)
        assert d.tokenizer.get_vocab_size() == V
        got = split_docs(d.tokenizer, d.train_tokens) + split_docs(d.tokenizer, d.val_tokens)
        assert sorted(got) == sorted(docs)


def test_missing_and_empty_corpora(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        resolve_corpus(str(tmp_path / "empty"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="is empty"):
        resolve_corpus(str(tmp_path / "bin"))
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match='"text" field'):
        resolve_corpus(str(tmp_path / "bad.jsonl"))


def test_pystdlib_corpus_is_found_and_stable():
    c = resolve_corpus("pystdlib")
    keys = [f.key for f in c.files]
    assert len(keys) > 500 and c.n_bytes > 5_000_000
    assert all(k.startswith("stdlib/") and k.endswith(".py") for k in keys)
    assert "stdlib/json/decoder.py" in keys
    assert not any("/test/" in k or "/tests/" in k or "site-packages" in k for k in keys)
    assert resolve_corpus("pystdlib").fingerprint == c.fingerprint


# ---------------------------------------------------------------------------------------------
# prepare: split, tokenizer, cache


def test_prepare_text_dir(prepared, corpus_dir):
    d = prepared
    assert d.tokenizer.get_vocab_size() == V and d.vocab_size == V
    assert d.eos_id == 0 and d.tokenizer.token_to_id("<|endoftext|>") == 0
    for arr in (d.train_tokens, d.val_tokens):
        assert isinstance(arr, np.memmap) and arr.ndim == 1 and arr.dtype == np.uint16
        assert arr.max() < V
    assert (d.n_train_tokens, d.n_val_tokens) == (len(d.train_tokens), len(d.val_tokens))
    assert d.fingerprint == resolve_corpus(str(corpus_dir)).fingerprint
    assert d.corpus_name == corpus_dir.name and d.spec == str(corpus_dir)
    assert epochs(2 * d.n_train_tokens, d) == 2.0


def test_split_is_by_document_and_deterministic(prepared, corpus_dir, tmp_path):
    tok = prepared.tokenizer
    docs = dict(resolve_corpus(str(corpus_dir)).documents())
    train, val = split_docs(tok, prepared.train_tokens), split_docs(tok, prepared.val_tokens)
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(docs.values()), "every document whole, in one split"
    # keys decide, not positions: adding documents moves no existing one across the split
    new_dir = tmp_path / "more"
    write_text_dir(new_dir, make_docs(30))
    (new_dir / "zz_extra.txt").write_text(make_docs(1, seed=9)[0])
    d2 = prepare(str(new_dir), V, cache_dir=tmp_path / "cache", val_fraction=0.2, progress=False)
    val2 = set(split_docs(d2.tokenizer, d2.val_tokens))
    assert set(val) <= val2 and not (val2 - set(val)) & set(train)


def test_tiny_corpora_keep_both_splits_or_fail_clearly(tmp_path):
    write_text_dir(tmp_path / "three", make_docs(3, words=400))
    d = prepare(str(tmp_path / "three"), 260, cache_dir=tmp_path / "c", val_fraction=0.01,
                progress=False)
    assert d.meta["n_docs_val"] == 1 and d.meta["n_docs_train"] == 2
    d = prepare(str(tmp_path / "three"), 260, cache_dir=tmp_path / "c", val_fraction=0.99,
                progress=False)
    assert d.meta["n_docs_train"] >= 1 and d.n_train_tokens > 0
    write_text_dir(tmp_path / "one", make_docs(1))
    with pytest.raises(ValueError, match="at least 2"):
        prepare(str(tmp_path / "one"), 260, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="too small for vocab_size=20000"):
        prepare(str(tmp_path / "three"), 20000, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        prepare(str(tmp_path / "three"), 100, cache_dir=tmp_path / "c", progress=False)


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    src = write_text_dir(tmp_path / "src", make_docs(12, seed=3))
    cache = tmp_path / "cache"
    d1 = prepare(str(src), V, cache_dir=cache, progress=False)

    def no_rebuild(*a, **k):
        raise AssertionError("a cached corpus must not be rebuilt")

    with monkeypatch.context() as m:
        m.setattr(build_mod.Build, "run", no_rebuild)
        m.setattr(Corpus, "content_hashes", no_rebuild)  # nor reread: a stat of its files
        t0 = time.perf_counter()
        d2 = prepare(str(src), V, cache_dir=cache, progress=False)
        assert time.perf_counter() - t0 < 5.0
    assert d2.cache_path == d1.cache_path
    np.testing.assert_array_equal(d2.train_tokens, d1.train_tokens)
    np.testing.assert_array_equal(d2.val_tokens, d1.val_tokens)
    assert d2.tokenizer.to_str() == d1.tokenizer.to_str()

    edited = src / "a" / "d001.txt"
    edited.write_text(edited.read_text() + "an edit\n")
    with pytest.raises(CorpusChanged, match=r"changed since it was prepared.*a/d001.txt.*--rescan"):
        prepare(str(src), V, cache_dir=cache, progress=False)
    d3 = prepare(str(src), V, cache_dir=cache, progress=False, rescan=True)
    assert d3.fingerprint != d1.fingerprint and d3.cache_path != d1.cache_path
    assert d1.cache_path.exists(), "the old entry is left alone"
    assert d3.n_train_tokens + d3.n_val_tokens != d1.n_train_tokens + d1.n_val_tokens
    assert prepare(str(src), V, cache_dir=cache, val_fraction=0.1,
                   progress=False).cache_path != d3.cache_path
    assert not [p for p in cache.iterdir() if "partial" in p.name], "no build folders left behind"
    # touched, not changed: a rescan finds the same contents and keeps the entry
    os.utime(edited, ns=(1, 1))
    with pytest.raises(CorpusChanged, match="modification time changed"):
        prepare(str(src), V, cache_dir=cache, progress=False)
    assert prepare(str(src), V, cache_dir=cache, progress=False,
                   rescan=True).cache_path == d3.cache_path


def test_concurrent_prepare_builds_once(tmp_path, monkeypatch):
    src = write_text_dir(tmp_path / "src", make_docs(8, seed=4))
    calls, real_run = [], build_mod.Build.run

    def counting_run(self):
        calls.append(1)
        time.sleep(0.2)  # widen the race window
        return real_run(self)

    monkeypatch.setattr(build_mod.Build, "run", counting_run)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        prepare(str(src), V, cache_dir=tmp_path / "cache", progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(calls) == 1
    assert len({r.cache_path for r in results}) == 1


def test_compression_cached_next_to_tokenizer(prepared, monkeypatch):
    lookup, v = prepared.compression()
    assert lookup.shape == (V,) and v < V and v == lookup.max() + 1
    assert list((prepared.cache_path).glob("compression*.npy"))
    monkeypatch.setattr(cache_mod, "compression_table", lambda tok: (_ for _ in ()).throw(
        AssertionError("the table should come from the cache")))
    lookup2, v2 = PreparedData(prepared.cache_path).compression()
    np.testing.assert_array_equal(lookup2, lookup)
    assert v2 == v
    ident, vi = prepared.compression(enabled=False)
    assert vi == V and (ident == np.arange(V)).all()


# ---------------------------------------------------------------------------------------------
# hash function and batches

ENGRAM = EngramConfig(layer_ids=(0, 2), max_ngram=3, heads_per_ngram=2, d_head=8,
                      table_sizes=(101, 211), seed=5)


def test_make_hash_fn_compressed_and_identity(prepared):
    ids = np.random.default_rng(0).integers(0, V, size=(3, 17))
    lookup, v = prepared.compression()
    fn = make_hash_fn(ENGRAM, prepared, V)
    out = fn(ids)
    ref = NgramHasher(v, ENGRAM.table_sizes, 3, 2, ENGRAM.layer_ids, int(lookup[0]), 5)
    want = ref(compress(lookup, ids))
    assert list(out) == [0, 2]
    for lid in out:
        assert out[lid].dtype == np.int32 and out[lid].shape == (3, 17, 4)
        np.testing.assert_array_equal(out[lid], want[lid])
    plain = NgramHasher(V, ENGRAM.table_sizes, 3, 2, ENGRAM.layer_ids, 0, 5)(ids)
    import dataclasses

    no_compress = dataclasses.replace(ENGRAM, compress=False)
    for fn in (make_hash_fn(no_compress, prepared, V), make_hash_fn(ENGRAM, None, V)):
        got = fn(ids)
        for lid in got:
            np.testing.assert_array_equal(got[lid], plain[lid])
    assert make_hash_fn(None, prepared, V)(ids) == {}
    with pytest.raises(ValueError, match="vocab_size"):
        make_hash_fn(ENGRAM, prepared, V + 1)


def stream(n=5000, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=n).astype(np.uint16)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        assert x["hash_ids"].keys() == y["hash_ids"].keys()
        for k in x["hash_ids"]:
            np.testing.assert_array_equal(x["hash_ids"][k], y["hash_ids"][k])


def test_batches_resume_exactly_and_prefetch_matches_sync(prepared):
    toks = prepared.train_tokens
    fn = make_hash_fn(ENGRAM, prepared, V)
    kw = dict(batch_size=3, seq_len=16, seed=11, hash_fn=fn)
    with BatchIterator(toks, prefetch=0, **kw) as it:
        ref = take(it, 9)
        assert it.step == 9
    with BatchIterator(toks, start_step=5, prefetch=2, **kw) as it:
        assert_batches_equal(take(it, 4), ref[5:])
    with BatchIterator(toks, prefetch=4, **kw) as it:
        assert_batches_equal(take(it, 9), ref)
    b = ref[0]
    assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (3, 17)
    want = fn(b["tokens"][:, :16])
    for lid in want:
        assert b["hash_ids"][lid].shape == (3, 16, 4)
        np.testing.assert_array_equal(b["hash_ids"][lid], want[lid])
    # windows are contiguous slices of the stream
    starts = data.window_starts(len(toks), 3, 16, 11, 0)
    for row, s in zip(b["tokens"], starts):
        np.testing.assert_array_equal(row, toks[s : s + 17])
    other = BatchIterator(toks, batch_size=3, seq_len=16, seed=12, prefetch=0)
    assert not np.array_equal(next(other)["tokens"], b["tokens"])


def test_batch_iterator_shutdown_and_errors():
    it = BatchIterator(stream(), batch_size=2, seq_len=8, seed=0, prefetch=3)
    next(it)
    thread = it._thread
    it.close()
    assert not thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)
    it.close()  # idempotent

    dropped = BatchIterator(stream(), batch_size=2, seq_len=8, seed=0, prefetch=2)
    thread = dropped._thread
    del dropped  # never closed: collecting it stops the worker
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()

    calls = []

    def flaky(ids):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("hash failure")
        return {}

    with BatchIterator(stream(), batch_size=2, seq_len=8, seed=0, hash_fn=flaky) as it:
        take(it, 2)
        with pytest.raises(RuntimeError, match="hash failure"):
            next(it)
    with pytest.raises(ValueError, match="shorter than one window"):
        BatchIterator(stream(8), batch_size=2, seq_len=8, seed=0)
    assert next(BatchIterator(stream(), batch_size=2, seq_len=8, seed=0, prefetch=0))[
        "hash_ids"] == {}


def test_eval_batches_even_non_overlapping_and_deterministic():
    toks = stream(1000)
    B, T = 4, 9
    bs = eval_batches(toks, batch_size=B, seq_len=T, n_batches=5)
    assert len(bs) == 5 and all(b["tokens"].shape == (B, T + 1) for b in bs)
    assert_batches_equal(bs, eval_batches(toks, batch_size=B, seq_len=T, n_batches=5))
    rows = np.concatenate([b["tokens"] for b in bs])
    starts = [int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(toks, T + 1)
                                        == r, axis=1))[0]) for r in rows]
    gaps = np.diff(starts)
    assert starts[0] == 0 and starts[-1] == 1000 - (T + 1)
    assert gaps.min() >= T + 1 and gaps.max() - gaps.min() <= 1
    # as many batches as fit: 100 windows of 10 -> 25 batches covering every token
    full = eval_batches(toks, batch_size=B, seq_len=T, n_batches=1000)
    assert len(full) == 25
    np.testing.assert_array_equal(np.concatenate([b["tokens"].ravel() for b in full]), toks)
    # fewer than B windows fit: one batch of overlapping windows
    assert len(eval_batches(stream(25), batch_size=B, seq_len=T, n_batches=3)) == 1
    with pytest.raises(ValueError, match="shorter than one window"):
        eval_batches(stream(9), batch_size=B, seq_len=T, n_batches=1)
    fn = make_hash_fn(ENGRAM, None, V)
    hb = eval_batches(toks, batch_size=B, seq_len=T, n_batches=2, hash_fn=fn)
    np.testing.assert_array_equal(hb[1]["hash_ids"][2], fn(hb[1]["tokens"][:, :T])[2])


@pytest.mark.slow
def test_prepare_pystdlib_end_to_end(tmp_path):
    t0 = time.perf_counter()
    d = prepare("pystdlib", 512, cache_dir=tmp_path, progress=False)
    assert d.tokenizer.get_vocab_size() == 512 and d.corpus_name == "pystdlib"
    assert d.n_train_tokens > 1_000_000 and d.n_val_tokens > 10_000
    assert d.meta["n_docs_val"] > 0 and time.perf_counter() - t0 < 120
    text = d.tokenizer.decode(d.val_tokens[:2000].tolist())
    assert "def " in text or "import " in text


@pytest.mark.slow
def test_pysrc_adds_site_packages_deduplicated():
    std, src = resolve_corpus("pystdlib"), resolve_corpus("pysrc")
    keys = {f.key for f in src.files}
    assert len(src.files) > len(std.files) and any(k.startswith("site-packages") for k in keys)
    assert len({f.sha256 for f in src.files}) == len(src.files), "deduplicated by content"
    std_hashes = {f.sha256 for f in std.files}
    assert std_hashes <= {f.sha256 for f in src.files}
