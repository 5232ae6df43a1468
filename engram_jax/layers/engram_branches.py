"""The Engram module on a multi-branch residual (hyper-connections, ``hc_mult = M > 1``).

docs/paper.md section 1.7 (Multi-branch backbone) and the public demo (deepseek-ai/Engram,
``engram_demo_v1.py``: ``Engram.forward`` and ``ShortConv`` with ``hc_mult`` branches). One table
and one value projection are shared by all branches; each branch m has its own key projection, key
norm, query norm and gate, reading its own branch h_m of the residual stream:

  e_t     = concat_j table[hash_j(t) + offset_j],   v_t = W_V e_t + b_V          (shared)
  s_{t,m} = RMSNorm_{h,m}(h_{t,m}) . RMSNorm_{k,m}(W_{K,m} e_t + b_{K,m}) / sqrt(D)
  s      <- sign(s) sqrt(max(|s|, 1e-6));   v~_{t,m} = sigmoid(s_{t,m}) v_t
  Y_m     = v~_m + SiLU(DepthwiseCausalConv(RMSNorm_m(v~_m)))

and the block adds Y_m to branch m (the demo: ``hidden_states = engram(...) + hidden_states``).
The conv is the demo's ``ShortConv`` over M D channels: one RMSNorm per branch and a depthwise
kernel per channel; ``conv_w`` [W, M D] holds channel m D + d, the order of the demo's
``torch.cat(normed_chunks, dim=-1)``. Epsilons and constants are ``layers/engram.py``'s (the demo's).

``EngramConfig.gate_per_branch = False`` is the paper's ablation of per-branch gating
(docs/paper.md section 4: its largest regression): one key projection, key and query norm and gate,
whose query is the mean of the branches, scales the value added to every branch; the conv stays
per branch. With M = 1
the model builds ``layers/engram.Engram`` instead (the same computation, its parameter layout).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.config import EngramConfig
from engram_jax.layers import stats
from engram_jax.layers.common import RMSNorm
from engram_jax.layers.engram import CONV_NORM_EPS, GATE_NORM_EPS, Engram, causal_depthwise_conv


class BranchGate(nnx.Module):
    """One branch's key projection W_K [M_mem, D] + b_K [D], key norm and query norm ([D] each)."""

    def __init__(self, d_mem: int, d_model: int, key: jax.Array):
        self.w_k = nnx.Param(d_mem**-0.5 * jax.random.normal(key, (d_mem, d_model), jnp.float32))
        self.b_k = nnx.Param(jnp.zeros((d_model,), jnp.float32))
        self.norm_k = RMSNorm(d_model, eps=GATE_NORM_EPS)
        self.norm_h = RMSNorm(d_model, eps=GATE_NORM_EPS)

    def __call__(self, e_BxTxM: jax.Array, h_BxTxD: jax.Array) -> jax.Array:
        """alpha = sigmoid(signed sqrt(s)) [B, T] float32 for memory e and query h."""
        dt, D = h_BxTxD.dtype, h_BxTxD.shape[-1]
        k = e_BxTxM @ self.w_k[...].astype(dt) + self.b_k[...].astype(dt)
        s = jnp.sum(self.norm_h(h_BxTxD).astype(jnp.float32) * self.norm_k(k).astype(jnp.float32),
                    axis=-1) / jnp.sqrt(jnp.float32(D))
        s = jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), 1e-6))
        return jax.nn.sigmoid(s)


class MultiBranchEngram(Engram):
    """One Engram module for layer ``layer_id`` on ``n_branches`` residual branches.

    Parameters: table [R, d_head], W_V [M_mem, D] + b_V [D] (shared, drawn first and in the same
    order as ``Engram``'s, so offloading works unchanged); with the gate ``gates``, a list of
    ``BranchGate`` (n_branches of them, or one when ``gate_per_branch`` is False); with the conv
    ``conv_norms`` (n_branches RMSNorm scales [D]) and ``conv_w`` [W, n_branches D], zero-initialised.
    It takes as many random draws as ``Engram`` (table, W_V, one for the gates).
    """

    def __init__(self, d_model: int, engram: EngramConfig, layer_id: int, n_branches: int, *,
                 rngs: nnx.Rngs):
        # The table (or its host key) and W_V exactly as Engram builds them; gate and conv below.
        super().__init__(d_model, dataclasses.replace(engram, gate=False, conv=False), layer_id,
                         rngs=rngs)
        self.cfg = engram
        self.n_branches = n_branches
        if engram.gate:
            # One draw, as Engram's W_K: gate 0 gets Engram's W_K and the backbone drawn after
            # this module gets the weights of the hc_mult = 1 model of the same seed, whatever
            # the number of gates (the two arms of the gate ablation differ only in gates 1..M-1).
            key = rngs.params()
            n_gates = n_branches if engram.gate_per_branch else 1
            self.gates = nnx.List([
                BranchGate(engram.d_mem, d_model, key if m == 0 else jax.random.fold_in(key, m))
                for m in range(n_gates)])
        if engram.conv:
            self.conv_norms = nnx.List([RMSNorm(d_model, eps=CONV_NORM_EPS)
                                        for _ in range(n_branches)])
            self.conv_w = nnx.Param(jnp.zeros((engram.conv_kernel, n_branches * d_model),
                                              jnp.float32))

    def __call__(self, H_BxTxMxD: jax.Array, hash_ids_BxTxG: jax.Array,
                 e_BxTxM: jax.Array | None = None) -> jax.Array:
        """Y [B, T, n_branches, D], added to the branches.

        Args:
          H_BxTxMxD: the residual branches entering the layer (the gates' queries).
          hash_ids_BxTxG: int32 hash ids from ``NgramHasher`` for this layer.
          e_BxTxM: precomputed memory vectors (host-offloaded tables); skips the lookup.
        """
        dt = H_BxTxMxD.dtype
        B, T, nb, D = H_BxTxMxD.shape
        e = (self.lookup(hash_ids_BxTxG) if e_BxTxM is None else e_BxTxM).astype(dt)
        v_BxTxD = e @ self.w_v[...].astype(dt) + self.b_v[...].astype(dt)
        if self.cfg.gate:
            if self.cfg.gate_per_branch:
                a_BxTxN = jnp.stack([g(e, H_BxTxMxD[:, :, m]) for m, g in enumerate(self.gates)],
                                    axis=2)
            else:
                query = jnp.mean(H_BxTxMxD.astype(jnp.float32), axis=2).astype(dt)
                a_BxTxN = jnp.broadcast_to(self.gates[0](e, query)[:, :, None], (B, T, nb))
            stats.record(self, "gate_mean", jnp.mean(a_BxTxN.astype(jnp.float32)))
            v = (a_BxTxN[..., None] * v_BxTxD[:, :, None, :].astype(jnp.float32)).astype(dt)
        else:
            v = jnp.broadcast_to(v_BxTxD[:, :, None, :], (B, T, nb, D))
        if not self.cfg.conv:
            return v
        normed = jnp.stack([n(v[:, :, m]) for m, n in enumerate(self.conv_norms)], axis=2)
        y = causal_depthwise_conv(normed.reshape(B, T, nb * D), self.conv_w[...].astype(dt),
                                  dilation=self.cfg.max_ngram)
        return v + jax.nn.silu(y).reshape(B, T, nb, D)
