"""Causal multi-head self-attention with rotary position embeddings (RoPE).

The attention core runs on one of three kernels (``attention_impl``): cuDNN's fused attention
(``jax.nn.dot_product_attention(implementation="cudnn")``: no [B, N, T, T] scores in memory) on a
CUDA GPU for bf16 / fp16 at head widths it supports, XLA's plain path
(``implementation="xla"``, what ``implementation=None`` picks) elsewhere on an accelerator, and on
the CPU the heads-major layout (``causal_attention_heads_major``), XLA's fastest there.
``ModelConfig.attention`` forces one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.layers.common import normal, project


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
                 rngs: nnx.Rngs, impl: str = "auto"):
        dh = d_model // n_heads
        self.wq = normal(rngs, (d_model, n_heads, dh), d_model**-0.5)
        self.wk = normal(rngs, (d_model, n_heads, dh), d_model**-0.5)
        self.wv = normal(rngs, (d_model, n_heads, dh), d_model**-0.5)
        self.wo = normal(rngs, (n_heads, dh, d_model), (d_model * 2 * n_layers) ** -0.5)
        self.rope_theta = rope_theta
        self.impl = impl

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        dt = x_BxTxD.dtype
        q = rope(project(x_BxTxD, self.wq[...].astype(dt)), self.rope_theta)  # btd,dnh->btnh
        k = rope(project(x_BxTxD, self.wk[...].astype(dt)), self.rope_theta)
        v = project(x_BxTxD, self.wv[...].astype(dt))
        o_BxTxNxH = causal_attention(q, k, v, attention_impl(self.impl, dt, q.shape[-1]))
        return project(o_BxTxNxH, self.wo[...].astype(dt), 2)  # btnh,nhd->btd


def cudnn_supported(dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes this case on this process's first device: a CUDA
    GPU of compute capability 8.0 or later (Ampere, Hopper, Blackwell), bf16 or fp16, a head width
    that is a multiple of 8 and at most 128 (the bound on every such GPU; Hopper takes 256)."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    if head_dim % 8 or head_dim > 128:
        return False
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    platform = str(getattr(getattr(dev, "client", None), "platform_version", "")).lower()
    if not cc or "cuda" not in platform:
        return False  # a ROCm GPU, or one that does not say
    try:
        return tuple(int(x) for x in str(cc).split(".")[:2]) >= (8, 0)
    except ValueError:
        return False


def attention_impl(choice: str, dtype, head_dim: int) -> str:
    """The kernel ``choice`` ("auto", "cudnn", "xla", "heads_major") resolves to here: "auto" is
    "cudnn" where ``cudnn_supported``, "heads_major" on the CPU and "xla" elsewhere."""
    if choice != "auto":
        return choice
    if jax.default_backend() == "cpu":
        return "heads_major"
    return "cudnn" if cudnn_supported(dtype, head_dim) else "xla"


def causal_attention(q_BxTxNxH: jax.Array, k_BxSxNxH: jax.Array, v_BxSxNxH: jax.Array,
                     impl: str) -> jax.Array:
    """Causal softmax attention (scale 1/sqrt(H)) on the kernel ``impl`` ("cudnn", "xla",
    "heads_major"); [B, T, N, H] in and out."""
    if impl == "heads_major":
        return causal_attention_heads_major(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH)
    if impl not in ("cudnn", "xla"):
        raise ValueError(f"unknown attention kernel {impl!r}")
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, is_causal=True,
                                        implementation=impl)


def causal_attention_heads_major(q_BxTxNxH: jax.Array, k_BxSxNxH: jax.Array,
                                 v_BxSxNxH: jax.Array) -> jax.Array:
    """``jax.nn.dot_product_attention(q, k, v, is_causal=True)`` computed with the heads moved
    in front of the positions ([B, N, T, H]) before the two batched matmuls, and the softmax's
    division applied to the [B, N, T, H] output instead of the [B, N, T, T] probabilities.

    Same mathematics (scale 1/sqrt(H), applied to q, causal mask, softmax in float32), other
    float rounding: o = (exp(s - m) @ v) / sum(exp(s - m)) with m the row maximum (held constant under the
    gradient, which does not change it: the softmax is invariant to the shift) and the causal
    mask an additive -1e30 ([T, T], broadcast inside the fusion). On the CPU, at the ladder's
    head sizes (12 to 18), XLA runs the batched matmuls of this layout much faster than those of
    the [B, T, N, H] layout, and dividing the H-wide output rather than the T-wide probabilities
    saves a pass over the largest tensor of the layer (``results/bench/README.md``). Other
    backends keep ``jax.nn.dot_product_attention``, which may pick a fused kernel there.
    """
    dt = q_BxTxNxH.dtype
    H, T = q_BxTxNxH.shape[-1], q_BxTxNxH.shape[1]
    if k_BxSxNxH.shape[1] != T:
        raise ValueError(f"self-attention: {T} queries but {k_BxSxNxH.shape[1]} keys")
    q = jnp.swapaxes(q_BxTxNxH, 1, 2) * jnp.asarray(H**-0.5, dt)
    k = jnp.swapaxes(k_BxSxNxH, 1, 2)
    v = jnp.swapaxes(v_BxSxNxH, 1, 2)
    s_BxNxTxT = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    mask_TxT = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), 0.0, -1e30).astype(jnp.float32)
    s_BxNxTxT = s_BxNxTxT + mask_TxT
    m_BxNxTx1 = jax.lax.stop_gradient(jnp.max(s_BxNxTxT, axis=-1, keepdims=True))
    e_BxNxTxT = jnp.exp(s_BxNxTxT - m_BxNxTx1)  # the diagonal is never masked: row sums >= 1
    l_BxNxTx1 = jnp.sum(e_BxNxTxT, axis=-1, keepdims=True)
    # In the input dtype, then float32: asked for a float32 result directly, XLA's CPU backend
    # returned wrong values for this bf16 x bf16 matmul inside the whole bf16 model
    # (tests/test_model.py::test_bf16_compute_close_to_f32).
    o_BxNxTxH = jnp.einsum("bnts,bnsh->bnth", e_BxNxTxT.astype(dt), v).astype(jnp.float32)
    return jnp.swapaxes((o_BxNxTxH / l_BxNxTx1).astype(dt), 1, 2)
