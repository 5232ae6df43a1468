"""Dropless MoE (``moe.dispatch = "dropless"``) against the naive per-expert loop: forward against
the numpy loop of tests/test_model.py with no capacity limit, gradients (parameters and input)
against autodiff of a per-expert loop in JAX, for both grouped matmuls (tiles, ragged_dot); its
buffer layout; the capacity path's drop rate read from the load; executed FLOPs against XLA."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import ModelConfig, MoEConfig, preset
from engram_jax.counting import dropless_rows, flops_per_token, routed_rows_executed
from engram_jax.layers.moe import MoE, capacity, drop_rate, dropless_layout, route
from tests.test_model import naive_moe

def _moe(mcfg: MoEConfig, d_model: int = 16, seed: int = 3) -> MoE:
    moe = MoE(d_model, mcfg, n_layers=2, rngs=nnx.Rngs(seed))
    E = mcfg.n_routed
    moe.router_bias[...] = jnp.asarray(np.random.default_rng(seed).normal(size=E) * 0.1, jnp.float32)
    return moe


def _dropless(mcfg: MoEConfig, gm: str, tile: int) -> MoEConfig:
    return dataclasses.replace(mcfg, dispatch="dropless", grouped_matmul=gm, dropless_tile=tile)


def per_expert_loop(moe: MoE, x_BxTxD: jax.Array) -> jax.Array:
    """The reference in JAX: for every expert, its SwiGLU on every token, weighted by the token's
    gate for that expert (zero where it was not chosen); differentiable by plain autodiff."""
    cfg = moe.cfg
    B, T, D = x_BxTxD.shape
    x = x_BxTxD.reshape(B * T, D)
    idx, gates, _ = route(x, moe.w_router[...], moe.router_bias[...], cfg)
    y = jnp.zeros_like(x)
    for e in range(cfg.n_routed):
        g_e = jnp.sum(jnp.where(idx == e, gates, 0.0), axis=-1)  # [S]
        h = jax.nn.silu(x @ moe.w_gate[e]) * (x @ moe.w_up[e])
        y = y + g_e[:, None] * (h @ moe.w_down[e])
    y = y.reshape(B, T, D)
    if moe.shared is not None:
        y = y + moe.shared(x_BxTxD)
    return y


def _forward(moe: MoE, x) -> tuple:
    graphdef, state = nnx.split(moe)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


@pytest.mark.parametrize("gm,tile,router", [("tiles", 1, "sigmoid"), ("tiles", 3, "softmax"),
                                            ("tiles", 64, "sigmoid"), ("ragged", 1, "softmax")])
def test_dropless_matches_naive_loop(router, gm, tile):
    mcfg = MoEConfig(n_routed=6, top_k=2, n_shared=1, d_expert=12, router=router,
                     capacity_factor=0.5)  # the capacity path would drop; dropless must not
    moe = _moe(mcfg)
    x = np.random.default_rng(2).normal(size=(2, 10, 16)).astype(np.float32)
    ref = naive_moe(_with_cfg(moe, dataclasses.replace(mcfg, capacity_factor=1e3)), x)  # no drops
    y, load, _ = _forward(_with_cfg(moe, _dropless(mcfg, gm, tile)), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)
    assert float(load.sum()) == 2 * 10 * 2
    y_cap, _, _ = _forward(_with_cfg(moe, mcfg), jnp.asarray(x))
    assert not np.allclose(np.asarray(y_cap), ref, rtol=1e-4, atol=1e-5)  # capacity did drop


def _with_cfg(moe: MoE, mcfg: MoEConfig) -> MoE:
    moe.cfg = mcfg
    return moe


def _grads(moe: MoE, fn, x):
    graphdef, state = nnx.split(moe)

    def loss(state, x):
        m = nnx.merge(graphdef, state)
        return jnp.sum(jnp.sin(fn(m, x)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)


@pytest.mark.parametrize("gm,tile,top_k", [("tiles", 1, 2), ("tiles", 3, 1), ("tiles", 3, 4),
                                           ("tiles", 64, 2), ("ragged", 1, 2)])
def test_dropless_gradients_match_per_expert_loop(gm, tile, top_k):
    mcfg = _dropless(MoEConfig(n_routed=7, top_k=top_k, n_shared=1, d_expert=10), gm, tile)
    moe = _moe(mcfg, seed=4)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 9, 16)), jnp.float32)
    v, g = _grads(moe, lambda m, x: m(x)[0], x)
    v_ref, g_ref = _grads(moe, per_expert_loop, x)
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
    leaves, ref = jax.tree.leaves(g), jax.tree.leaves(g_ref)
    assert len(leaves) == len(ref)
    scale = max(float(jnp.max(jnp.abs(b))) for b in ref)  # top_k 1: the router's is rounding
    for a, b in zip(leaves, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
    w_grads = nnx.to_pure_dict(g[0])
    assert float(jnp.max(jnp.abs(w_grads["w_down"]))) > 0


def test_dropless_equals_capacity_without_drops():
    """At a capacity that drops nothing both paths compute the same layer (to rounding)."""
    mcfg = MoEConfig(n_routed=5, top_k=2, n_shared=0, d_expert=8, capacity_factor=5.0)
    moe = _moe(mcfg, seed=7)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 12, 16)), jnp.float32)
    v_cap, g_cap = _grads(moe, lambda m, x: m(x)[0], x)
    _with_cfg(moe, _dropless(mcfg, "tiles", 4))
    v_dl, g_dl = _grads(moe, lambda m, x: m(x)[0], x)
    # The loss sums 384 terms of order one whose cancellation leaves -1.9, and the two paths add
    # expert outputs in different orders: f32 rounding alone moves it by a few 1e-6 relative, and
    # by how much depends on the CPU's kernels. Capacity 1.0, which drops, moves it by 95%.
    np.testing.assert_allclose(float(v_dl), float(v_cap), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(g_dl), jax.tree.leaves(g_cap)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tile", [1, 2, 5])
def test_dropless_layout(tile):
    rng = np.random.default_rng(tile)
    E, A = 6, 37
    e_A = rng.integers(0, E - 1, A).astype(np.int32)  # the last expert gets nothing
    R = dropless_rows(A, E, tile)
    row_A, asg_R, group_T, load_E = (np.asarray(a) for a in dropless_layout(jnp.asarray(e_A), E, tile, R))
    np.testing.assert_array_equal(load_E, np.bincount(e_A, minlength=E))
    assert len(set(row_A.tolist())) == A and row_A.max() < R  # one row per assignment
    np.testing.assert_array_equal(asg_R[row_A], np.arange(A))  # asg_R inverts row_A
    assert np.sum(asg_R == A) == R - A
    assert group_T.shape == (R // tile,)
    np.testing.assert_array_equal(group_T[row_A // tile], e_A)  # each row in its expert's tile
    assert np.all(np.diff(group_T) >= 0)  # tiles sorted by expert
    for e in range(E):  # within an expert, assignments keep their order
        rows = row_A[e_A == e]
        assert np.all(np.diff(rows) == 1)
        if len(rows):
            assert rows[0] % tile == 0


def test_dropless_rows_bound_is_tight():
    """The static row count is reached by some routing: every expert one row past a tile."""
    E, tile = 4, 8
    A = E * (tile + 1)
    e_A = jnp.repeat(jnp.arange(E, dtype=jnp.int32), tile + 1)
    row_A = np.asarray(dropless_layout(e_A, E, tile, dropless_rows(A, E, tile))[0])
    assert row_A.max() + 1 <= dropless_rows(A, E, tile)
    assert dropless_rows(A, E, tile) == E * 2 * tile


@pytest.mark.parametrize("cf", [0.3, 0.8, 1.25, 4.0])
def test_capacity_drop_rate_from_load(cf):
    """``drop_rate`` reads the capacity path's drops off its load: the share of (token, expert)
    pairs the numpy loop leaves out (they would have overflowed their expert's C slots)."""
    mcfg = MoEConfig(n_routed=6, top_k=2, n_shared=0, d_expert=8, capacity_factor=cf)
    moe = _moe(mcfg, seed=9)
    B, T = 3, 11
    x = np.random.default_rng(10).normal(size=(B, T, 16)).astype(np.float32)
    _, load, _ = _forward(moe, jnp.asarray(x))
    C = capacity(mcfg, B * T)
    idx, _, _ = route(jnp.asarray(x.reshape(B * T, 16)), moe.w_router[...], moe.router_bias[...], mcfg)
    idx_tbk = np.swapaxes(np.asarray(idx).reshape(B, T, 2), 0, 1).reshape(-1)
    used, dropped = np.zeros(6, int), 0
    for e in idx_tbk:
        dropped += used[e] >= C
        used[e] += 1
    assert float(drop_rate(load, mcfg, B * T)) == pytest.approx(dropped / (B * T * 2))
    assert (dropped > 0) == (cf < 1.0) or cf == 1.25
    dl = _dropless(mcfg, "tiles", 4)
    assert float(drop_rate(load, dl, B * T)) == 0.0
    stacked = jnp.stack([load, load])
    assert drop_rate(stacked, mcfg, B * T).shape == (2,)


def test_dropless_layer_is_causal():
    """Changing later tokens leaves earlier outputs unchanged (no capacity, nothing to leak)."""
    mcfg = _dropless(MoEConfig(n_routed=5, top_k=2, n_shared=1, d_expert=8), "tiles", 4)
    moe = _moe(mcfg, seed=11)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 20, 16)).astype(np.float32)
    pert = x.copy()
    pert[:, 12:] = rng.normal(size=(2, 8, 16))
    base, out = (np.asarray(_forward(moe, jnp.asarray(a))[0]) for a in (x, pert))
    # Later tokens move the earlier ones' rows within their experts' tiles, so the grouped matmul
    # may round them differently on some CPUs; a leak moves them by orders of magnitude more.
    np.testing.assert_allclose(out[:, :12], base[:, :12], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, 12:], base[:, 12:])


def test_dispatch_changes_no_parameters_and_keeps_hashes():
    base = preset("cpu-1e12")
    dl = base.with_overrides({"moe.dispatch": "dropless"})
    assert dl.param_counts() == base.param_counts()
    assert dl.flops_per_token() == base.flops_per_token()  # the useful FLOPs (MFU's)
    assert dl.hash() != base.hash() and "dispatch" not in base.to_json()
    assert ModelConfig.from_dict(dl.to_dict()) == dl
    with pytest.raises(ValueError, match="dispatch"):
        base.with_overrides({"moe.dispatch": "sorted"})


def test_executed_rows_per_dispatch():
    cfg = preset("cpu-1e12")
    tok = 32 * 128
    m = cfg.moe
    assert routed_rows_executed(cfg, tok) == m.n_routed * capacity(m, tok)
    dl = cfg.with_overrides({"moe.dispatch": "dropless", "moe.dropless_tile": 32})
    assert routed_rows_executed(dl, tok) == dropless_rows(tok * 2, 42, 32) == 9472
    rg = cfg.with_overrides({"moe.dispatch": "dropless", "moe.grouped_matmul": "ragged"})
    assert routed_rows_executed(rg, tok) == tok * 2
    assert flops_per_token(rg, executed=True, tokens=tok) == flops_per_token(rg)


def test_dropless_executed_flops_match_xla_cost_analysis():
    """XLA's count of a dropless (tiles) gradient step is our executed count plus the elementwise
    share (as tests/test_counting.py holds the capacity path to)."""
    from tests.test_counting import FLOP_CFG, MAX_EXCESS_TOTAL, xla_and_ours_per_token

    cfg = FLOP_CFG.with_overrides({"moe.dispatch": "dropless", "moe.dropless_tile": 32})
    xla, ours = xla_and_ours_per_token(cfg)
    assert 1.0 <= xla / ours <= 1.0 + MAX_EXCESS_TOTAL, (xla, ours)
