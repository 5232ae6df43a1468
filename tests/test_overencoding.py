"""OverEncoding (Huang et al., ICML 2025, arXiv 2501.16975): ids against Python integers, the
layer against a numpy restatement, causality, exact counts and FLOPs.

The reference ids use unbounded Python integers and the paper's formula directly,
x^(-n)_i = sum_{j<n} x_{i-j} V^j (zeros before the start), reduced modulo m + 2t; the model
computes them in int32 by Horner's rule with a modular multiply, which only agrees if no
intermediate overflows, so the cases include moduli near the 2**30 limit with V = 50,000 (m * V is
about 5e13).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import ModelConfig, OverEncodingConfig, preset
from engram_jax.counting import flops_per_token
from engram_jax.layers.overencoding import OverEncoding, overencoding_ids
from engram_jax.model import HybridLM, count_params, logits

TOL = dict(rtol=1e-5, atol=1e-5)


def reference_ids(tokens: np.ndarray, oe: OverEncodingConfig, V: int) -> np.ndarray:
    B, T = tokens.shape
    out = np.zeros((B, T, oe.n_tables), np.int64)
    for b in range(B):
        for i in range(T):
            s = 0
            for n in range(2, oe.max_ngram + 1):
                gram = sum(int(tokens[b, i - j]) * V**j for j in range(n) if i - j >= 0)
                for t in range(oe.n_sub):
                    out[b, i, s] = gram % (oe.modulus + 2 * t)
                    s += 1
    return out


@pytest.mark.parametrize("V,modulus,N,k", [
    (512, 1000, 3, 2),            # small modulus: (m-1) V fits int32, the direct product
    (512, 300_007, 4, 3),         # m V ~ 1.5e8: still direct
    (50_000, 2**30 - 10, 3, 2),   # m V ~ 5e13: the double-and-add modular multiply
    (50_000, 12_800_000, 3, 1),   # the paper's default m
    (7, 1000, 3, 2),              # V^2 < m: bigram ids are collision-free
])
def test_ids_match_python_integers(V, modulus, N, k):
    oe = OverEncodingConfig(max_ngram=N, n_sub=k, d_sub=4, modulus=modulus)
    rng = np.random.default_rng(modulus % 97)
    tokens = rng.integers(0, V, size=(3, 17))
    tokens[0, :4] = V - 1  # the largest ids, where an overflow would show first
    got = np.asarray(overencoding_ids(jnp.asarray(tokens, jnp.int32), oe, V))
    np.testing.assert_array_equal(got, reference_ids(tokens, oe, V))
    assert got.min() >= 0 and np.all(got < np.asarray(oe.moduli()))


def numpy_overencoding(layer: OverEncoding, tokens: np.ndarray, embed: np.ndarray, V: int) -> np.ndarray:
    """The layer restated: gather each sub-table's row, project it, average with the embedding."""
    oe = layer.cfg
    table = np.asarray(layer.table[...], np.float64)
    proj = np.asarray(layer.proj[...], np.float64)
    ids = reference_ids(tokens, oe, V)
    start = np.concatenate([[0], np.cumsum(oe.moduli())[:-1]])
    y = embed.astype(np.float64).copy()
    for s in range(oe.n_tables):
        y += table[start[s] + ids[..., s]] @ proj[s]
    return y / (1 + oe.n_tables)


def test_layer_matches_numpy_reference():
    V, D = 97, 24
    oe = OverEncodingConfig(max_ngram=3, n_sub=2, d_sub=5, modulus=211)
    layer = OverEncoding(D, oe, V, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, size=(2, 13))
    embed = rng.normal(size=(2, 13, D)).astype(np.float32)
    got = np.asarray(layer(jnp.asarray(tokens, jnp.int32), jnp.asarray(embed)))
    np.testing.assert_allclose(got, numpy_overencoding(layer, tokens, embed, V), **TOL)
    # sub-tables with different moduli sit at distinct offsets of one flat table
    assert layer.table[...].shape == (oe.rows(), oe.d_sub)
    assert layer.offsets == (0, 211, 424, 635)


def _oe_cfg(**kw) -> ModelConfig:
    return dataclasses.replace(preset("tiny"), overencoding=OverEncodingConfig(
        max_ngram=kw.get("N", 3), n_sub=kw.get("k", 2), d_sub=8, modulus=kw.get("m", 1009)))


@pytest.mark.parametrize("seed", range(2))
def test_causality(seed):
    """A future token changes no earlier logit, through the n-gram ids included."""
    cfg = _oe_cfg(N=4)
    model = HybridLM(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    B, T = 2, 20
    ids = rng.integers(0, cfg.vocab_size, size=(B, T))
    base = np.asarray(logits(model, ids))
    for t in (1, 9, T - 1):
        pert = ids.copy()
        pert[:, t] = (pert[:, t] + 1 + rng.integers(0, cfg.vocab_size - 1, size=B)) % cfg.vocab_size
        out = np.asarray(logits(model, pert))
        np.testing.assert_allclose(out[:, :t], base[:, :t], **TOL)
        assert not np.allclose(out[:, t], base[:, t])


def test_causality_gradient_through_tables():
    """d logits[t] / d OverEncoding table rows read only at positions > t is exactly zero."""
    cfg = dataclasses.replace(_oe_cfg(), engram=None)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 16))
    t = 6
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        out, _ = nnx.merge(graphdef, p, rest)(jnp.asarray(ids, jnp.int32), {})
        return jnp.sum(out[0, t])

    g = np.asarray(nnx.to_pure_dict(jax.grad(f)(params))["overencoding"]["table"])
    rows = np.asarray(overencoding_ids(jnp.asarray(ids, jnp.int32), cfg.overencoding, cfg.vocab_size))[0]
    rows = rows + np.asarray(model.overencoding.offsets)
    past, future = set(rows[: t + 1].ravel()), set(rows[t + 1:].ravel())
    only_future = sorted(future - past)
    assert only_future and np.all(g[only_future] == 0)
    assert np.any(g[sorted(past)] != 0)


@pytest.mark.parametrize("with_engram", [False, True])
def test_counts_exact(with_engram):
    cfg = _oe_cfg(k=3, m=501)
    if not with_engram:
        cfg = dataclasses.replace(cfg, engram=None)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    c = cfg.param_counts()
    assert count_params(model) == c["total"]
    oe = cfg.overencoding
    assert c["overencoding_tables"] == oe.rows() * oe.d_sub == (501 * 3 + 2 * (0 + 1 + 2)) * 2 * 8
    assert c["overencoding_dense"] == oe.n_tables * oe.d_sub * cfg.d_model
    plain = dataclasses.replace(cfg, overencoding=None).param_counts()
    # the tables are sparse memory, the projections active parameters
    assert c["sparse"] - plain["sparse"] == c["overencoding_tables"]
    assert c["active"] - plain["active"] == c["overencoding_dense"]
    assert c["total"] - plain["total"] == c["overencoding_tables"] + c["overencoding_dense"]
    assert c["sparse"] == (c["routed_experts"] - c["routed_active"] + c["engram_tables"]
                           + c["overencoding_tables"])
    assert "overencoding_tables" not in plain  # result tables without it keep their columns
    assert (flops_per_token(cfg) - flops_per_token(dataclasses.replace(cfg, overencoding=None))
            == 3 * 2 * c["overencoding_dense"])


def test_backbone_init_unchanged_and_config_round_trip():
    """OverEncoding is drawn after the backbone: the other weights equal the plain model's; its
    config survives to_dict / from_dict and with_overrides can switch it on."""
    cfg = _oe_cfg()
    a = nnx.to_flat_state(nnx.state(HybridLM(cfg, rngs=nnx.Rngs(3)), nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(HybridLM(dataclasses.replace(cfg, overencoding=None),
                                                  rngs=nnx.Rngs(3)), nnx.Param)))
    for k, v in a:
        if k[0] != "overencoding":
            np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(b[k][...]))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    on = preset("tiny").with_overrides({"overencoding": {"modulus": 1009, "d_sub": 8}})
    assert on == cfg and on.hash() != preset("tiny").hash()
    assert on.with_overrides({"overencoding.modulus": 2003}).overencoding.modulus == 2003


def test_invalid_modulus_named():
    with pytest.raises(ValueError, match="overencoding.modulus"):
        OverEncodingConfig(modulus=2**30)
