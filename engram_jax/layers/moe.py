"""DeepSeekMoE layer: shared experts + fine-grained routed experts with top-k routing.

Routing follows DeepSeek-V3: sigmoid affinities (or softmax), top-k selection on affinity + a
per-expert routing bias, gates = the selected affinities renormalised to sum to one. The bias is
not trained by the gradient: the training step nudges it toward balanced load
(auxiliary-loss-free balancing, docs/paper.md section 1.8 (Training)); a switch-style auxiliary
loss is available instead.

Dispatch uses capacity buffers [E, C, D] and batched einsums (C = ceil(cf * S * K / E) slots per
expert, overflow dropped), the baseline known to train on an H100 (``ragged_dot``'s backward ran
out of memory there). Slots are filled in time-major order (position t of every sequence before
position t + 1), so whether a token is dropped depends only on tokens at the same or earlier
positions: capacity drops cannot leak information from the future. Dispatch and combine are row
gathers whose gradients are gathers too (``take_rows``), not the scatter-adds that autodiff of a
gather gives. The layer's drop rate follows from its load: expert e keeps min(load_e, C) of its
assignments (``drop_rate``).

``MoEConfig.dispatch = "dropless"`` drops nothing (DeepSeek-V3's MoE; MaxText's sorted tokens and
grouped matmuls): the (token, expert) assignments are sorted by expert, each expert's rows are
padded to a multiple of a tile (``dropless_layout``), one batched matmul runs over the tiles with
each tile's expert weights (``grouped_matmul_tiles``, whose weight gradient is the per-tile
x^T dy summed per expert) or ``jax.lax.ragged_dot`` runs over the unpadded rows, and the outputs
are gathered back to the tokens. Dispatch and combine are the same ``take_rows`` gathers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config import MoEConfig
from engram_jax.layers.common import SwiGLU, normal, project, project_grouped


class RouterBias(nnx.Variable):
    """Per-expert routing bias, updated outside the gradient."""


@jax.custom_vjp
def take_rows(x_NxD: jax.Array, idx_M: jax.Array, inv_NxR: jax.Array) -> jax.Array:
    """Rows ``idx_M`` of x with a zero row appended (index N reads zeros): [M, D].

    ``inv_NxR`` is the gather's inverse: for each row n of x, the R positions m with
    ``idx_M[m] == n``, padded with M (every row is read at most R times). The gradient is then
    ``dx[n] = sum_r dy[inv[n, r]]``, a gather, where autodiff of the forward gather would give a
    scatter-add, which XLA's CPU backend runs serially. It adds the same terms (for R <= 2 in the
    same result bit for bit, addition being commutative; for more, in another order).
    """
    return jnp.concatenate([x_NxD, jnp.zeros((1, x_NxD.shape[1]), x_NxD.dtype)])[idx_M]


def _take_rows_fwd(x_NxD, idx_M, inv_NxR):
    return take_rows(x_NxD, idx_M, inv_NxR), (idx_M, inv_NxR)


def _take_rows_bwd(res, dy_MxD):
    idx_M, inv_NxR = res
    dy_pad = jnp.concatenate([dy_MxD, jnp.zeros((1, dy_MxD.shape[1]), dy_MxD.dtype)])
    dx_NxD = jnp.sum(dy_pad[inv_NxR], axis=1)
    f0 = jax.dtypes.float0  # integer inputs have no cotangent
    return dx_NxD, np.zeros(idx_M.shape, f0), np.zeros(inv_NxR.shape, f0)


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def capacity(moe: MoEConfig, tokens: int) -> int:
    return max(1, math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.n_routed))


def drop_rate(load_E: jax.Array, moe: MoEConfig, tokens: int) -> jax.Array:
    """Share of a layer's (token, expert) assignments the capacity path dropped, from its load
    [..., E]: slots fill in order, so expert e keeps min(load_e, C) of load_e (exactly what
    ``MoE`` computes). Zero for the dropless path."""
    if moe.dispatch == "dropless":
        return jnp.zeros(load_E.shape[:-1], jnp.float32)
    C = capacity(moe, tokens)
    return jnp.sum(jnp.maximum(load_E - C, 0.0), axis=-1) / (tokens * moe.top_k)


@jax.custom_vjp
def gather_groups(w_GxIxO: jax.Array, group_N: jax.Array) -> jax.Array:
    """``w[group]`` [N, I, O] whose gradient sums the N rows' gradients per group as one matmul
    (a one-hot [G, N] contraction) instead of autodiff's scatter-add."""
    return w_GxIxO[group_N]


def _gather_groups_fwd(w_GxIxO, group_N):
    return w_GxIxO[group_N], (group_N, w_GxIxO.shape[0])


def _gather_groups_bwd(res, dw_NxIxO):
    group_N, G = res
    n, n_in, n_out = dw_NxIxO.shape
    onehot_GxN = jax.nn.one_hot(group_N, G, dtype=dw_NxIxO.dtype, axis=0)
    dw = jnp.dot(onehot_GxN, dw_NxIxO.reshape(n, n_in * n_out), preferred_element_type=jnp.float32)
    return (dw.reshape(G, n_in, n_out).astype(dw_NxIxO.dtype),
            np.zeros(group_N.shape, jax.dtypes.float0))


gather_groups.defvjp(_gather_groups_fwd, _gather_groups_bwd)


def grouped_matmul_tiles(x_NxBxI: jax.Array, w_GxIxO: jax.Array, group_N: jax.Array) -> jax.Array:
    """Tile n of x times its group's weight, ``x[n] @ w[group[n]]`` [N, B, O]: one batched
    matmul (``project_grouped``); the weight gradient is the batched x^T dy summed per group."""
    return project_grouped(x_NxBxI, gather_groups(w_GxIxO, group_N))


def dropless_layout(e_A: jax.Array, n_experts: int, tile: int, n_rows: int):
    """Where each (token, expert) assignment goes in the dropless buffer.

    Assignments are sorted by expert (stably: in their given order within an expert); expert e's
    block starts at a multiple of ``tile`` and holds ceil(load_e / tile) tiles; the rest of the
    ``n_rows`` rows (``counting.dropless_rows``) are padding.

    Returns:
      row_A (the buffer row of each assignment), asg_R (the assignment in each row, A for padding),
      group_T (the expert of each tile; unused tiles get the last expert and hold zeros), load_E
      (int32 assignments per expert).
    """
    A, E = e_A.shape[0], n_experts
    load_E = jnp.sum(jax.nn.one_hot(e_A, E, dtype=jnp.int32), axis=0)
    order_A = jnp.argsort(e_A, stable=True)  # sorted position -> assignment
    rank_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
    start_E = jnp.cumsum(load_E) - load_E
    tiles_E = (load_E + tile - 1) // tile
    tile_end_E = jnp.cumsum(tiles_E)
    row_A = (tile_end_E - tiles_E)[e_A] * tile + rank_A - start_E[e_A]
    asg_R = jnp.full((n_rows + 1,), A, jnp.int32).at[row_A].set(
        jnp.arange(A, dtype=jnp.int32))[:n_rows]
    group_T = jnp.minimum(jnp.searchsorted(tile_end_E, jnp.arange(n_rows // tile), side="right"),
                          E - 1).astype(jnp.int32)
    return row_A.astype(jnp.int32), asg_R, group_T, load_E


def route(x_SxD: jax.Array, w_router_DxE: jax.Array, bias_E: jax.Array, moe: MoEConfig):
    """Top-k routing.

    Returns:
      idx_SxK (int32 expert ids), gates_SxK (float32, rows sum to 1), probs_SxE (float32
      normalised affinities, for the auxiliary loss).
    """
    logits_SxE = project(x_SxD.astype(jnp.float32), w_router_DxE)
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
        if self.cfg.dispatch == "dropless":
            return self._dropless(x_BxTxD)
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
        A = S * K
        # Which assignment fills each slot (A: none), and so which token (S: an all-zero row).
        slot_asg = jnp.full((E * C + 1,), A, jnp.int32).at[slot_A].set(
            jnp.arange(A, dtype=jnp.int32))[: E * C]
        tok_A = tbk(jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[:, None], (S, K)))
        slot_tok = jnp.concatenate([tok_A, jnp.array([S], jnp.int32)])[slot_asg]
        slot_SxK = jnp.swapaxes(slot_A.reshape(T, B, K), 0, 1).reshape(S, K)  # back to (b, t, k)
        buf_ExCxD = take_rows(x_SxD, slot_tok, slot_SxK).reshape(E, C, D)

        g = project_grouped(buf_ExCxD, self.w_gate[...].astype(dt))  # ecd,edf->ecf
        u = project_grouped(buf_ExCxD, self.w_up[...].astype(dt))
        out_ExCxD = project_grouped(jax.nn.silu(g) * u, self.w_down[...].astype(dt))  # ecf,efd->ecd

        w_A = (tbk(gates_SxK) * keep_A).astype(dt)
        out_AxD = take_rows(out_ExCxD.reshape(E * C, D), slot_A, slot_asg[:, None])
        y_TxBxKxD = (out_AxD * w_A[:, None]).reshape(T, B, K, D)
        y_SxD = jnp.swapaxes(jnp.sum(y_TxBxKxD, axis=2), 0, 1).reshape(S, D)
        y_BxTxD = y_SxD.reshape(B, T, D)
        if self.shared is not None:
            y_BxTxD = y_BxTxD + self.shared(x_BxTxD)

        load_E = jnp.sum(onehot_AxE, axis=0).astype(jnp.float32)
        # Switch-style balance loss: E * sum_e (fraction routed to e) * (mean affinity of e).
        aux = E * jnp.sum(load_E / (S * K) * jnp.mean(probs_SxE, axis=0))
        return y_BxTxD, load_E, aux

    def _dropless(self, x_BxTxD: jax.Array):
        """Every assignment computed: sorted by expert, grouped matmuls, gathered back."""
        from engram_jax.counting import dropless_rows

        B, T, D = x_BxTxD.shape
        moe, dt = self.cfg, x_BxTxD.dtype
        E, K = moe.n_routed, moe.top_k
        S, A = B * T, B * T * K
        x_SxD = x_BxTxD.reshape(S, D)
        idx_SxK, gates_SxK, probs_SxE = route(x_SxD, self.w_router[...], self.router_bias[...], moe)
        ragged = moe.grouped_matmul == "ragged"
        tile = 1 if ragged else moe.dropless_tile
        R = A if ragged else dropless_rows(A, E, tile)
        row_A, asg_R, group_T, load_E = dropless_layout(idx_SxK.reshape(A), E, tile, R)
        tok_R = jnp.concatenate([jnp.arange(A, dtype=jnp.int32) // K,
                                 jnp.array([S], jnp.int32)])[asg_R]  # S: an all-zero row
        buf_RxD = take_rows(x_SxD, tok_R, row_A.reshape(S, K))
        w_gate, w_up, w_down = (w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down))
        if ragged:
            mm = lambda x, w: jax.lax.ragged_dot(x, w, load_E)  # noqa: E731
        else:
            mm = lambda x, w: grouped_matmul_tiles(  # noqa: E731
                x.reshape(R // tile, tile, -1), w, group_T).reshape(R, -1)
        h_RxF = jax.nn.silu(mm(buf_RxD, w_gate)) * mm(buf_RxD, w_up)
        out_RxD = mm(h_RxF, w_down)
        out_AxD = take_rows(out_RxD, row_A, asg_R[:, None])
        y_SxKxD = out_AxD.reshape(S, K, D) * gates_SxK.astype(dt)[:, :, None]
        y_BxTxD = jnp.sum(y_SxKxD, axis=1).reshape(B, T, D)
        if self.shared is not None:
            y_BxTxD = y_BxTxD + self.shared(x_BxTxD)
        load_E = load_E.astype(jnp.float32)
        aux = E * jnp.sum(load_E / A * jnp.mean(probs_SxE, axis=0))
        return y_BxTxD, load_E, aux


def updated_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded."""
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)
