"""Engram hashing and token compression against independent references written here.

The references follow the public Engram demo (deepseek-ai/Engram, ``engram_demo_v1.py``:
``NgramHashMapping`` and ``CompressedTokenizer``) as summarised in docs/paper.md section 1.2, but
share no code with ``engram_jax.hashing``: primes come from trial division, normalisation from
``unicodedata`` and ``re``. Hash ids must match bit for bit; there is no tolerance to relax.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pytest

from engram_jax.hashing import (
    NgramHasher,
    compress,
    compression_table,
    head_primes,
    identity_compression,
)

INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------------
# independent reference


def isprime(n: int) -> bool:
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def ref_primes(table_sizes, max_ngram, heads, layer_ids) -> dict[int, list[list[int]]]:
    used: set[int] = set()
    out = {}
    for lid in layer_ids:
        per_order = []
        for n in range(2, max_ngram + 1):
            found, cand = [], table_sizes[n - 2] - 1
            for _ in range(heads):
                cand += 1
                while not isprime(cand) or cand in used:
                    cand += 1
                used.add(cand)
                found.append(cand)
            per_order.append(found)
        out[lid] = per_order
    return out


def ref_hash(ids, vocab, table_sizes, max_ngram, heads, layer_ids, pad_id, seed):
    """{layer: int64 [B, T, (max_ngram - 1) * heads]}, written from the reference's description."""
    x = np.asarray(ids, dtype=np.int64)
    B, T = x.shape
    primes = ref_primes(table_sizes, max_ngram, heads, layer_ids)
    out = {}
    for lid in layer_ids:
        rng = np.random.default_rng(seed + 10007 * lid)
        r = rng.integers(0, max(1, (INT64_MAX // vocab) // 2), size=max_ngram, dtype=np.int64)
        m = 2 * r + 1
        # x_k[:, t] = x[:, t - k], with the pad id before the sequence start
        xs = []
        for k in range(max_ngram):
            xk = np.full((B, T), pad_id, dtype=np.int64)
            if k < T:
                xk[:, k:] = x[:, : T - k]
            xs.append(xk)
        cols = []
        for n in range(2, max_ngram + 1):
            mix = xs[0] * m[0]
            for k in range(1, n):
                mix = mix ^ (xs[k] * m[k])
            cols += [mix % np.int64(p) for p in primes[lid][n - 2]]
        out[lid] = np.stack(cols, axis=-1)
    return out


def random_config(rng: np.random.Generator) -> dict:
    max_ngram = int(rng.integers(2, 5))
    vocab = int(rng.choice([2, 50, 257, 8192, 50_000, 129_280]))
    small = rng.random() < 0.8
    sizes = [int(rng.integers(2, 3_000) if small else rng.integers(100_000, 2_300_000))
             for _ in range(max_ngram - 1)]
    n_layers = int(rng.integers(1, 4))
    layer_ids = sorted(rng.choice(30, size=n_layers, replace=False).tolist())
    return dict(
        vocab_size=vocab,
        table_sizes=sizes,
        max_ngram=max_ngram,
        heads_per_ngram=int(rng.integers(1, 9)),
        layer_ids=layer_ids,
        pad_id=int(rng.integers(0, vocab)),
        seed=int(rng.integers(0, 2**31)),
    )


# ---------------------------------------------------------------------------------------------
# hashing


def test_head_primes_hand_example():
    # start at 10 - 1 = 9: layer 0 takes 11, 13, 17; layer 1 cannot reuse them.
    assert head_primes([10], 2, 3, [0, 1]) == {0: [[11, 13, 17]], 1: [[19, 23, 29]]}
    # a size that is itself prime is reused as the first head (search starts at size - 1).
    assert head_primes([13, 13], 3, 1, [5]) == {5: [[13], [17]]}


@pytest.mark.parametrize("case", range(40))
def test_hasher_matches_reference(case):
    rng = np.random.default_rng(1000 + case)
    c = random_config(rng)
    B, T = int(rng.integers(1, 4)), int(rng.integers(1, 40))
    ids = rng.integers(0, c["vocab_size"], size=(B, T))
    got = NgramHasher(**c)(ids)
    want = ref_hash(ids, c["vocab_size"], c["table_sizes"], c["max_ngram"], c["heads_per_ngram"],
                    c["layer_ids"], c["pad_id"], c["seed"])
    assert list(got) == c["layer_ids"]
    G = (c["max_ngram"] - 1) * c["heads_per_ngram"]
    for lid in c["layer_ids"]:
        assert got[lid].dtype == np.int64 and got[lid].shape == (B, T, G)
        np.testing.assert_array_equal(got[lid], want[lid], err_msg=f"config {c}, layer {lid}")


@pytest.mark.parametrize("case", range(10))
def test_primes_match_reference_and_are_distinct(case):
    c = random_config(np.random.default_rng(2000 + case))
    hasher = NgramHasher(**c)
    want = ref_primes(c["table_sizes"], c["max_ngram"], c["heads_per_ngram"], c["layer_ids"])
    assert hasher.primes == want
    flat = [p for lid in c["layer_ids"] for order in hasher.primes[lid] for p in order]
    assert len(flat) == len(set(flat)), "primes must be distinct across layers, orders and heads"
    assert all(isprime(p) for p in flat)
    for lid in c["layer_ids"]:
        for n, order in enumerate(hasher.primes[lid], start=2):
            assert all(p >= c["table_sizes"][n - 2] for p in order)
            assert order == sorted(order)


def test_hash_ids_within_head_tables():
    c = dict(vocab_size=129_280, table_sizes=[1009, 2003], max_ngram=3, heads_per_ngram=8,
             layer_ids=[1, 15], pad_id=2, seed=0)
    hasher = NgramHasher(**c)
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], size=(4, 64))
    for lid, h in hasher(ids).items():
        heads = np.array([p for order in hasher.primes[lid] for p in order])
        assert (h >= 0).all() and (h < heads).all()


@pytest.mark.parametrize("max_ngram", [2, 3, 4])
def test_hash_is_causal_and_local(max_ngram):
    """Changing token t changes nothing before t, and nothing at or after t + max_ngram."""
    rng = np.random.default_rng(max_ngram)
    hasher = NgramHasher(vocab_size=1000, table_sizes=[101] * (max_ngram - 1), max_ngram=max_ngram,
                         heads_per_ngram=4, layer_ids=[0, 3], pad_id=0, seed=7)
    T = 24
    ids = rng.integers(0, 1000, size=(2, T))
    base = hasher(ids)
    for t in (0, 5, T - 1):
        ids2 = ids.copy()
        ids2[:, t] = (ids2[:, t] + 1 + rng.integers(0, 998)) % 1000
        new = hasher(ids2)
        for lid in base:
            np.testing.assert_array_equal(new[lid][:, :t], base[lid][:, :t])
            np.testing.assert_array_equal(new[lid][:, t + max_ngram:], base[lid][:, t + max_ngram:])
            # the token is really read at positions t .. t + N - 1 (some head changes)
            assert (new[lid][:, t] != base[lid][:, t]).any()


def test_pad_id_stands_before_the_start():
    """Prepending pad tokens leaves the hashes of the real tokens unchanged."""
    hasher = NgramHasher(vocab_size=500, table_sizes=[97, 89, 83], max_ngram=4, heads_per_ngram=2,
                         layer_ids=[2], pad_id=7, seed=3)
    ids = np.random.default_rng(1).integers(0, 500, size=(3, 10))
    padded = np.concatenate([np.full((3, 5), 7), ids], axis=1)
    np.testing.assert_array_equal(hasher(padded)[2][:, 5:], hasher(ids)[2])


# ---------------------------------------------------------------------------------------------
# token compression


def ref_key(tokenizer, tid: int) -> str:
    text = tokenizer.decode([tid], skip_special_tokens=False)
    if "\ufffd" in text:
        return tokenizer.id_to_token(tid)
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(ch for ch in s if unicodedata.category(ch) != "Mn").lower()
    s = re.sub(r"[ \t\r\n]+", " ", s)
    s = s if s == " " else s.strip()
    return s or text


def ref_compression(tokenizer) -> tuple[np.ndarray, int]:
    ids: dict[str, int] = {}
    lookup = [ids.setdefault(ref_key(tokenizer, t), len(ids))
              for t in range(tokenizer.get_vocab_size())]
    return np.array(lookup, dtype=np.int64), len(ids)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ("Hello world. hello World! HELLO there,\tHello  hello\n  héllo Héllo café CAFÉ Café "
            "naïve Naive ﬁle file ＡＢＣ abc 数据 数据 über Über uber\r\n\n    indented\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text] * 20, trainer)
    return tok


def test_compression_matches_reference(tiny_tokenizer):
    lookup, v = compression_table(tiny_tokenizer)
    want, v_want = ref_compression(tiny_tokenizer)
    assert v == v_want
    np.testing.assert_array_equal(lookup, want)
    assert lookup.dtype == np.int64 and lookup.shape == (tiny_tokenizer.get_vocab_size(),)
    assert sorted(set(lookup.tolist())) == list(range(v)), "ids are dense, first-seen order"
    assert v < tiny_tokenizer.get_vocab_size(), "the tiny vocabulary has merges to make"


def test_compression_merges_case_space_and_accent_variants(tiny_tokenizer):
    lookup, _ = compression_table(tiny_tokenizer)

    def single_ids(texts):  # ids of the texts that are one token in the tiny vocabulary
        encs = [tiny_tokenizer.encode(t).ids for t in texts]
        return [e[0] for e in encs if len(e) == 1]

    groups = [["Hello", "hello", "HELLO", " Hello", " hello"], [" café", " Café", " CAFÉ"],
              [" Über", " über", " uber"]]
    checked = 0
    for group in groups:
        present = single_ids(group)
        if len(present) >= 2:
            assert len({int(lookup[i]) for i in present}) == 1, f"{group} should share one id"
            checked += 1
    assert checked >= 2, "the tiny tokenizer should hold at least two variant groups"
    # whitespace-only tokens collapse to the lone-space key; distinct words stay distinct
    spaces = single_ids([" ", "  ", "\n   ", "\t"])
    assert len(spaces) >= 3 and len({int(lookup[i]) for i in spaces}) == 1
    assert lookup[single_ids(["Hello"])[0]] != lookup[single_ids(["world"])[0]]


def test_identity_and_compress():
    lookup, v = identity_compression(6)
    assert v == 6 and lookup.tolist() == list(range(6))
    table = np.array([0, 0, 1, 2, 1], dtype=np.int64)
    ids = np.array([[4, -1, 2], [-100, 3, 0]])
    np.testing.assert_array_equal(compress(table, ids), [[1, -1, 1], [-100, 2, 0]])
