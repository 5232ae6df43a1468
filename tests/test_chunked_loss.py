"""The chunked LM head and cross-entropy (``TrainConfig.loss_chunk``) against the full logits: the
same loss and gradients to rounding, a train step that matches, no [B, T, V] array anywhere in
the traced step, and a memory plan that counts one chunk."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import TrainConfig, preset
from engram_jax.layers.common import project
from engram_jax.memory import memory_plan
from engram_jax.model import HybridLM, default_hash_fn
from engram_jax.optim import TrainState, chunked_cross_entropy, cross_entropy, make_optimizer, make_steps


def _full(h, head, t):
    return cross_entropy(project(h, head, preferred_element_type=jnp.float32), t)


@pytest.mark.parametrize("chunk", [1, 7, 16, 40, 1000])  # divides B * T = 40 or not, or exceeds it
def test_chunked_equals_full_loss_and_gradients(chunk):
    rng = np.random.default_rng(chunk)
    B, T, D, V = 2, 20, 12, 37
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
    t = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    f_full = jax.jit(jax.value_and_grad(_full, argnums=(0, 1)))
    f_chunk = jax.jit(jax.value_and_grad(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk),
                                         argnums=(0, 1)))
    (v, g), (v_ref, g_ref) = f_chunk(h, head, t), f_full(h, head, t)
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)  # f32 sums in another order
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_chunked_bf16_close_to_full():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.bfloat16)
    head = jnp.asarray(rng.normal(size=(8, 50)) * 0.3, jnp.bfloat16)
    t = jnp.asarray(rng.integers(0, 50, (2, 16)), jnp.int32)
    np.testing.assert_allclose(float(chunked_cross_entropy(h, head, t, 5)),
                               float(_full(h, head, t)), rtol=1e-5)


def _step(cfg, tcfg, batch):
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tcfg)
    state = TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32))
    train_step, eval_step = make_steps(graphdef, cfg, tcfg, tx)
    return train_step, eval_step, state


def _batch(cfg, B):
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, cfg.seq_len + 1))
    hid = {k: jnp.asarray(v) for k, v in default_hash_fn(cfg)(ids[:, :-1]).items()}
    return {"tokens": jnp.asarray(ids, jnp.int32), "hash_ids": hid}


def test_train_step_with_chunked_loss_matches_full():
    cfg = dataclasses.replace(preset("tiny"), seq_len=32, n_layers=1, engram=None)
    tcfg = TrainConfig(steps=10, batch_size=2, warmup_steps=1)
    batch = _batch(cfg, 2)
    step_full, _, st_full = _step(cfg, tcfg, batch)
    step_chunk, _, st_chunk = _step(cfg, dataclasses.replace(tcfg, loss_chunk=24), batch)
    for _ in range(2):
        st_full, m_full = step_full(st_full, batch)
        st_chunk, m_chunk = step_chunk(st_chunk, batch)
        np.testing.assert_allclose(float(m_chunk["loss"]), float(m_full["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m_chunk["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(st_chunk.params), jax.tree.leaves(st_full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _avals(jaxpr):
    """Every intermediate's shape in a jaxpr, sub-jaxprs (scan, checkpoint, custom VJPs) included."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_chunked_step_never_builds_the_full_logits():
    cfg = dataclasses.replace(preset("tiny"), seq_len=32)
    B, chunk = 4, 16
    batch = _batch(cfg, B)
    V, N = cfg.vocab_size, B * cfg.seq_len
    tcfg = TrainConfig(steps=10, batch_size=B, loss_chunk=chunk)

    def biggest_v_rows(tcfg):
        model = HybridLM(cfg, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = make_optimizer(tcfg)
        state = TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32))
        train_step, _ = make_steps(graphdef, cfg, tcfg, tx)
        jaxpr = jax.make_jaxpr(train_step)(state, batch).jaxpr
        # rows of every array with the vocabulary as its last axis (the head's [D, V] has D rows)
        return max(int(np.prod(s[:-1])) for s in _avals(jaxpr) if s and s[-1] == V)

    assert biggest_v_rows(dataclasses.replace(tcfg, loss_chunk=0)) == N
    assert biggest_v_rows(tcfg) == max(chunk, cfg.d_model)


def test_memory_plan_counts_one_chunk():
    cfg = preset("gpu-m")
    tcfg = TrainConfig(batch_size=32)
    full, chunked = memory_plan(cfg, tcfg), memory_plan(cfg, dataclasses.replace(tcfg, loss_chunk=4096))
    assert full["logits"] == 32 * 1024 * cfg.vocab_size * 10
    assert chunked["logits"] == 4096 * cfg.vocab_size * 10
    assert full["total"] - chunked["total"] == full["logits"] - chunked["logits"]
    assert {k: v for k, v in full.items() if k not in ("logits", "total")} == \
        {k: v for k, v in chunked.items() if k not in ("logits", "total")}


def test_loss_chunk_is_a_late_field():
    from engram_jax.config import train_dict

    assert "loss_chunk" not in train_dict(TrainConfig())
    assert train_dict(TrainConfig(loss_chunk=512))["loss_chunk"] == 512
    with pytest.raises(ValueError, match="loss_chunk"):
        TrainConfig(loss_chunk=-1)
