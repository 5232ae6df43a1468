"""OverEncoding: hashed n-gram input embeddings, the baseline the Engram paper compares against.

Huang et al., "Over-Tokenized Transformer: Vocabulary is Generally Worth Scaling", ICML 2025,
arXiv 2501.16975 (docs/paper.md sections 3 and 8.1). At the input layer only, for each order
n = 2..N, the n-gram ending at position i gets the id

    x^(-n)_i = sum_{j=0}^{n-1} x_{i-j} V^j           (x_{i-j} = 0 before the sequence start)

and sub-table t = 0..k-1 of the order reads row ``x^(-n)_i mod (m + 2 t)`` (slightly different
moduli, so two n-grams that collide in one sub-table rarely collide in all). Each sub-table row
(width d_sub) has its own linear projection to d_model, and the token embedding and the
S = (N - 1) k projected rows are averaged:

    h_0 = (E[x_i] + sum_{n,t} P_{n,t} T_{n,t}[x^(-n)_i mod (m + 2t)]) / (1 + S)

No gate, no convolution, no contextual query: that is what the Engram paper contrasts with.

The ids are a deterministic function of the token ids computed inside the jitted model (int32,
exact: Horner's rule modulo m with a double-and-add modular multiply when m * V would overflow),
so the input pipeline is the same as without OverEncoding. ``tests/test_overencoding.py`` checks
them against Python integers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config import OverEncodingConfig
from engram_jax.layers.common import normal

_INT32_MAX = 2**31 - 1


def _mulmod(a: jax.Array, b: int, m: int) -> jax.Array:
    """(a * b) mod m for int32 a in [0, m), static b >= 0, m <= 2**30, without overflow."""
    b %= m
    if (m - 1) * b <= _INT32_MAX:
        return (a * b) % m
    out = jnp.zeros_like(a)
    for bit in bin(b)[2:]:  # double-and-add from the high bit: every partial stays below 2m
        out = (out * 2) % m
        if bit == "1":
            out = (out + a) % m
    return out


def ngram_ids(tokens_BxT: jax.Array, n: int, vocab_size: int, modulus: int) -> jax.Array:
    """x^(-n)_i mod ``modulus`` [B, T] int32, zeros standing in before the start."""
    x = tokens_BxT.astype(jnp.int32) % modulus
    T = x.shape[1]

    def shifted(k: int) -> jax.Array:  # x_{i-k}
        return jnp.pad(x, ((0, 0), (k, 0)))[:, :T] if k else x

    acc = shifted(n - 1)  # the oldest token carries V^(n-1)
    for k in range(n - 2, -1, -1):
        acc = (_mulmod(acc, vocab_size, modulus) + shifted(k)) % modulus
    return acc


def overencoding_ids(tokens_BxT: jax.Array, oe: OverEncodingConfig, vocab_size: int) -> jax.Array:
    """Row ids within each sub-table [B, T, S], order-major (n = 2's sub-tables first)."""
    return jnp.stack([ngram_ids(tokens_BxT, n, vocab_size, oe.modulus + 2 * t)
                      for n in range(2, oe.max_ngram + 1) for t in range(oe.n_sub)], axis=-1)


class OverEncoding(nnx.Module):
    """The OverEncoding input layer.

    Parameters: ``table`` [R, d_sub] holding the S sub-tables (R = sum of their moduli, addressed
    by id + per-sub-table offset) and ``proj`` [S, d_sub, D], one projection per sub-table. Tables
    start as N(0, table_init_std^2) like the token embedding, projections with std d_sub^-1/2, so
    each projected row starts at about the token embedding's scale.
    """

    def __init__(self, d_model: int, oe: OverEncodingConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.cfg = oe
        self.vocab_size = vocab_size
        moduli = np.asarray(oe.moduli(), np.int64)
        self.offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(moduli)[:-1]]))
        self.table = normal(rngs, (int(moduli.sum()), oe.d_sub), oe.table_init_std)
        self.proj = normal(rngs, (oe.n_tables, oe.d_sub, d_model), oe.d_sub**-0.5)

    def __call__(self, tokens_BxT: jax.Array, embed_BxTxD: jax.Array) -> jax.Array:
        """h_0 [B, T, D]: the average of the token embedding and the projected n-gram rows.

        Args:
          tokens_BxT: int token ids.
          embed_BxTxD: the token embedding E[x] (its dtype is the compute dtype).
        """
        dt = embed_BxTxD.dtype
        rows_BxTxS = overencoding_ids(tokens_BxT, self.cfg, self.vocab_size) + jnp.asarray(
            self.offsets, jnp.int32)
        e_BxTxSxK = jnp.take(self.table[...], rows_BxTxS, axis=0).astype(dt)
        y_BxTxD = jnp.einsum("btsk,skd->btd", e_BxTxSxK, self.proj[...].astype(dt))
        return (embed_BxTxD + y_BxTxD) / (1 + self.cfg.n_tables)
