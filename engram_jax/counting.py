"""Exact parameter and FLOP counts from a ``ModelConfig`` alone (docs/paper.md section 2).

Definitions (the paper's): P_tot = trainable parameters excluding the vocabulary embedding and LM
head; P_act = parameters one token activates (attention, norms, dense FFNs, shared experts, the
router, its top-k routed experts, Engram projections/gates/conv/norms, OverEncoding projections,
hyper-connections);
P_sparse = P_tot - P_act (unselected routed experts plus every Engram and OverEncoding table row).
rho = routed-expert share of P_sparse.

The layout counted here is the one ``model.py`` builds; ``tests/test_counting.py`` checks that the
live parameter count equals ``param_counts()['total']`` exactly on random configs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engram_jax.config import ModelConfig


def engram_dense_params(cfg: ModelConfig) -> int:
    """Non-table parameters of ONE Engram module (value/key projections, gate norms, conv).

    With ``hc_mult = M`` branches (layers/engram_branches.py) W_V stays shared, the key projection
    and both gate norms are per branch (or one set when ``gate_per_branch`` is False), and the
    conv has one norm and D taps per branch.
    """
    e, D, M = cfg.engram, cfg.d_model, cfg.hc_mult
    n = e.d_mem * D + D  # W_V with bias
    if e.gate:
        n_gates = M if e.gate_per_branch else 1
        n += n_gates * (e.d_mem * D + D + 2 * D)  # W_K with bias, RMSNorm(h), RMSNorm(k)
    if e.conv:
        n += M * (D + e.conv_kernel * D)  # RMSNorm before the conv, depthwise taps (no bias)
    return n


def hyperconn_params(cfg: ModelConfig) -> int:
    """Parameters of ONE hyper-connection (layers/hyperconn.py; two per block when hc_mult > 1):
    RMSNorm D, W_alpha D (M + 1), w_beta D, S_alpha M (M + 1), S_beta M, two scales."""
    D, M = cfg.d_model, cfg.hc_mult
    return D * (M + 3) + M * (M + 2) + 2 if M > 1 else 0


def hyperconn_forward_flops(cfg: ModelConfig) -> int:
    """Forward multiply-add FLOPs per token of ONE hyper-connection: the dynamic projections
    (M D (M + 2)), the width mix (M (M + 1) D) and the depth connection (M D), 2 each."""
    D, M = cfg.d_model, cfg.hc_mult
    return 2 * M * D * (M + 2) + 2 * M * (M + 1) * D + 2 * M * D if M > 1 else 0


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of one SwiGLU expert."""
    return 3 * cfg.d_model * cfg.moe.d_expert


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter breakdown; every value is an exact integer.

    Returns keys: total (every trainable parameter), p_tot, active, sparse, embedding (input
    embedding + LM head), routed_experts (all routed experts, selected or not), routed_active
    (top-k of them), engram_tables, engram_dense, attention, dense_ffn, shared_experts, router,
    norms, rho (routed share of sparse; 1.0 when there is no sparse part). With OverEncoding also
    overencoding_tables (sparse memory, like Engram tables) and overencoding_dense (its
    projections, active); with ``hc_mult > 1`` also hyper_connections (active). The keys are
    absent otherwise, so result tables of models without them keep their columns.
    """
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    attention = L * 4 * D * D
    norms = (2 * L + 1) * D
    n_dense = L if cfg.moe is None else cfg.n_dense_layers
    dense_ffn = n_dense * 3 * D * cfg.d_ff
    routed = routed_active = shared = router = 0
    if cfg.moe is not None:
        n_moe = len(cfg.moe_layer_ids)
        pe = expert_params(cfg)
        routed = n_moe * cfg.moe.n_routed * pe
        routed_active = n_moe * cfg.moe.top_k * pe
        shared = n_moe * cfg.moe.n_shared * pe
        router = n_moe * D * cfg.moe.n_routed
    tables = engram_dense = 0
    if cfg.engram is not None:
        tables = sum(cfg.engram.rows().values()) * cfg.engram.d_head
        engram_dense = len(cfg.engram.layer_ids) * engram_dense_params(cfg)
    oe_tables = oe_dense = 0
    if cfg.overencoding is not None:
        oe_tables = cfg.overencoding.rows() * cfg.overencoding.d_sub
        oe_dense = cfg.overencoding.n_tables * cfg.overencoding.d_sub * D
    hc = 2 * L * hyperconn_params(cfg)
    embedding = V * D * (1 if cfg.tie_embeddings else 2)
    p_tot = (attention + norms + dense_ffn + routed + shared + router + tables + engram_dense
             + oe_tables + oe_dense + hc)
    active = (attention + norms + dense_ffn + routed_active + shared + router + engram_dense
              + oe_dense + hc)
    sparse = p_tot - active
    routed_sparse = routed - routed_active
    extra = {}
    if cfg.overencoding is not None:
        extra = {"overencoding_tables": oe_tables, "overencoding_dense": oe_dense}
    if cfg.hc_mult > 1:
        extra["hyper_connections"] = hc
    return {
        "total": p_tot + embedding,
        "p_tot": p_tot,
        "active": active,
        "sparse": sparse,
        "embedding": embedding,
        "routed_experts": routed,
        "routed_active": routed_active,
        "engram_tables": tables,
        "engram_dense": engram_dense,
        "attention": attention,
        "dense_ffn": dense_ffn,
        "shared_experts": shared,
        "router": router,
        "norms": norms,
        "rho": (routed_sparse / sparse) if sparse else 1.0,
        **extra,
    }


def capacity(cfg: ModelConfig, tokens: int) -> int:
    """C, buffer slots per expert for a batch of ``tokens`` tokens."""
    m = cfg.moe
    return max(1, math.ceil(m.capacity_factor * tokens * m.top_k / m.n_routed))


def dropless_rows(n_assignments: int, n_experts: int, tile: int) -> int:
    """Rows of the dropless path's tiled buffer for ``n_assignments`` routed (token, expert)
    pairs: each expert's rows padded to a multiple of ``tile``, sum_e ceil(n_e / tile) tiles, at
    most floor((A + E (tile - 1)) / tile) whatever the routing (the static shape XLA computes)."""
    return (n_assignments + n_experts * (tile - 1)) // tile * tile


def routed_rows_executed(cfg: ModelConfig, tokens: int) -> int:
    """Expert rows one MoE layer computes for a batch of ``tokens`` tokens: E * C capacity slots,
    the dropless tiled buffer, or exactly the K * tokens routed rows (``ragged_dot``)."""
    m = cfg.moe
    if m.dispatch == "capacity":
        return m.n_routed * capacity(cfg, tokens)
    if m.grouped_matmul == "tiles":
        return dropless_rows(tokens * m.top_k, m.n_routed, m.dropless_tile)
    return tokens * m.top_k


def forward_flops_per_token(cfg: ModelConfig, *, executed: bool = False, tokens: int | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass, per token.

    Args:
      executed: count what the dispatch computes (``routed_rows_executed``: E * C capacity
        slots, or the dropless path's tiled rows) instead of the useful top-k work.
      tokens: tokens per batch for ``executed`` (default: one sequence of ``seq_len``).
    """
    D, V, L, T = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.seq_len
    f = L * (2 * 4 * D * D + 2 * 2 * T * D)  # projections + QK^T and AV over the full window
    n_dense = L if cfg.moe is None else cfg.n_dense_layers
    f += n_dense * 2 * 3 * D * cfg.d_ff
    if cfg.moe is not None:
        m = cfg.moe
        n_moe = len(cfg.moe_layer_ids)
        if executed:
            tok = tokens or T
            routed_slots = routed_rows_executed(cfg, tok) / tok
        else:
            routed_slots = m.top_k
        f += n_moe * (2 * D * m.n_routed + 2 * 3 * D * m.d_expert * (routed_slots + m.n_shared))
    if cfg.engram is not None:
        e, M = cfg.engram, cfg.hc_mult
        n_keys = (M if e.gate_per_branch else 1) if e.gate else 0
        per = 2 * e.d_mem * D * (1 + n_keys) + (2 * e.conv_kernel * M * D if e.conv else 0)
        f += len(e.layer_ids) * per
    f += 2 * L * hyperconn_forward_flops(cfg)
    if cfg.overencoding is not None:
        f += 2 * cfg.overencoding.n_tables * cfg.overencoding.d_sub * D
    f += 2 * D * V
    return float(f)


def flops_per_token(cfg: ModelConfig, *, executed: bool = False, tokens: int | None = None) -> float:
    """Training FLOPs per token: forward + backward = 3 x the forward matmul FLOPs, attention
    included; with ``executed`` also the backward-only matmuls of the dropless tiles (each
    tile's weight gradient summed per expert, ``moe.gather_groups``)."""
    f = 3.0 * forward_flops_per_token(cfg, executed=executed, tokens=tokens)
    m = cfg.moe
    if executed and m is not None and m.dispatch == "dropless" and m.grouped_matmul == "tiles":
        tok = tokens or cfg.seq_len
        n_tiles = routed_rows_executed(cfg, tok) // m.dropless_tile
        per_layer = 2 * m.n_routed * n_tiles * 3 * cfg.d_model * m.d_expert
        f += len(cfg.moe_layer_ids) * per_layer / tok
    return f


def flops_per_token_6n(cfg: ModelConfig) -> float:
    """The 6 x P_act approximation (plus the LM head), no attention term."""
    return 6.0 * (param_counts(cfg)["active"] + cfg.d_model * cfg.vocab_size)
