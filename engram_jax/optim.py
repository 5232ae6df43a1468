"""Optimizer and the pure, jitted train/eval steps.

AdamW with linear warmup and cosine decay (optax). Parameters are split into three groups with
``optax.multi_transform``: matrices (weight decay), vectors (norm scales, biases: no decay) and the
Engram tables (engram-paper.md "Training": 5x the learning rate, no weight decay).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from engram_jax.config import ModelConfig, TrainConfig
from engram_jax.layers.moe import updated_bias


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    rest: nnx.State  # non-trained state: MoE routing biases
    step: jax.Array


def _label(path, _leaf) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if "engram" in names and "table" in names:
        return "engram_table"
    return "decay" if _leaf.ndim >= 2 else "no_decay"


def param_labels(params: nnx.State):
    return jax.tree_util.tree_map_with_path(_label, params)


def schedule(tcfg: TrainConfig, peak: float) -> optax.Schedule:
    """Linear warmup to ``peak`` over ``warmup_steps`` updates, then cosine decay to
    ``peak * min_lr_ratio`` at the last step.

    optax evaluates a schedule at the count of updates already applied (0 for the first), so the
    warmup-cosine curve is read one step ahead: update ``s`` (1-based) uses ``base(s)``, which makes
    the first update's rate ``peak / warmup_steps`` rather than 0 and the last one's the floor.
    The rate used by step ``s`` is therefore ``schedule(tcfg, peak)(s - 1)``.
    """
    warmup = min(tcfg.warmup_steps, max(tcfg.steps - 1, 0))
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(tcfg.steps, warmup + 1), end_value=peak * tcfg.min_lr_ratio,
    )
    return lambda count: base(count + 1)


def make_optimizer(tcfg: TrainConfig, *, clip: bool = True) -> optax.GradientTransformation:
    """AdamW groups, chained after a global-norm clip unless ``clip`` is False (offloaded Engram
    tables: the step clips by a norm that includes the host tables' gradients)."""
    def adamw(peak: float, wd: float):
        return optax.adamw(schedule(tcfg, peak), b1=tcfg.b1, b2=tcfg.b2, weight_decay=wd)

    groups = optax.multi_transform(
        {
            "decay": adamw(tcfg.lr, tcfg.weight_decay),
            "no_decay": adamw(tcfg.lr, 0.0),
            "engram_table": adamw(tcfg.lr * tcfg.engram_lr_mult, tcfg.engram_weight_decay),
        },
        param_labels,
    )
    if tcfg.grad_clip > 0 and clip:
        return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), groups)
    return groups


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    logz = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    tgt = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - tgt)


def make_steps(graphdef: nnx.GraphDef, cfg: ModelConfig, tcfg: TrainConfig,
               tx: optax.GradientTransformation):
    """Build ``train_step(state, batch) -> (state, metrics)`` and ``eval_step(state, batch)``.

    A batch is ``{"tokens": int32 [B, T+1], "hash_ids": {layer: int32 [B, T, G]}}``; optional
    ``"memory": {layer: [B, T, M]}`` carries host-fetched Engram rows (offloaded tables).
    """
    moe = cfg.moe
    aux_coef = moe.aux_coef if moe is not None and moe.balance == "aux" else 0.0

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        tok = batch["tokens"]
        logits, aux = model(tok[:, :-1], batch["hash_ids"], batch.get("memory"))
        ce = cross_entropy(logits, tok[:, 1:])
        return ce + aux_coef * aux["aux_loss"], (ce, aux)

    def train_step(state: TrainState, batch):
        (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.rest, batch)
        return _finish_step(graphdef, cfg, tx, state, grads, ce, loss, aux, optax.tree.norm(grads))

    def eval_step(state: TrainState, batch):
        return loss_fn(state.params, state.rest, batch)[1][0]

    if cfg.engram is not None and cfg.engram.offload:
        train_step = _offload_train_step(loss_fn, graphdef, cfg, tcfg, tx)
    return jax.jit(train_step, donate_argnums=(0,)), jax.jit(eval_step)


def _offload_train_step(loss_fn, graphdef, cfg: ModelConfig, tcfg: TrainConfig, tx):
    """The train step for host-offloaded Engram tables (engram_jax/offload.py).

    ``batch["memory"]`` is differentiated like a parameter; the global-norm clip counts the tables'
    aggregated row gradients (``offload.table_grad_sqnorm``) and is applied here, so ``tx`` must
    come from ``make_optimizer(tcfg, clip=False)``. ``metrics["memory_grad"]`` holds the clipped
    d loss / d memory {layer_id: [B, T, M]} for ``HostTables.apply``.
    """
    import numpy as np

    from engram_jax.offload import table_grad_sqnorm

    e = cfg.engram
    offsets = {lid: np.concatenate([[0], np.cumsum([p for o in per for p in o])[:-1]]).astype(np.int32)
               for lid, per in e.primes().items()}

    def train_step(state: TrainState, batch):
        def loss_mem(params, memory):
            return loss_fn(params, state.rest, {**batch, "memory": memory})

        (loss, (ce, aux)), (grads, g_mem) = jax.value_and_grad(loss_mem, argnums=(0, 1), has_aux=True)(
            state.params, batch["memory"])
        sq = jnp.sum(jnp.stack([jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grads)]))
        for lid, g in g_mem.items():
            rows_N = (batch["hash_ids"][lid] + offsets[lid]).reshape(-1)
            sq = sq + table_grad_sqnorm(rows_N, g.reshape(rows_N.shape[0], e.d_head))
        g_norm = jnp.sqrt(sq)
        if tcfg.grad_clip > 0:
            trigger = g_norm < tcfg.grad_clip
            clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * tcfg.grad_clip)  # noqa: E731
            grads, g_mem = jax.tree.map(clip, grads), jax.tree.map(clip, g_mem)
        state, metrics = _finish_step(graphdef, cfg, tx, state, grads, ce, loss, aux, g_norm)
        return state, {**metrics, "memory_grad": g_mem}

    return train_step


def _finish_step(graphdef, cfg: ModelConfig, tx, state: TrainState, grads, ce, loss, aux, g_norm):
    """Optimizer update, routing-bias update (outside the gradient) and step metrics."""
    moe = cfg.moe
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rest = state.rest
    if moe is not None and moe.balance == "bias":
        model = nnx.merge(graphdef, params, rest)
        moe_blocks = [b for b in model.blocks if b.moe is not None]
        for i, blk in enumerate(moe_blocks):
            blk.moe.router_bias[...] = updated_bias(blk.moe.router_bias[...], aux["load"][i],
                                                    moe.bias_rate)
        _, _, rest = nnx.split(model, nnx.Param, ...)
    metrics = {"loss": ce, "total_loss": loss, "grad_norm": g_norm}
    if moe is not None:
        load = aux["load"]
        metrics["max_load"] = jnp.max(load / jnp.mean(load, axis=-1, keepdims=True))
    return TrainState(params, opt_state, rest, state.step + 1), metrics
