"""Token compression and multi-head n-gram hashing for Engram (host side, numpy int64).

Implements docs/paper.md section 1 ("Token compression", "Hashing"), following the semantics of the
public reference demo (deepseek-ai/Engram, ``engram_demo_v1.py``: ``CompressedTokenizer`` and
``NgramHashMapping``). Hash ids depend only on token ids, so they are computed in the input pipeline
(a background thread), never inside the jitted model; int64 arithmetic keeps them bit-identical to
the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INT64_MAX = np.iinfo(np.int64).max
_LAYER_SEED_STRIDE = 10007  # the reference's PRIME_1

# ---------------------------------------------------------------------------------------------
# primes


def is_prime(n: int) -> bool:
    """Deterministic primality for n < 3.3e24 (Miller-Rabin with fixed bases)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, seen: set[int]) -> int:
    """The smallest prime strictly larger than ``start`` that is not in ``seen``."""
    c = start + 1
    while not (is_prime(c) and c not in seen):
        c += 1
    return c


def head_primes(
    table_sizes: Sequence[int], max_ngram: int, heads_per_ngram: int, layer_ids: Sequence[int]
) -> dict[int, list[list[int]]]:
    """Per-layer, per-order, per-head table sizes (primes), as the reference assigns them.

    One global set of used primes across layers, orders and heads; for each order the search starts
    at ``table_sizes[n - 2] - 1`` and each head continues from the prime just found.

    Returns:
      ``{layer_id: [[prime per head] per order n = 2..max_ngram]}``.
    """
    if len(table_sizes) != max_ngram - 1:
        raise ValueError(
            f"table_sizes needs one entry per n-gram order 2..{max_ngram} "
            f"({max_ngram - 1}), got {len(table_sizes)}"
        )
    seen: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for lid in layer_ids:
        per_order = []
        for n in range(2, max_ngram + 1):
            start = int(table_sizes[n - 2]) - 1
            heads = []
            for _ in range(heads_per_ngram):
                p = next_prime(start, seen)
                seen.add(p)
                heads.append(p)
                start = p
            per_order.append(heads)
        out[int(lid)] = per_order
    return out


# ---------------------------------------------------------------------------------------------
# n-gram hashing


class NgramHasher:
    """Multi-head n-gram hash ids for each Engram layer (docs/design.md section 4 (Contracts)).

    Args:
      vocab_size: compressed vocabulary size V' (ids fed in are compressed ids in [0, V')).
      table_sizes: base table size per n-gram order 2..max_ngram (the prime search start + 1).
      max_ngram: largest n-gram order N (orders 2..N are hashed).
      heads_per_ngram: hash heads per order.
      layer_ids: Engram layer indices; each gets its own multipliers and primes.
      pad_id: the compressed pad id, standing in for positions before the sequence start.
      seed: global hashing seed.

    Calling it on an int array [B, T] of compressed ids returns
    ``{layer_id: int64 [B, T, (max_ngram - 1) * heads_per_ngram]}``, order-major (all heads of
    bigrams, then trigrams, ...). Position t only reads ids at t, t-1, ..., t-N+1 (causal).
    """

    def __init__(
        self,
        vocab_size: int,
        table_sizes: Sequence[int],
        max_ngram: int,
        heads_per_ngram: int,
        layer_ids: Sequence[int],
        pad_id: int,
        seed: int,
    ):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if max_ngram < 2:
            raise ValueError(f"max_ngram must be >= 2 (bigrams at least), got {max_ngram}")
        if heads_per_ngram < 1:
            raise ValueError(f"heads_per_ngram must be >= 1, got {heads_per_ngram}")
        self.vocab_size = int(vocab_size)
        self.max_ngram = int(max_ngram)
        self.heads_per_ngram = int(heads_per_ngram)
        self.layer_ids = [int(x) for x in layer_ids]
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        half_bound = max(1, (INT64_MAX // self.vocab_size) // 2)
        self.multipliers: dict[int, np.ndarray] = {}
        for lid in self.layer_ids:
            rng = np.random.default_rng(self.seed + _LAYER_SEED_STRIDE * lid)
            r = rng.integers(0, half_bound, size=self.max_ngram, dtype=np.int64)
            self.multipliers[lid] = r * 2 + 1
        self.primes = head_primes(table_sizes, self.max_ngram, self.heads_per_ngram, self.layer_ids)

    @property
    def heads(self) -> int:
        """G, hash heads per layer."""
        return (self.max_ngram - 1) * self.heads_per_ngram

    def offsets(self, layer_id: int) -> np.ndarray:
        """Start row of each head's sub-table in the layer's flat table, int64 [G]."""
        sizes = np.array([p for order in self.primes[layer_id] for p in order], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def rows(self, layer_id: int) -> int:
        """R, rows of the layer's flat table."""
        return int(sum(p for order in self.primes[layer_id] for p in order))

    def hash_layer(self, ids_BxT: np.ndarray, layer_id: int) -> np.ndarray:
        x = np.asarray(ids_BxT, dtype=np.int64)
        if x.ndim != 2:
            raise ValueError(f"expected ids of shape [B, T], got {x.shape}")
        T = x.shape[1]
        m = self.multipliers[layer_id]
        shifted = [x] + [
            np.pad(x, ((0, 0), (k, 0)), constant_values=self.pad_id)[:, :T]
            for k in range(1, self.max_ngram)
        ]
        out = []
        mix = shifted[0] * m[0]
        for n in range(2, self.max_ngram + 1):
            mix = np.bitwise_xor(mix, shifted[n - 1] * m[n - 1])
            for p in self.primes[layer_id][n - 2]:
                out.append(mix % np.int64(p))
        return np.stack(out, axis=2)

    def __call__(self, ids_BxT: np.ndarray) -> dict[int, np.ndarray]:
        return {lid: self.hash_layer(ids_BxT, lid) for lid in self.layer_ids}


# ---------------------------------------------------------------------------------------------
# token compression

_SENTINEL = "\ue000"


def _normalizer():
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def _continuation_prefix(tokenizer) -> str | None:
    """The word-continuation prefix of a WordPiece decoder (``##``), else None."""
    import json

    def find(d):
        if not isinstance(d, dict):
            return None
        if d.get("type") == "WordPiece":
            return d.get("prefix", "##")
        for sub in d.get("decoders") or []:
            got = find(sub)
            if got:
                return got
        return None

    try:
        return find(json.loads(tokenizer.to_str()).get("decoder"))
    except (ValueError, AttributeError):
        return None


def compression_table(tokenizer) -> tuple[np.ndarray, int]:
    """Map each token id to a canonical (compressed) id, as the reference ``CompressedTokenizer``.

    Each vocabulary entry is decoded alone; if the text holds U+FFFD (a partial UTF-8 sequence) the
    raw token string is the key, else the normalised text (NFKC, NFD, strip accents, lowercase,
    collapse whitespace, keep a lone space); an empty normalised text keeps the decoded text.
    Equal keys share an id, numbered in first-seen order.

    Any ``tokenizers`` tokenizer works: for byte-level BPE the decoded text carries the word's
    leading space (``Ġthe`` -> " the", stripped to "the"); a SentencePiece-style (Metaspace)
    decoder drops a lone token's leading "▁" itself; a WordPiece decoder leaves the continuation
    prefix (``##the``), which is removed here, so that a word-initial piece and the same text
    inside a word share an id as they do for the other two.

    Args:
      tokenizer: a HF ``tokenizers.Tokenizer``.

    Returns:
      (lookup int64 [V], compressed vocabulary size V').
    """
    norm = _normalizer()
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = max(vocab, max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1)
    prefix = _continuation_prefix(tokenizer)
    key2new: dict[str, int] = {}
    lookup = np.empty(vocab, dtype=np.int64)
    for tid in range(vocab):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        if prefix and text.startswith(prefix) and len(text) > len(prefix):
            text = text[len(prefix):]
        if "\ufffd" in text:
            key = tokenizer.id_to_token(tid)
        else:
            normed = norm.normalize_str(text)
            key = normed if normed else text
        lookup[tid] = key2new.setdefault(key, len(key2new))
    return lookup, len(key2new)


def identity_compression(vocab_size: int) -> tuple[np.ndarray, int]:
    """No compression (the ablation switch): every id maps to itself."""
    return np.arange(vocab_size, dtype=np.int64), vocab_size


def compress(lookup: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Apply a compression table; negative ids (masks) pass through unchanged."""
    arr = np.asarray(ids, dtype=np.int64)
    out = arr.copy()
    pos = arr >= 0
    out[pos] = lookup[arr[pos]]
    return out
