"""Hyper-connections: M residual branches with static plus dynamic mixing (``hc_mult = M > 1``).

Zhu et al., "Hyper-Connections", ICLR 2025, arXiv 2409.19606 (section 2 and Appendix J,
Algorithm 2: dynamic hyper-connections, DHC); docs/paper.md sections 1.7 and 8.2. The residual
stream is a hyper hidden matrix H [B, T, M, D]. Each residual site (attention, FFN) with sublayer
F reads one input from the branches and writes its output back to all of them:

  Hn      = RMSNorm(H)                                   (per branch, over D)
  alpha   = S_alpha + s_alpha * tanh(Hn W_alpha)         [B, T, M, M + 1]
  beta    = S_beta  + s_beta  * tanh(Hn w_beta)          [B, T, M]
  mix_j   = sum_i alpha_ij H_i                           (j = 0..M: column 0 is A_m, 1..M are A_r)
  H'_j    = beta_j F(mix_0) + mix_{j+1}                  (j = 0..M-1)

The published initialisation: S_alpha = [e_{k mod M} | I_M] for residual site k (two per layer:
2 l for attention, 2 l + 1 for the FFN), S_beta = 1, W_alpha = 0, w_beta = 0 and the scales
s_alpha = s_beta = 0.01. Then every branch starts equal to the plain residual stream h and stays
so, the model's output is the branch sum M h, and the final RMSNorm makes it the plain pre-norm
model's (up to its epsilon): hyper-connections start as a residual connection.

The paper normalises with the backbone's LayerNorm; this backbone uses RMSNorm throughout, so the
dynamic part reads ``RMSNorm(H)`` with a learned scale (``norm_eps`` of the model). ``S_alpha`` is
stored flat ([M (M + 1)], reshaped on use) so that the optimizer treats the mixing coefficients as
it treats norm scales (a vector: no weight decay, never Muon); decay would pull the residual
identity A_r = I toward zero. ``W_alpha`` [D, M + 1] is a projection and is trained as one.

Parameters per site: D (norm) + D (M + 1) (W_alpha) + D (w_beta) + M (M + 1) (S_alpha) + M
(S_beta) + 2 (scales) = D (M + 3) + M (M + 2) + 2 (``counting.hyperconn_params``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.layers.common import RMSNorm

DYNAMIC_SCALE_INIT = 0.01  # s_alpha, s_beta at init (Appendix J)


class HyperConnection(nnx.Module):
    """One residual site's hyper-connection for M branches (site index ``site``)."""

    def __init__(self, d_model: int, n_branches: int, site: int, *, norm_eps: float = 1e-6):
        M = n_branches
        static = jnp.concatenate([jax.nn.one_hot(site % M, M, dtype=jnp.float32)[:, None],
                                  jnp.eye(M, dtype=jnp.float32)], axis=1)  # [M, M + 1]
        self.n_branches = M
        self.static_alpha = nnx.Param(static.reshape(-1))
        self.static_beta = nnx.Param(jnp.ones((M,), jnp.float32))
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.dynamic_alpha_fn = nnx.Param(jnp.zeros((d_model, M + 1), jnp.float32))
        self.dynamic_alpha_scale = nnx.Param(jnp.full((1,), DYNAMIC_SCALE_INIT, jnp.float32))
        self.dynamic_beta_fn = nnx.Param(jnp.zeros((d_model,), jnp.float32))
        self.dynamic_beta_scale = nnx.Param(jnp.full((1,), DYNAMIC_SCALE_INIT, jnp.float32))

    def width(self, H_BxTxMxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The width connection for the branches H [B, T, M, D].

        Returns:
          (x [B, T, D] the sublayer's input in H's dtype, the carried branches [B, T, M, D] and
          beta [B, T, M], both float32, for ``depth``).
        """
        M, dt, f32 = self.n_branches, H_BxTxMxD.dtype, jnp.float32
        Hn = self.norm(H_BxTxMxD)
        # The coefficients and the mix are float32: in bfloat16, 1 + 0.01 tanh(.) would round
        # away every dynamic correction below ~0.004.
        wc = jnp.tanh(jnp.einsum("btmd,dj->btmj", Hn, self.dynamic_alpha_fn[...].astype(dt),
                                 preferred_element_type=f32))  # [B, T, M, M + 1]
        alpha = self.static_alpha[...].reshape(M, M + 1) + self.dynamic_alpha_scale[...] * wc
        dc = jnp.tanh(jnp.einsum("btmd,d->btm", Hn, self.dynamic_beta_fn[...].astype(dt),
                                 preferred_element_type=f32))  # [B, T, M]
        beta = self.static_beta[...] + self.dynamic_beta_scale[...] * dc
        mix = jnp.einsum("btij,btid->btjd", alpha, H_BxTxMxD.astype(f32))  # [B, T, M + 1, D]
        return mix[:, :, 0].astype(dt), mix[:, :, 1:], beta

    @staticmethod
    def depth(carried_BxTxMxD: jax.Array, out_BxTxD: jax.Array, beta_BxTxM: jax.Array) -> jax.Array:
        """The depth connection: H' = beta F(x) + carried branches, [B, T, M, D] in F(x)'s dtype
        (``carried`` and ``beta`` are ``width``'s float32 outputs)."""
        H = beta_BxTxM[..., None] * out_BxTxD[:, :, None, :].astype(jnp.float32) + carried_BxTxMxD
        return H.astype(out_BxTxD.dtype)


def expand(h_BxTxD: jax.Array, n_branches: int) -> jax.Array:
    """H_0: M copies of the embedding, [B, T, M, D]."""
    return jnp.broadcast_to(h_BxTxD[:, :, None, :], (*h_BxTxD.shape[:2], n_branches,
                                                     h_BxTxD.shape[-1]))


def collapse(H_BxTxMxD: jax.Array) -> jax.Array:
    """The model's output stream: the sum of the branches, [B, T, D]."""
    return jnp.sum(H_BxTxMxD, axis=2)
