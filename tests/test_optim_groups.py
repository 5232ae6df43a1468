"""The optimizer's parameter groups against a hand-computed AdamW step (docs/paper.md section 1.8:
Engram tables get 5x the learning rate and no weight decay).

One update from zero moments has a closed form: with m = (1 - b1) g and v = (1 - b2) g^2, bias
correction gives m_hat = g and v_hat = g^2, so AdamW moves each entry by

    -lr_group * (g / (|g| + eps) + wd_group * p)

with eps = 1e-8 (optax's default). Expected per group, from the paper and the TrainConfig
defaults rather than from optim.py: Engram tables lr x engram_lr_mult (5) and no decay; matrices
lr and weight_decay (0.1); norm scales and biases lr and no decay. The schedule is made flat at
the peak (no warmup, a cosine over 10^6 steps) so that the first update's rate is the peak to
~1e-11 relative, whichever step the schedule reads for the first update.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax.config import TrainConfig, preset
from engram_jax.layers.common import RMSNorm
from engram_jax.model import HybridLM
from engram_jax.optim import make_optimizer

TCFG = TrainConfig(steps=1_000_000, warmup_steps=0, lr=1e-2, grad_clip=0.0)
EPS = 1e-8  # optax.adamw's default
ATOL = 2e-7  # float32 rounding of an O(1) parameter moved by ~1e-2; the decay term is 1e-3

# The paper's table group and the TrainConfig defaults it is meant to carry.
TABLE_LR_MULT = 5.0
MATRIX_DECAY = 0.1


class ToyEngram(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (7, 3)))
        self.w_v = nnx.Param(jax.random.normal(rngs.params(), (3, 4)))
        self.b_v = nnx.Param(jax.random.normal(rngs.params(), (4,)))
        self.norm_k = RMSNorm(4)


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (5, 4)))
        self.engram = ToyEngram(rngs)
        self.norm = RMSNorm(4)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 2, 2)))


# path (as written out by hand) -> group; every Param of Toy is listed
TOY_GROUPS = {
    ("embed",): "matrix",
    ("engram", "table"): "table",
    ("engram", "w_v"): "matrix",
    ("engram", "b_v"): "vector",
    ("engram", "norm_k", "weight"): "vector",
    ("norm", "weight"): "vector",
    ("w",): "matrix",
}


def hand_rule(path: tuple) -> str:
    """The group of a HybridLM parameter, from its name alone."""
    names = [str(p) for p in path]
    if names[-1] == "table" and "engram" in names:
        return "table"
    if names[-1] == "weight" and "norm" in names[-2]:  # attn_norm, ffn_norm, norm_k, conv_norm...
        return "vector"
    if names[-1].startswith("b_"):  # Engram biases
        return "vector"
    return "matrix"


def expected_step(p: np.ndarray, g: np.ndarray, group: str, tcfg: TrainConfig) -> np.ndarray:
    lr, wd = {
        "table": (tcfg.lr * TABLE_LR_MULT, 0.0),
        "matrix": (tcfg.lr, MATRIX_DECAY),
        "vector": (tcfg.lr, 0.0),
    }[group]
    p, g = p.astype(np.float64), g.astype(np.float64)
    return p - lr * (g / (np.abs(g) + EPS) + wd * p)


def one_step(model: nnx.Module, tcfg: TrainConfig, seed: int = 0):
    """(params before, grads, params after) as {path: numpy array} after one optimizer update."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])
    tx = make_optimizer(tcfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)

    def flat(state):
        return {tuple(k): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}

    return flat(params), flat(grads), flat(new)


def check(before, grads, after, groups, tcfg=TCFG):
    assert set(before) == set(groups)
    for path, group in groups.items():
        np.testing.assert_allclose(after[path], expected_step(before[path], grads[path], group, tcfg),
                                   rtol=0, atol=ATOL, err_msg=f"{path} ({group} group)")


def test_toy_groups_match_hand_computed_adamw():
    before, grads, after = one_step(Toy(nnx.Rngs(0)), TCFG)
    check(before, grads, after, TOY_GROUPS)
    # the three groups moved differently: table by 5 lr, matrix by lr plus its decay
    d_table = np.abs(after[("engram", "table")] - before[("engram", "table")])
    np.testing.assert_allclose(d_table, TABLE_LR_MULT * TCFG.lr, rtol=1e-4)


def test_defaults_are_the_papers():
    """The group settings come from TrainConfig; its defaults are the paper's."""
    d = TrainConfig()
    assert (d.engram_lr_mult, d.engram_weight_decay, d.weight_decay) == (TABLE_LR_MULT, 0.0,
                                                                        MATRIX_DECAY)


@pytest.mark.parametrize("name", ["tiny"])
def test_model_groups_match_hand_computed_adamw(name):
    """Every parameter of a real model, grouped by name, takes the hand-computed step."""
    model = HybridLM(preset(name), rngs=nnx.Rngs(0))
    before, grads, after = one_step(model, TCFG, seed=1)
    groups = {path: hand_rule(path) for path in before}
    counts = {g: sum(1 for v in groups.values() if v == g) for g in ("table", "matrix", "vector")}
    assert counts["table"] == len(preset(name).engram.layer_ids)
    assert counts["matrix"] > 0 and counts["vector"] > 0
    check(before, grads, after, groups)


def test_clip_scales_gradients_before_the_groups():
    """With clipping on, the update equals the hand step on the clipped gradients: the global norm
    includes the tables. Adam's first step is scale-invariant up to eps, so use tiny gradients,
    where eps makes the step depend on the scale."""
    tcfg = TrainConfig(steps=1_000_000, warmup_steps=0, lr=1e-2, grad_clip=1e-9)
    model = Toy(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    raw = [1e-8 * jax.random.normal(k, x.shape)
           for k, x in zip(jax.random.split(jax.random.key(2), len(leaves)), leaves, strict=True)]
    norm = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in raw)))
    assert norm > tcfg.grad_clip
    grads = jax.tree.unflatten(treedef, raw)
    tx = make_optimizer(tcfg)
    new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    before = {tuple(k): np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
    after = {tuple(k): np.asarray(v[...]) for k, v in nnx.to_flat_state(new)}
    clipped = {tuple(k): np.asarray(v[...], np.float64) * tcfg.grad_clip / norm
               for k, v in nnx.to_flat_state(grads)}
    check(before, clipped, after, TOY_GROUPS, tcfg)
