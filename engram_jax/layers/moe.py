"""DeepSeekMoE layer: shared experts + fine-grained routed experts with top-k routing.

Routing follows DeepSeek-V3: sigmoid affinities (or softmax), top-k selection on affinity + a
per-expert routing bias, gates = the selected affinities renormalised to sum to one. The bias is
not trained by the gradient: the training step nudges it toward balanced load
(auxiliary-loss-free balancing, engram-paper.md section 1 "Training"); a switch-style auxiliary
loss is available instead.

Dispatch uses capacity buffers [E, C, D] and batched einsums (C = ceil(cf * S * K / E) slots per
expert, overflow dropped), the baseline known to train on an H100 (``ragged_dot``'s backward ran
out of memory there). Slots are filled in time-major order (position t of every sequence before
position t + 1), so whether a token is dropped depends only on tokens at the same or earlier
positions: capacity drops cannot leak information from the future.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.config import MoEConfig
from engram_jax.layers.common import SwiGLU, normal


class RouterBias(nnx.Variable):
    """Per-expert routing bias, updated outside the gradient."""


def capacity(moe: MoEConfig, tokens: int) -> int:
    return max(1, math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.n_routed))


def route(x_SxD: jax.Array, w_router_DxE: jax.Array, bias_E: jax.Array, moe: MoEConfig):
    """Top-k routing.

    Returns:
      idx_SxK (int32 expert ids), gates_SxK (float32, rows sum to 1), probs_SxE (float32
      normalised affinities, for the auxiliary loss).
    """
    logits_SxE = x_SxD.astype(jnp.float32) @ w_router_DxE
    if moe.router == "sigmoid":
        scores = jax.nn.sigmoid(logits_SxE)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        scores = probs = jax.nn.softmax(logits_SxE, axis=-1)
    _, idx_SxK = jax.lax.top_k(scores + jax.lax.stop_gradient(bias_E), moe.top_k)
    sel = jnp.take_along_axis(scores, idx_SxK, axis=-1)
    gates_SxK = sel / jnp.sum(sel, axis=-1, keepdims=True)
    return idx_SxK.astype(jnp.int32), gates_SxK, probs


class MoE(nnx.Module):
    """Shared + routed SwiGLU experts.

    Parameters: router [D, E]; routed w_gate/w_up [E, D, F], w_down [E, F, D]; a shared SwiGLU of
    hidden n_shared * F (the same as n_shared separate experts). Returns (y, load_E, aux_loss).
    """

    def __init__(self, d_model: int, moe: MoEConfig, *, n_layers: int, rngs: nnx.Rngs):
        E, F = moe.n_routed, moe.d_expert
        self.cfg = moe
        self.w_router = normal(rngs, (d_model, E), d_model**-0.5)
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32))
        self.w_gate = normal(rngs, (E, d_model, F), d_model**-0.5)
        self.w_up = normal(rngs, (E, d_model, F), d_model**-0.5)
        self.w_down = normal(rngs, (E, F, d_model), (F * 2 * n_layers) ** -0.5)
        self.shared = SwiGLU(d_model, moe.n_shared * F, n_layers=n_layers, rngs=rngs) if moe.n_shared else None

    def __call__(self, x_BxTxD: jax.Array):
        B, T, D = x_BxTxD.shape
        moe, dt = self.cfg, x_BxTxD.dtype
        E, K = moe.n_routed, moe.top_k
        S = B * T
        C = capacity(moe, S)
        x_SxD = x_BxTxD.reshape(S, D)
        idx_SxK, gates_SxK, probs_SxE = route(x_SxD, self.w_router[...], self.router_bias[...], moe)

        # Slot of each (token, choice) in its expert's buffer, filled in (t, b, k) order (causal).
        tbk = lambda a: jnp.swapaxes(a.reshape(B, T, K), 0, 1).reshape(-1)  # noqa: E731
        e_A = tbk(idx_SxK)  # A = T*B*K assignments
        onehot_AxE = jax.nn.one_hot(e_A, E, dtype=jnp.int32)
        pos_A = jnp.sum((jnp.cumsum(onehot_AxE, axis=0) - 1) * onehot_AxE, axis=-1)
        keep_A = pos_A < C
        slot_A = jnp.where(keep_A, e_A * C + pos_A, E * C)  # E*C: the overflow slot
        tok_A = tbk(jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[:, None], (S, K)))
        # Which token fills each slot (S = an all-zero row for empty slots): a gather, not a scatter.
        slot_tok = jnp.full((E * C + 1,), S, jnp.int32).at[slot_A].set(tok_A)[: E * C]
        x_pad = jnp.concatenate([x_SxD, jnp.zeros((1, D), dt)], axis=0)
        buf_ExCxD = x_pad[slot_tok].reshape(E, C, D)

        g = jnp.einsum("ecd,edf->ecf", buf_ExCxD, self.w_gate[...].astype(dt))
        u = jnp.einsum("ecd,edf->ecf", buf_ExCxD, self.w_up[...].astype(dt))
        out_ExCxD = jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, self.w_down[...].astype(dt))

        out_pad = jnp.concatenate([out_ExCxD.reshape(E * C, D), jnp.zeros((1, D), dt)], axis=0)
        w_A = (tbk(gates_SxK) * keep_A).astype(dt)
        y_TxBxKxD = (out_pad[slot_A] * w_A[:, None]).reshape(T, B, K, D)
        y_SxD = jnp.swapaxes(jnp.sum(y_TxBxKxD, axis=2), 0, 1).reshape(S, D)
        y_BxTxD = y_SxD.reshape(B, T, D)
        if self.shared is not None:
            y_BxTxD = y_BxTxD + self.shared(x_BxTxD)

        load_E = jnp.sum(onehot_AxE, axis=0).astype(jnp.float32)
        # Switch-style balance loss: E * sum_e (fraction routed to e) * (mean affinity of e).
        aux = E * jnp.sum(load_E / (S * K) * jnp.mean(probs_SxE, axis=0))
        return y_BxTxD, load_E, aux


def updated_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded."""
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)
