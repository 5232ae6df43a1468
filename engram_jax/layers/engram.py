"""The Engram module: hashed n-gram memory with a context-aware gate and a short convolution.

docs/paper.md section 1, following the public reference demo's semantics (deepseek-ai/Engram,
``engram_demo_v1.py``: ``MultiHeadEmbedding``, ``ShortConv``, ``Engram``) for a single residual
branch (hc_mult = 1; ``layers/engram_branches.py`` has the multi-branch module):

  e_t   = concat_j table[hash_j(t) + offset_j]                       (G heads of width d_head)
  k_t   = W_K e_t + b_K,  v_t = W_V e_t + b_V
  s_t   = RMSNorm_h(h_t) . RMSNorm_k(k_t) / sqrt(D);  s <- sign(s) sqrt(max(|s|, 1e-6))
  v~_t  = sigmoid(s_t) v_t
  Y     = v~ + SiLU(DepthwiseCausalConv(RMSNorm(v~)))   (kernel W, dilation max_ngram, no bias)

and the block adds Y to the residual stream before attention. Hash ids come from the input
pipeline (hashing.py); the module only adds the per-head offsets and gathers.

Epsilons are the demo's, not the backbone's ``ModelConfig.norm_eps``: ``ShortConv`` builds its
RMSNorm with ``norm_eps=1e-5`` (CONV_NORM_EPS), and the gate's two norms (``norm1`` on the key,
``norm2`` on the query) are ``nn.RMSNorm(hidden_size)`` with torch's default ``eps=None``, which
torch resolves to the float32 machine epsilon 2**-23 (GATE_NORM_EPS; float32 is also the compute
type for bfloat16 inputs, and our RMSNorm always computes in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config import EngramConfig
from engram_jax.layers import stats
from engram_jax.layers.common import RMSNorm, normal, project

CONV_NORM_EPS = 1e-5  # demo ShortConv(norm_eps=1e-5)
GATE_NORM_EPS = float(np.finfo(np.float32).eps)  # demo nn.RMSNorm(hidden_size): eps=None -> 2**-23


class Engram(nnx.Module):
    """One Engram module for layer ``layer_id``.

    Parameters: table [R, d_head]; W_V [M, D] + b_V [D]; with the gate W_K [M, D] + b_K [D] and
    two RMSNorm scales [D]; with the conv an RMSNorm scale [D] and depthwise taps [W, D]
    (tap j multiplies position t - (W - 1 - j) * dilation, the layout of torch's Conv1d weight).
    """

    def __init__(self, d_model: int, engram: EngramConfig, layer_id: int, *, rngs: nnx.Rngs):
        self.cfg = engram
        primes = engram.primes()[layer_id]
        sizes = np.array([p for order in primes for p in order], dtype=np.int64)
        rows = int(sizes.sum())
        self.offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        std = engram.table_init_std if engram.table_init_std is not None else engram.d_head**-0.5
        if engram.offload:
            # The table lives in host memory (offload.HostTables), drawn there from this key; the
            # key is taken here so every other parameter gets the same value as without offload.
            key = rngs.params()
            self.table_key = tuple(int(x) for x in np.asarray(jax.random.key_data(key)).ravel())
            self.rows, self.table_std = rows, float(std)
        else:
            self.table = normal(rngs, (rows, engram.d_head), std)
        M = engram.d_mem
        self.w_v = normal(rngs, (M, d_model), M**-0.5)
        self.b_v = nnx.Param(jnp.zeros((d_model,), jnp.float32))
        if engram.gate:
            self.w_k = normal(rngs, (M, d_model), M**-0.5)
            self.b_k = nnx.Param(jnp.zeros((d_model,), jnp.float32))
            self.norm_k = RMSNorm(d_model, eps=GATE_NORM_EPS)
            self.norm_h = RMSNorm(d_model, eps=GATE_NORM_EPS)
        if engram.conv:
            self.conv_norm = RMSNorm(d_model, eps=CONV_NORM_EPS)
            # Zero-initialised as in the paper: at init Y = v~.
            self.conv_w = nnx.Param(jnp.zeros((engram.conv_kernel, d_model), jnp.float32))
        self.d_model = d_model

    def lookup(self, hash_ids_BxTxG: jax.Array) -> jax.Array:
        """Memory vectors e [B, T, M] for hash ids [B, T, G] (ids within each head's sub-table)."""
        if self.cfg.offload:
            raise ValueError("this Engram's table is offloaded to the host: pass the memory "
                             "vectors (offload.HostTables.gather) instead of looking them up")
        rows_BxTxG = hash_ids_BxTxG + jnp.asarray(self.offsets, dtype=hash_ids_BxTxG.dtype)
        e_BxTxGxH = jnp.take(self.table[...], rows_BxTxG, axis=0)
        B, T = hash_ids_BxTxG.shape[:2]
        return e_BxTxGxH.reshape(B, T, self.cfg.d_mem)

    def __call__(self, h_BxTxD: jax.Array, hash_ids_BxTxG: jax.Array,
                 e_BxTxM: jax.Array | None = None) -> jax.Array:
        """Y [B, T, D], the Engram output added to the residual stream.

        Args:
          h_BxTxD: the residual stream entering the layer (the gate's query).
          hash_ids_BxTxG: int32 hash ids from ``NgramHasher`` for this layer.
          e_BxTxM: precomputed memory vectors (host-offloaded tables); skips the lookup.
        """
        dt = h_BxTxD.dtype
        e = (self.lookup(hash_ids_BxTxG) if e_BxTxM is None else e_BxTxM).astype(dt)
        v = project(e, self.w_v[...].astype(dt)) + self.b_v[...].astype(dt)
        if self.cfg.gate:
            k = project(e, self.w_k[...].astype(dt)) + self.b_k[...].astype(dt)
            s = jnp.sum(
                self.norm_h(h_BxTxD).astype(jnp.float32) * self.norm_k(k).astype(jnp.float32),
                axis=-1, keepdims=True,
            ) / jnp.sqrt(jnp.float32(self.d_model))
            s = jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), 1e-6))
            alpha = jax.nn.sigmoid(s)
            stats.record(self, "gate_mean", jnp.mean(alpha))  # only when a step collects
            v = (alpha * v.astype(jnp.float32)).astype(dt)
        if not self.cfg.conv:
            return v
        return v + jax.nn.silu(causal_depthwise_conv(self.conv_norm(v), self.conv_w[...].astype(dt),
                                                     dilation=self.cfg.max_ngram))


def causal_depthwise_conv(x_BxTxD: jax.Array, w_WxD: jax.Array, *, dilation: int) -> jax.Array:
    """y[t] = sum_j w[j] * x[t - (W - 1 - j) * dilation], zeros before the start (causal)."""
    W = w_WxD.shape[0]
    T = x_BxTxD.shape[1]
    pad = (W - 1) * dilation
    xp = jnp.pad(x_BxTxD, ((0, 0), (pad, 0), (0, 0)))
    y = jnp.zeros_like(x_BxTxD)
    for j in range(W):
        y = y + xp[:, j * dilation: j * dilation + T, :] * w_WxD[j]
    return y
