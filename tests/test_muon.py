"""The Muon option (``TrainConfig.optimizer = "muon"``) and the unchanged AdamW default.

docs/paper.md section 1.8 (Training): the backbone trains with Muon, the Engram tables with Adam at 5x the
rate and no weight decay. Expected groups are written out here by parameter name, not read from
optim.py:

- Muon: attention W_q/W_k/W_v/W_o, dense and shared-expert SwiGLU matrices, routed experts (a
  batch of matrices over the expert axis), Engram W_V/W_K, OverEncoding projections;
- AdamW with decay: input embedding, LM head, router, the Engram conv's depthwise taps;
- AdamW without decay: norm scales and biases;
- the table group (lr x engram_lr_mult, no decay): Engram and OverEncoding tables.

Muon's update of a matrix is its orthogonalised momentum, so after removing the decoupled decay and
the consistent-RMS scale 0.2 sqrt(max(fan_in, fan_out)) every singular value lies near 1 (optax's
quintic Newton-Schulz leaves them in about [0.7, 1.2]); an AdamW step of a random gradient has a
spread of several x, so the band [0.5, 1.5] tells the two apart.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax.config import OverEncodingConfig, TrainConfig, preset
from engram_jax.model import HybridLM, default_hash_fn
from engram_jax.optim import TrainState, make_optimizer, make_steps, muon_param_labels, schedule

FLAT = dict(steps=1_000_000, warmup_steps=0, lr=1e-2, grad_clip=0.0)
EPS = 1e-8
ATOL = 2e-7
SV_BAND = (0.5, 1.5)
CONSISTENT_RMS = 0.2  # Liu et al., arXiv 2502.16982


def _cfg():
    return dataclasses.replace(
        preset("tiny"), n_dense_layers=1, seq_len=16,
        overencoding=OverEncodingConfig(max_ngram=3, n_sub=2, d_sub=8, modulus=101))


def expected_group(names: tuple) -> str:
    last = names[-1]
    if last == "table":
        return "table"
    if last in ("embed", "lm_head", "w_router", "conv_w"):
        return "adam_matrix"
    if last == "weight" or last.startswith("b_"):
        return "vector"
    assert last in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "w_v", "w_k", "proj"), names
    return "muon"


def _flat(state) -> dict:
    return {tuple(k): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def _one_step(model, tcfg, seed=1):
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])
    tx = make_optimizer(tcfg)
    new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    return _flat(params), _flat(grads), _flat(new)


def test_muon_labels_by_name():
    model = HybridLM(_cfg(), rngs=nnx.Rngs(0))
    flat = nnx.to_flat_state(muon_param_labels(nnx.state(model, nnx.Param)))
    got = {tuple(str(p) for p in k): (v.get_value() if hasattr(v, "get_value") else v) for k, v in flat}
    to_ours = {"muon": "muon", "decay": "adam_matrix", "no_decay": "vector", "engram_table": "table"}
    seen = set()
    for path, label in got.items():
        assert to_ours[label] == expected_group(path), path
        seen.add(to_ours[label])
    assert seen == {"muon", "adam_matrix", "vector", "table"}
    # both kinds of table, the dense FFN, shared and routed experts are all present
    names = {p[-1] for p in got}
    assert {"table", "proj", "w_router", "wo", "w_v", "conv_w"} <= names


@pytest.mark.slow
def test_muon_step_groups():
    """Adam leaves take the closed-form AdamW step of their group (tables 5x, no decay); Muon
    leaves take an orthogonalised, RMS-scaled step with decoupled decay."""
    tcfg = TrainConfig(optimizer="muon", **FLAT)
    model = HybridLM(_cfg(), rngs=nnx.Rngs(0))
    before, grads, after = _one_step(model, tcfg)
    _, _, after_adamw = _one_step(HybridLM(_cfg(), rngs=nnx.Rngs(0)), TrainConfig(**FLAT))
    n_muon = 0
    for path, p in before.items():
        group = expected_group(tuple(str(x) for x in path))
        p64, g = p.astype(np.float64), grads[path].astype(np.float64)
        if group != "muon":
            lr, wd = {"table": (5 * tcfg.lr, 0.0), "adam_matrix": (tcfg.lr, 0.1),
                      "vector": (tcfg.lr, 0.0)}[group]
            want = p64 - lr * (g / (np.abs(g) + EPS) + wd * p64)
            np.testing.assert_allclose(after[path], want, rtol=0, atol=ATOL, err_msg=str(path))
            # the Adam groups do not depend on which optimizer the matrices use
            np.testing.assert_array_equal(after[path], after_adamw[path], err_msg=str(path))
            continue
        n_muon += 1
        step = (after[path].astype(np.float64) - p64 * (1 - tcfg.lr * tcfg.weight_decay)) / -tcfg.lr
        for m in _as_matrices(str(path[-1]), step):
            sv = np.linalg.svd(m / (CONSISTENT_RMS * np.sqrt(max(m.shape))), compute_uv=False)
            # five Newton-Schulz steps cannot lift the few near-zero singular values of a square
            # random gradient, so the band holds for the bulk and the top
            inside = np.mean((SV_BAND[0] < sv) & (sv < SV_BAND[1]))
            assert inside >= 0.9 and sv.max() < SV_BAND[1], (path, inside, sv.max())
        assert not np.allclose(after[path], after_adamw[path]), path
    assert n_muon >= 10


def _as_matrices(name: str, x: np.ndarray) -> list[np.ndarray]:
    """The matrices Muon orthogonalises, by parameter name and shape."""
    if name in ("wq", "wk", "wv"):  # [D, N, Dh]: D -> N*Dh
        return [x.reshape(x.shape[0], -1)]
    if name == "wo":  # [N, Dh, D]: N*Dh -> D
        return [x.reshape(-1, x.shape[-1])]
    if x.ndim == 3:  # experts [E, D, F] / sub-table projections [S, d_sub, D]: one each
        return list(x)
    return [x]


def _old_make_optimizer(tcfg: TrainConfig):
    """optim.make_optimizer as it was before the Muon option (commit 24f16f9), restated."""
    def label(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "engram" in names and "table" in names:
            return "engram_table"
        return "decay" if leaf.ndim >= 2 else "no_decay"

    def adamw(peak, wd):
        return optax.adamw(schedule(tcfg, peak), b1=tcfg.b1, b2=tcfg.b2, weight_decay=wd)

    groups = optax.multi_transform(
        {"decay": adamw(tcfg.lr, tcfg.weight_decay), "no_decay": adamw(tcfg.lr, 0.0),
         "engram_table": adamw(tcfg.lr * tcfg.engram_lr_mult, tcfg.engram_weight_decay)},
        lambda params: jax.tree_util.tree_map_with_path(label, params))
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), groups)


def _batches(cfg, n, B=2, seed=0):
    rng = np.random.default_rng(seed)
    hash_fn = default_hash_fn(cfg)
    out = []
    for _ in range(n):
        tok = rng.integers(0, cfg.vocab_size, size=(B, cfg.seq_len + 1))
        out.append({"tokens": jnp.asarray(tok, jnp.int32),
                    "hash_ids": {k: jnp.asarray(v) for k, v in hash_fn(tok[:, :-1]).items()}})
    return out


def test_default_optimizer_bit_identical_to_before():
    """With the new options at their defaults the optimizer is exactly the old one: two updates
    of every tiny parameter (clipping on, warmup) are bit-identical."""
    tcfg = TrainConfig(steps=10, warmup_steps=2)
    assert tcfg.optimizer == "adamw"
    params = nnx.state(HybridLM(preset("tiny"), rngs=nnx.Rngs(0)), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    grads = [jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(
        jax.random.split(jax.random.key(step), len(leaves)), leaves, strict=True)]) for step in range(2)]
    results = []
    for tx in (make_optimizer(tcfg), _old_make_optimizer(tcfg)):
        @jax.jit  # one dispatch per step, as in the jitted train step
        def update(p, st, g, tx=tx):
            u, st = tx.update(g, st, p)
            return optax.apply_updates(p, u), st

        p, st = params, tx.init(params)
        for g in grads:
            p, st = update(p, st, g)
        results.append(_flat(p))
    new, old = results
    assert set(new) == set(old)
    for k in new:
        np.testing.assert_array_equal(new[k], old[k], err_msg=str(k))


def test_muon_trains_two_steps():
    """A pulse: two jitted Muon steps of a model with every kind of parameter (dense and MoE
    layers, Engram, OverEncoding) run, the loss is finite and every parameter moved."""
    cfg = _cfg()
    tcfg = TrainConfig(steps=10, warmup_steps=1, optimizer="muon")
    tx = make_optimizer(tcfg)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    init = _flat(params)
    train_step, _ = make_steps(graphdef, cfg, tcfg, tx)
    state = TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32))
    for batch in _batches(cfg, 2):
        state, m = train_step(state, batch)
        assert np.isfinite(float(m["loss"]))
    for k, v in _flat(state.params).items():
        assert not np.array_equal(v, init[k]), k


def test_muon_is_a_late_train_option():
    from engram_jax.config import train_dict

    assert "optimizer" not in train_dict(TrainConfig())
    assert train_dict(TrainConfig(optimizer="muon"))["optimizer"] == "muon"
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


@pytest.mark.slow
def test_muon_state_checkpoint_round_trip(tmp_path):
    """Muon's optimizer state (momenta, masked leaves) survives the orbax checkpoint a resumed
    trial restores from, bit for bit."""
    from engram_jax.checkpoint import Checkpointer

    tx = make_optimizer(TrainConfig(optimizer="muon"))
    _, params, rest = nnx.split(HybridLM(_cfg(), rngs=nnx.Rngs(0)), nnx.Param, ...)
    opt = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[1]
    state = TrainState(params, opt, rest, jnp.ones((), jnp.int32))
    ck = Checkpointer(tmp_path)
    ck.save(1, state)
    ck.wait()
    back, step = ck.restore_latest(TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32)))
    assert step == 1
    a, b = jax.tree.leaves(state), jax.tree.leaves(back)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
