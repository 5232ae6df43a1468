"""Optimizer and the pure, jitted train/eval steps.

AdamW with linear warmup and cosine decay (optax). Parameters are split into three groups with
``optax.multi_transform``: matrices (weight decay), vectors (norm scales, biases: no decay) and the
Engram tables (docs/paper.md section 1.8: 5x the learning rate, no weight decay). OverEncoding
tables join the table group.

``TrainConfig.optimizer = "muon"`` moves the backbone's matrices into a fourth group trained with
Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; ``optax.contrib.scale_by_muon``),
as the Engram paper trains its backbone, keeping Adam for embeddings, LM head, router, norms,
biases and the tables (``muon_dims`` says which leaves and how each is seen as a matrix).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from engram_jax.config import ModelConfig, TrainConfig
from engram_jax.layers import stats
from engram_jax.layers.moe import updated_bias


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    rest: nnx.State  # non-trained state: MoE routing biases
    step: jax.Array


def _names(path) -> list[str]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return names[:-1] if names and names[-1] == "value" else names  # an nnx.Variable's own leaf


def _label(path, _leaf) -> str:
    names = _names(path)
    if "engram" in names and "table" in names:
        return "engram_table"
    if "overencoding" in names and names[-1] == "table":
        return "engram_table"
    return "decay" if _leaf.ndim >= 2 else "no_decay"


def param_labels(params: nnx.State):
    return jax.tree_util.tree_map_with_path(_label, params)


# Matrices that stay with Adam under Muon (docs/paper.md section 1.8: Adam for the embeddings and
# the router; the LM head is an embedding, as in modded-nanogpt and Moonlight; the Engram conv's
# depthwise taps [W, D] are per-channel filters, not a map between spaces).
ADAM_MATRICES = ("embed", "lm_head", "w_router", "conv_w")
# How each Muon leaf is a (batch of) matrix x W: attention's W_q/W_k/W_v [D, N, Dh] map D to N*Dh,
# W_o [N, Dh, D] maps N*Dh to D; experts [E, D, F] / [E, F, D] and OverEncoding projections
# [S, d_sub, D] are a batch of matrices over their first axis; every 2-D weight is [in, out].
_QKV = ("wq", "wk", "wv")


def _muon_dim(path, leaf):
    from optax.contrib import MuonDimensionNumbers as Dims

    names = _names(path)
    if _label(path, leaf) != "decay" or names[-1] in ADAM_MATRICES:
        return None
    if leaf.ndim == 2:
        return Dims(0, 1)
    if leaf.ndim == 3 and names[-1] in _QKV:
        return Dims(0, (1, 2))
    if leaf.ndim == 3 and names[-1] == "wo":
        return Dims((0, 1), 2)
    if leaf.ndim == 3 and names[-1] in ("w_gate", "w_up", "w_down", "proj"):
        return Dims(1, 2)
    raise ValueError(f"no Muon layout for parameter {'/'.join(names)} of shape {leaf.shape}: "
                     "add it to optim._muon_dim (or to ADAM_MATRICES)")


def muon_dims(params):
    """``MuonDimensionNumbers`` per leaf (None: the leaf stays with Adam)."""
    return jax.tree_util.tree_map_with_path(_muon_dim, params)


def muon_param_labels(params):
    """``param_labels`` with the backbone's matrices relabelled "muon"."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: "muon" if _muon_dim(p, x) is not None else _label(p, x), params)


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

    transforms = {
        "decay": adamw(tcfg.lr, tcfg.weight_decay),
        "no_decay": adamw(tcfg.lr, 0.0),
        "engram_table": adamw(tcfg.lr * tcfg.engram_lr_mult, tcfg.engram_weight_decay),
    }
    labels = param_labels
    if tcfg.optimizer == "muon":
        transforms["muon"] = muon(tcfg)
        labels = muon_param_labels
    groups = optax.multi_transform(transforms, labels)
    if tcfg.grad_clip > 0 and clip:
        return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), groups)
    return groups


MUON_BETA = 0.95  # momentum, Nesterov (Jordan et al.; optax's default)
MUON_CONSISTENT_RMS = 0.2  # update RMS ~ 0.2 lr, AdamW's (Liu et al., arXiv 2502.16982)


def muon(tcfg: TrainConfig) -> optax.GradientTransformation:
    """Muon for the "muon" group: Newton-Schulz-orthogonalised Nesterov momentum per matrix
    (batched over experts / sub-tables, ``muon_dims``), scaled by 0.2 sqrt(max(fan_in, fan_out))
    so its update RMS matches AdamW's, decoupled weight decay, then the warmup-cosine schedule at
    ``lr * muon_lr_mult`` (the paper's backbone optimizer; docs/paper.md section 1.8)."""
    from optax.contrib import scale_by_muon
    from optax.contrib._muon import scale_by_shape  # optax 0.2.8 does not re-export it

    return optax.chain(
        scale_by_muon(beta=MUON_BETA, nesterov=True, weight_dimension_numbers=muon_dims),
        scale_by_shape(weight_dimension_numbers=muon_dims, consistent_rms=MUON_CONSISTENT_RMS),
        optax.add_decayed_weights(tcfg.weight_decay),
        optax.scale_by_learning_rate(schedule(tcfg, tcfg.lr * tcfg.muon_lr_mult)),
    )


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    logz = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    tgt = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - tgt)


def chunked_cross_entropy(h_BxTxD: jax.Array, head_DxV: jax.Array, targets_BxT: jax.Array,
                          chunk: int) -> jax.Array:
    """``cross_entropy(project(h, head), targets)`` without the [B, T, V] logits: the B * T
    positions in chunks of ``chunk`` (the last one padded and masked out), each chunk's float32
    logits [chunk, V], log-normaliser and target logit computed inside a ``jax.lax.scan`` step
    under ``jax.checkpoint``, so the backward pass recomputes one chunk's logits at a time
    instead of keeping them all. Equal to the full loss up to float rounding (a sum of chunk
    sums divided by B * T instead of one mean)."""
    from engram_jax.layers.common import project

    B, T, D = h_BxTxD.shape
    N = B * T
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    h_NxD = jnp.pad(h_BxTxD.reshape(N, D), ((0, pad), (0, 0)))
    t_N = jnp.pad(targets_BxT.reshape(N), (0, pad))
    valid_N = jnp.arange(n_chunks * chunk) < N

    @jax.checkpoint
    def chunk_sum(h_CxD, t_C, valid_C):
        logits_CxV = project(h_CxD, head_DxV, preferred_element_type=jnp.float32)
        logz = jax.nn.logsumexp(logits_CxV, axis=-1)
        tgt = jnp.take_along_axis(logits_CxV, t_C[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid_C, logz - tgt, 0.0))

    def body(total, xs):
        return total + chunk_sum(*xs), None

    xs = (h_NxD.reshape(n_chunks, chunk, D), t_N.reshape(n_chunks, chunk),
          valid_N.reshape(n_chunks, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total / N


def make_steps(graphdef: nnx.GraphDef, cfg: ModelConfig, tcfg: TrainConfig,
               tx: optax.GradientTransformation, *, eval_stats: bool = False):
    """``step_functions`` jitted for one device (the state donated). A trial jits them with its
    mesh's shardings instead (``parallel.sharding.Parallel.jit_steps``)."""
    train_step, eval_step = step_functions(graphdef, cfg, tcfg, tx, eval_stats=eval_stats)
    return jax.jit(train_step, donate_argnums=(0,)), jax.jit(eval_step)


def step_functions(graphdef: nnx.GraphDef, cfg: ModelConfig, tcfg: TrainConfig,
                   tx: optax.GradientTransformation, *, eval_stats: bool = False):
    """Build ``train_step(state, batch) -> (state, metrics)`` and ``eval_step(state, batch)``,
    pure functions to jit. ``eval_step`` returns the mean loss, or with ``eval_stats``
    ``{"loss": ..., **STAT_KEYS}`` (the train step's metrics carry those statistics too).

    A batch is ``{"tokens": int32 [B, T+1], "hash_ids": {layer: int32 [B, T, G]}}``; optional
    ``"memory": {layer: [B, T, M]}`` carries host-fetched Engram rows (offloaded tables). The
    train step sums the gradients of ``tcfg.grad_accum`` micro-batches (``microbatch``).
    """
    from engram_jax import microbatch
    moe = cfg.moe
    aux_coef = moe.aux_coef if moe is not None and moe.balance == "aux" else 0.0

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        tok = batch["tokens"]
        forward = type(model).hidden if tcfg.loss_chunk else type(model).__call__
        out, recorded = stats.collect(forward, model, tok[:, :-1], batch["hash_ids"],
                                      batch.get("memory"))
        if tcfg.loss_chunk:
            h, head, aux = out
            ce = chunked_cross_entropy(h, head, tok[:, 1:], tcfg.loss_chunk)
        else:
            logits, aux = out
            ce = cross_entropy(logits, tok[:, 1:])
        aux = {**aux, **step_stats(cfg, aux, recorded, tokens=tok.shape[0] * (tok.shape[1] - 1))}
        return ce + aux_coef * aux["aux_loss"], (ce, aux)

    def train_step(state: TrainState, batch):
        (loss, (ce, aux)), grads = microbatch.value_and_grad(loss_fn, tcfg.grad_accum)(
            state.params, state.rest, batch)
        return _finish_step(graphdef, cfg, tx, state, grads, ce, loss, aux, optax.tree.norm(grads))

    def eval_step(state: TrainState, batch):
        ce, aux = loss_fn(state.params, state.rest, batch)[1]
        if not eval_stats:
            return ce
        return {"loss": ce, **{k: aux[k] for k in STAT_KEYS if k in aux}}

    if cfg.engram is not None and cfg.engram.offload:
        if tcfg.grad_accum > 1:
            raise ValueError("grad_accum > 1 with offloaded Engram tables (engram.offload) is not "
                             "supported: the host applies each step's row gradients once")
        train_step = _offload_train_step(loss_fn, graphdef, cfg, tcfg, tx)
    return train_step, eval_step


def _offload_train_step(loss_fn, graphdef, cfg: ModelConfig, tcfg: TrainConfig, tx):
    """The train step for host-offloaded Engram tables (engram_jax/offload.py).

    ``batch["memory"]`` is differentiated like a parameter; the global-norm clip counts the tables'
    aggregated row gradients (``offload.table_grad_sqnorm``) and is applied here, so ``tx`` must
    come from ``make_optimizer(tcfg, clip=False)``. ``metrics["memory_grad"]`` holds
    ``(d loss / d memory {layer_id: [B, T, M]}, global norm)``, unclipped: ``HostTables.apply``
    sums each row's lookups first and clips the sum, as the device-resident path clips the dense
    table gradient.
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
            grads = jax.tree.map(clip, grads)
        state, metrics = _finish_step(graphdef, cfg, tx, state, grads, ce, loss, aux, g_norm)
        return state, {**metrics, "memory_grad": (g_mem, g_norm)}

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
    metrics.update({k: aux[k] for k in STAT_KEYS if k in aux})
    return TrainState(params, opt_state, rest, state.step + 1), metrics


# Per-layer statistics of a step, beside the loss in the train step's metrics and in what the
# eval step returns: the MoE layers' drop rates [n_moe] and the Engram layers' mean gates
# [n_engram] (layers in order).
STAT_KEYS = ("moe_drop_rate", "engram_gate")


def step_stats(cfg: ModelConfig, aux: dict, recorded: dict, *, tokens: int) -> dict:
    """The statistics of a forward pass run through ``stats.collect``: each MoE layer's drop
    rate (from its load and the capacity of ``tokens`` tokens: zero for dropless) and each Engram
    layer's mean gate (recorded by the layer)."""
    from engram_jax.layers.moe import drop_rate

    out = {}
    if cfg.moe is not None:
        out["moe_drop_rate"] = drop_rate(aux["load"], cfg.moe, tokens)
    gates = recorded.get("gate_mean")
    if gates:
        out["engram_gate"] = jnp.stack([jnp.asarray(v, jnp.float32) for v in gates.values()])
    return out
