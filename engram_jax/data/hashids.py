"""The host-side hash function of a model's Engram layers, from a prepared corpus's tokenizer.

docs/paper.md section 1 (token compression, multi-head n-gram hashing): raw token ids ->
compressed ids (the tokenizer's compression table, ``hashing.compression_table``) -> n-gram hash
ids per Engram layer. It runs in the input pipeline (``batches.py``), never in the jitted model.
Positions before a sequence's start are the tokenizer's pad id (its EOS unless it names a pad
token; 0 for the own BPE), compressed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from engram_jax.hashing import NgramHasher, compress, identity_compression

if TYPE_CHECKING:
    from engram_jax.config import EngramConfig
    from engram_jax.data.cache import PreparedData

DEFAULT_PAD_ID = 0  # without a prepared corpus: the own BPE's <|endoftext|>


def make_hash_fn(
    engram_cfg: EngramConfig | None, data: PreparedData | None, vocab_size: int
) -> Callable[[np.ndarray], dict[int, np.ndarray]]:
    """The host-side hash function of a model's Engram layers: raw token ids -> hash ids.

    Args:
      engram_cfg: the model's ``EngramConfig`` (None: no Engram, the function returns ``{}``).
      data: the prepared data whose tokenizer defines the compression and the pad id (None:
        identity compression, pad id 0).
      vocab_size: the model's vocabulary size V.

    Returns:
      fn(ids int [B, T]) -> {layer_id: int32 [B, T, G]}, G = (max_ngram - 1) * heads_per_ngram.
    """
    if engram_cfg is None:
        return lambda ids_BxT: {}
    if data is not None and data.vocab_size != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} differs from the data's {data.vocab_size}")
    if data is None or not engram_cfg.compress:
        lookup, v_compressed = identity_compression(vocab_size)
    else:
        lookup, v_compressed = data.compression(True)
    pad_id = data.pad_id if data is not None else DEFAULT_PAD_ID
    hasher = NgramHasher(
        vocab_size=v_compressed,
        table_sizes=engram_cfg.table_sizes,
        max_ngram=engram_cfg.max_ngram,
        heads_per_ngram=engram_cfg.heads_per_ngram,
        layer_ids=engram_cfg.layer_ids,
        pad_id=int(lookup[pad_id]),
        seed=engram_cfg.seed,
    )
    top = max(p for per_order in hasher.primes.values() for heads in per_order for p in heads)
    assert top < 2**31, f"hash table prime {top} does not fit int32"

    def hash_fn(ids_BxT: np.ndarray) -> dict[int, np.ndarray]:
        hashed = hasher(compress(lookup, ids_BxT))
        return {lid: h_BxTxG.astype(np.int32) for lid, h_BxTxG in hashed.items()}

    return hash_fn


def epochs(n_tokens_seen: int, data: PreparedData) -> float:
    """Passes over the training split: tokens seen / train tokens."""
    return n_tokens_seen / data.n_train_tokens
