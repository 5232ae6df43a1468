"""Model invariances and references: causality, MoE vs a naive per-expert loop, dense
equivalence, zero Engram output == backbone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import ModelConfig, MoEConfig, preset
from engram_jax.layers.attention import rope
from engram_jax.layers.common import SwiGLU
from engram_jax.layers.moe import MoE, capacity, updated_bias
from engram_jax.model import HybridLM, logits

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 on CPU; do not loosen


def _randomise_conv(model: HybridLM, seed: int = 0):
    """The paper zero-inits the conv; give it taps so the conv path is exercised."""
    rng = np.random.default_rng(seed)
    for blk in model.blocks:
        if blk.engram is not None and blk.engram.cfg.conv:
            blk.engram.conv_w[...] = jnp.asarray(rng.normal(size=blk.engram.conv_w.shape), jnp.float32)


@pytest.mark.parametrize("seed", range(4))
def test_causality_random_perturbations(seed):
    """Changing a future token leaves every earlier logit unchanged (attention, hashing, conv, MoE
    capacity drops). Capacity is made tight so that drops actually happen."""
    cfg = preset("tiny").with_overrides({"moe.capacity_factor": 0.5})
    model = HybridLM(cfg, rngs=nnx.Rngs(seed))
    _randomise_conv(model, seed)
    rng = np.random.default_rng(seed)
    B, T = 3, 24
    ids = rng.integers(0, cfg.vocab_size, size=(B, T))
    base = np.asarray(logits(model, ids))
    for _ in range(3):
        t = int(rng.integers(1, T))
        pert = ids.copy()
        pert[:, t:] = rng.integers(0, cfg.vocab_size, size=(B, T - t))
        out = np.asarray(logits(model, pert))
        np.testing.assert_allclose(out[:, :t], base[:, :t], **TOL)
        assert not np.allclose(out[:, t], base[:, t]), "perturbation had no effect at t"


def test_causality_gradient():
    """d logits[t] / d embedding[s] == 0 for s > t (the gradient-based check)."""
    cfg = preset("tiny")
    model = HybridLM(cfg, rngs=nnx.Rngs(1))
    _randomise_conv(model)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 16))
    from engram_jax.model import default_hash_fn

    hid = {k: jnp.asarray(v) for k, v in default_hash_fn(cfg)(ids).items()}
    t = 7

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        out, _ = nnx.merge(graphdef, p, rest)(jnp.asarray(ids, jnp.int32), hid)
        return jnp.sum(out[0, t])

    g = nnx.to_pure_dict(jax.grad(f)(params))["embed"]
    future = np.unique(ids[0, t + 1:])
    past = np.unique(ids[0, : t + 1])
    only_future = np.setdiff1d(future, past)
    assert np.all(np.asarray(g)[only_future] == 0)
    assert np.any(np.asarray(g)[past] != 0)


def naive_moe(moe: MoE, x_BxTxD: np.ndarray) -> np.ndarray:
    """Per-token, per-expert loop in numpy with the same routing and (t, b, k) capacity order."""
    cfg = moe.cfg
    B, T, D = x_BxTxD.shape
    Wr, bias = np.asarray(moe.w_router[...]), np.asarray(moe.router_bias[...])
    Wg, Wu, Wd = (np.asarray(w[...], np.float64) for w in (moe.w_gate, moe.w_up, moe.w_down))
    C = capacity(cfg, B * T)
    used = np.zeros(cfg.n_routed, int)
    y = np.zeros((B, T, D))
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    for t in range(T):
        for b in range(B):
            x = x_BxTxD[b, t].astype(np.float64)
            logit = x @ Wr
            score = 1 / (1 + np.exp(-logit)) if cfg.router == "sigmoid" else np.exp(logit - logit.max()) / np.exp(logit - logit.max()).sum()
            top = np.argsort(-(score + bias), kind="stable")[: cfg.top_k]
            gates = score[top] / score[top].sum()
            for e, gt in zip(top, gates):
                if used[e] < C:
                    y[b, t] += gt * ((silu(x @ Wg[e]) * (x @ Wu[e])) @ Wd[e])
                used[e] += 1
    if moe.shared is not None:
        sh = moe.shared
        xs = x_BxTxD.astype(np.float64)
        y += (silu(xs @ np.asarray(sh.w_gate[...])) * (xs @ np.asarray(sh.w_up[...]))) @ np.asarray(sh.w_down[...])
    return y


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
@pytest.mark.parametrize("cf", [0.6, 4.0])  # with drops, and without
def test_moe_matches_naive_loop(router, cf):
    mcfg = MoEConfig(n_routed=6, top_k=2, n_shared=1, d_expert=12, router=router, capacity_factor=cf)
    moe = MoE(16, mcfg, n_layers=2, rngs=nnx.Rngs(3))
    moe.router_bias[...] = jnp.asarray(np.random.default_rng(1).normal(size=6) * 0.1, jnp.float32)
    x = np.random.default_rng(2).normal(size=(2, 10, 16)).astype(np.float32)
    y, load, _ = moe(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), naive_moe(moe, x), rtol=1e-4, atol=1e-5)
    assert float(load.sum()) == 2 * 10 * 2


def _moe_grads(moe: MoE, x):
    graphdef, state = nnx.split(moe)

    def loss(state, x):
        y, _, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(jnp.sin(y)) + aux

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)


@pytest.mark.parametrize("top_k,cf", [(2, 0.6), (2, 1.25), (4, 0.8)])
def test_moe_gather_gradients_match_autodiff_of_the_gathers(monkeypatch, top_k, cf):
    """Dispatch and combine differentiate as gathers (``take_rows``); autodiff of the plain gathers
    (scatter-adds) must give the same loss and gradients: bit for bit at top_k 2, where each
    token's gradient adds two terms, and to rounding at top_k 4."""
    from engram_jax.layers import moe as moe_lib

    mcfg = MoEConfig(n_routed=10, top_k=top_k, n_shared=1, d_expert=12, capacity_factor=cf)
    moe = MoE(16, mcfg, n_layers=2, rngs=nnx.Rngs(4))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 20, 16)), jnp.float32)
    (v, (gs, gx)) = _moe_grads(moe, x)
    monkeypatch.setattr(moe_lib, "take_rows", lambda x_NxD, idx, inv: jnp.concatenate(
        [x_NxD, jnp.zeros((1, x_NxD.shape[1]), x_NxD.dtype)])[idx])
    (v_ref, (gs_ref, gx_ref)) = _moe_grads(moe, x)
    leaves, ref = jax.tree.leaves((gs, gx)), jax.tree.leaves((gs_ref, gx_ref))
    assert float(v) == float(v_ref) and len(leaves) == len(ref)
    assert any(float(jnp.max(jnp.abs(a))) > 0 for a in leaves)
    for a, b in zip(leaves, ref):
        if top_k <= 2:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_take_rows_and_its_gradient_against_numpy():
    from engram_jax.layers.moe import take_rows

    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    idx = np.array([2, 5, 0, 2, 4, 5, 1], np.int32)  # 5: the zero row; row 3 is never read
    M = len(idx)
    inv = np.full((5, 2), M, np.int32)
    for n in range(5):
        ms = np.flatnonzero(idx == n)
        inv[n, : len(ms)] = ms
    dy = rng.normal(size=(M, 3)).astype(np.float32)
    y, vjp = jax.vjp(lambda x: take_rows(x, jnp.asarray(idx), jnp.asarray(inv)), jnp.asarray(x))
    x_pad = np.concatenate([x, np.zeros((1, 3), np.float32)])
    np.testing.assert_array_equal(np.asarray(y), x_pad[idx])
    dx_ref = np.zeros((6, 3), np.float32)
    np.add.at(dx_ref, idx, dy)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dy))[0]), dx_ref[:5], rtol=1e-6)


@pytest.mark.parametrize("shapes,n_in", [(((2, 7, 6), (6, 3, 4)), 1), (((2, 7, 3, 4), (3, 4, 6)), 2),
                                         (((5, 6), (6, 9)), 1)])
def test_project_equals_the_einsum_and_its_gradients(shapes, n_in):
    """``project`` is ``tensordot``: the same forward bit for bit, gradients to rounding (on the
    CPU its weight gradient is x^T @ dy with x^T materialised); bfloat16 takes the einsum itself."""
    from engram_jax.layers.common import project

    rng = np.random.default_rng(7)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
    probe = jnp.asarray(rng.normal(size=jnp.tensordot(x, w, n_in).shape), jnp.float32)
    f = lambda fn: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w)) * probe),  # noqa: E731
                                              argnums=(0, 1)))
    y, y_ref = project(x, w, n_in), jnp.tensordot(x, w, n_in)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    (v, g), (v_ref, g_ref) = f(lambda x, w: project(x, w, n_in))(x, w), f(
        lambda x, w: jnp.tensordot(x, w, n_in))(x, w)
    assert float(v) == float(v_ref)
    for a, b in zip(g, g_ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(project(xb, wb, n_in), np.float32),
                                  np.asarray(jnp.tensordot(xb, wb, n_in), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        project(x, w[1:], n_in)


def test_project_grouped_equals_the_experts_einsum():
    from engram_jax.layers.common import project_grouped

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(4, 9, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    ref = lambda x, w: jnp.einsum("gsi,gio->gso", x, w)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(project_grouped(x, w)), np.asarray(ref(x, w)))
    loss = lambda fn: jax.grad(lambda x, w: jnp.sum(jnp.tanh(fn(x, w))), argnums=(0, 1))  # noqa: E731
    for a, b in zip(loss(project_grouped)(x, w), loss(ref)(x, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_one_expert_top1_equals_dense_mlp():
    mcfg = MoEConfig(n_routed=1, top_k=1, n_shared=0, d_expert=24)
    moe = MoE(16, mcfg, n_layers=1, rngs=nnx.Rngs(0))
    mlp = SwiGLU(16, 24, n_layers=1, rngs=nnx.Rngs(1))
    mlp.w_gate[...], mlp.w_up[...], mlp.w_down[...] = moe.w_gate[0], moe.w_up[0], moe.w_down[0]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 16)), jnp.float32)
    np.testing.assert_allclose(np.asarray(moe(x)[0]), np.asarray(mlp(x)), **TOL)


def test_zero_engram_output_equals_backbone():
    """With the value projection zeroed the gated value is 0, so Y = 0 + SiLU(conv(norm(0))) = 0
    and the hybrid must equal the same backbone without Engram."""
    cfg = preset("tiny")
    hybrid = HybridLM(cfg, rngs=nnx.Rngs(0))
    _randomise_conv(hybrid)
    backbone = HybridLM(dataclasses.replace(cfg, engram=None), rngs=nnx.Rngs(5))
    pure = nnx.to_pure_dict(nnx.state(hybrid))
    for blk_state in pure["blocks"].values():
        blk_state.pop("engram", None)
    state_b = nnx.state(backbone)
    nnx.replace_by_pure_dict(state_b, pure)
    nnx.update(backbone, state_b)
    for blk in hybrid.blocks:
        if blk.engram is not None:
            blk.engram.w_v[...] = jnp.zeros_like(blk.engram.w_v[...])
            blk.engram.b_v[...] = jnp.zeros_like(blk.engram.b_v[...])
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 20))
    np.testing.assert_allclose(np.asarray(logits(hybrid, ids)), np.asarray(logits(backbone, ids)), **TOL)


def test_bias_update_moves_toward_balance():
    load = jnp.asarray([10.0, 0.0, 5.0, 5.0])
    new = updated_bias(jnp.zeros(4), load, 0.01)
    assert new[0] < 0 < new[1] and new[2] == new[3] == 0


def test_hc_mult_below_one_is_rejected():
    # hc_mult > 1 (hyper-connections) is built and tested in test_hyperconn.py
    with pytest.raises(ValueError, match="hc_mult"):
        dataclasses.replace(preset("tiny"), hc_mult=0)


# bfloat16 keeps 8 significant bits (unit roundoff 2**-8 ~ 0.4%); norms, RoPE, softmax and the LM
# head accumulate in float32. Measured on tiny (3 batches): the largest logit error is 0.51-0.79%
# of the largest |logit|, the RMS error 0.60-0.64% of the RMS logit. Bounds: 2x the worst.
BF16_MAX_REL = 0.016
BF16_RMS_REL = 0.013


@pytest.mark.parametrize("seed", range(2))
def test_bf16_compute_close_to_f32(seed):
    cfg = preset("tiny")
    m32 = HybridLM(cfg, rngs=nnx.Rngs(0))
    m16 = HybridLM(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(2, 16))
    a, b = np.asarray(logits(m32, ids)), np.asarray(logits(m16, ids))
    assert b.dtype == np.float32
    err = np.abs(a - b)
    assert err.max() < BF16_MAX_REL * np.abs(a).max(), err.max() / np.abs(a).max()
    rms = np.sqrt(np.mean(err**2) / np.mean(a**2))
    assert rms < BF16_RMS_REL, rms
    assert err.max() > 0  # the bf16 model did compute in bf16


def rope_numpy(x: np.ndarray, theta: float) -> np.ndarray:
    """RoPE as a complex rotation: pair (i, i + H/2) is the number x_i + j x_{i+H/2}, multiplied
    by exp(j t theta^(-2i/H)) at position t (float64)."""
    T, H = x.shape[1], x.shape[-1]
    z = x[..., : H // 2].astype(np.float64) + 1j * x[..., H // 2:].astype(np.float64)
    freq = theta ** (-2.0 * np.arange(H // 2) / H)
    z = z * np.exp(1j * np.arange(T)[:, None] * freq[None, :])[None, :, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("theta", [10_000.0, 500.0])
def test_rope_matches_numpy_reference(theta):
    x = np.random.default_rng(0).normal(size=(2, 37, 3, 16)).astype(np.float32)
    got = np.asarray(rope(jnp.asarray(x), theta))
    # float32 angles up to 36 rad: cos/sin of t * freq are good to ~36 * 2**-24 ~ 2e-6
    np.testing.assert_allclose(got, rope_numpy(x, theta), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, 0], x[:, 0])  # position 0 is not rotated


def test_rope_hand_values_and_relative_positions():
    # H = 2: one pair, frequency 1, so position t rotates (x1, x2) by t radians
    x = np.zeros((1, 4, 1, 2), np.float32)
    x[..., 0] = 1.0
    got = np.asarray(rope(jnp.asarray(x), 10_000.0))[0, :, 0]
    t = np.arange(4)
    np.testing.assert_allclose(got, np.stack([np.cos(t), np.sin(t)], -1), atol=1e-6)
    # q . k after RoPE depends on positions only through their difference
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    T = 12
    qs = np.asarray(rope(jnp.asarray(np.broadcast_to(q, (1, T, 1, 16)).copy()), 100.0))[0, :, 0]
    ks = np.asarray(rope(jnp.asarray(np.broadcast_to(k, (1, T, 1, 16)).copy()), 100.0))[0, :, 0]
    dots = qs @ ks.T  # [m, n]
    for d in range(-3, 4):
        diag = np.diagonal(dots, offset=d)
        np.testing.assert_allclose(diag, diag[0], rtol=1e-4, atol=1e-4)
    assert np.ptp(np.diagonal(dots, offset=0)) < 1e-4 < abs(dots[0, 0] - dots[0, 3])


def dense_lm_numpy(model: HybridLM, ids: np.ndarray) -> np.ndarray:
    """A dense HybridLM (no MoE, no Engram) restated in float64 numpy: pre-norm blocks of causal
    RoPE attention and SwiGLU, final RMSNorm, LM head (tied or not)."""
    cfg = model.cfg
    P = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(model)))

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    T = ids.shape[1]
    h = P["embed"][ids]
    for i in range(cfg.n_layers):
        b = P["blocks"][i]
        x = norm(h, b["attn_norm"]["weight"])
        a = b["attn"]
        q = rope_numpy(np.einsum("btd,dnh->btnh", x, a["wq"]), cfg.rope_theta)
        k = rope_numpy(np.einsum("btd,dnh->btnh", x, a["wk"]), cfg.rope_theta)
        v = np.einsum("btd,dnh->btnh", x, a["wv"])
        s = np.einsum("bsnh,btnh->bnst", q, k) / np.sqrt(q.shape[-1])
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        h = h + np.einsum("bnst,btnh,nhd->bsd", p, v, a["wo"])
        f = b["ffn"]
        x = norm(h, b["ffn_norm"]["weight"])
        h = h + (silu(x @ f["w_gate"]) * (x @ f["w_up"])) @ f["w_down"]
    h = norm(h, P["final_norm"]["weight"])
    return h @ (P["embed"].T if cfg.tie_embeddings else P["lm_head"])


@pytest.mark.parametrize("tie", [False, True])
def test_dense_model_matches_numpy_reference(tie):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=48, seq_len=16,
                      tie_embeddings=tie)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for blk in model.blocks:  # norm scales away from 1, so a swapped or missing scale shows
        for n in (blk.attn_norm, blk.ffn_norm):
            n.weight[...] = jnp.asarray(1 + 0.3 * rng.normal(size=32), jnp.float32)
    ids = rng.integers(0, 64, size=(2, 11))
    out = np.asarray(logits(model, ids))
    assert out.shape == (2, 11, 64)
    np.testing.assert_allclose(out, dense_lm_numpy(model, ids), **TOL)
