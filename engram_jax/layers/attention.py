"""Causal multi-head self-attention with rotary position embeddings (RoPE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.layers.common import normal


def rope(x_BxTxNxH: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE over the last axis (H even), positions 0..T-1."""
    T, H = x_BxTxNxH.shape[1], x_BxTxNxH.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    ang_TxH2 = jnp.arange(T, dtype=jnp.float32)[:, None] * inv[None, :]
    cos = jnp.cos(ang_TxH2)[None, :, None, :]
    sin = jnp.sin(ang_TxH2)[None, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
    """Causal MHA: W_q, W_k, W_v [D, N, Dh], W_o [N, Dh, D]; 4 * D^2 parameters, no biases."""

    def __init__(self, d_model: int, n_heads: int, *, n_layers: int, rope_theta: float,
                 rngs: nnx.Rngs):
        dh = d_model // n_heads
        self.wq = normal(rngs, (d_model, n_heads, dh), d_model**-0.5)
        self.wk = normal(rngs, (d_model, n_heads, dh), d_model**-0.5)
        self.wv = normal(rngs, (d_model, n_heads, dh), d_model**-0.5)
        self.wo = normal(rngs, (n_heads, dh, d_model), (d_model * 2 * n_layers) ** -0.5)
        self.rope_theta = rope_theta

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        dt = x_BxTxD.dtype
        q = rope(jnp.einsum("btd,dnh->btnh", x_BxTxD, self.wq[...].astype(dt)), self.rope_theta)
        k = rope(jnp.einsum("btd,dnh->btnh", x_BxTxD, self.wk[...].astype(dt)), self.rope_theta)
        v = jnp.einsum("btd,dnh->btnh", x_BxTxD, self.wv[...].astype(dt))
        o_BxTxNxH = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jnp.einsum("btnh,nhd->btd", o_BxTxNxH, self.wo[...].astype(dt))
