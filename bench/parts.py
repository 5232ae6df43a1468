"""The measurements of one preset: train step, attention, MoE vs dense FFN, Engram gather/scatter,
host input pipeline. Each returns ``Row``s; FLOPs and bytes are counted before timing."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import Peak, Row, target_row, timeit
from engram_jax.config import ModelConfig, TrainConfig
from engram_jax.counting import flops_per_token
from engram_jax.layers.attention import Attention
from engram_jax.layers.common import SwiGLU
from engram_jax.layers.engram import Engram
from engram_jax.layers.moe import MoE


@dataclasses.dataclass
class Timing:
    repeats: int
    inner: int  # steps per timed sample


def _fwd_bwd(module: nnx.Module, x: jax.Array):
    """A jitted fwd+bwd of ``module`` (grads w.r.t. its params and input) and its argument."""
    graphdef, state = nnx.split(module)
    ct = jax.random.normal(jax.random.key(7), x.shape, jnp.float32)  # layers map [B,T,D] -> [B,T,D]

    def loss(st, x_, ct_):
        y = nnx.merge(graphdef, st)(x_)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.sum(y.astype(jnp.float32) * ct_)

    f = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: f(state, x, ct)


def _x(cfg: ModelConfig, B: int, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, cfg.seq_len, cfg.d_model),
                             jnp.float32).astype(cfg.dtype)


def attention_rows(cfg: ModelConfig, B: int, peak: Peak, t: Timing, tag: str) -> list[Row]:
    D, T = cfg.d_model, cfg.seq_len
    flops = 3.0 * B * T * (2 * 4 * D * D + 2 * 2 * T * D)  # the counting.py convention (full window)
    attn = Attention(D, cfg.n_heads, n_layers=cfg.n_layers, rope_theta=cfg.rope_theta,
                     rngs=nnx.Rngs(0))
    s = timeit(_fwd_bwd(attn, _x(cfg, B)), repeats=t.repeats, warmup=2)
    return [Row("attention_fwd_bwd_ms", tag, s * 1e3, "ms"),
            Row("attention_fwd_bwd_tflops", tag, flops / s / 1e12, "TFLOP/s",
                ratio=flops / s / peak.flops)]


def moe_rows(cfg: ModelConfig, B: int, peak: Peak, t: Timing, tag: str) -> list[Row]:
    """The MoE layer vs a dense SwiGLU of hidden (top_k + n_shared) * d_expert (same useful FLOPs)."""
    m, D, S = cfg.moe, cfg.d_model, B * cfg.seq_len
    hidden = (m.top_k + m.n_shared) * m.d_expert
    useful = 3.0 * S * 2 * 3 * D * hidden  # fwd + bwd, router excluded (it is 2 * D * E per token)
    x = _x(cfg, B)
    moe = MoE(D, m, n_layers=cfg.n_layers, rngs=nnx.Rngs(0))
    dense = SwiGLU(D, hidden, n_layers=cfg.n_layers, rngs=nnx.Rngs(0))
    s_moe = timeit(_fwd_bwd(moe, x), repeats=t.repeats, warmup=2)
    s_dense = timeit(_fwd_bwd(dense, x), repeats=t.repeats, warmup=2)
    return [
        Row("moe_fwd_bwd_ms", tag, s_moe * 1e3, "ms"),
        Row("moe_fwd_bwd_useful_tflops", tag, useful / s_moe / 1e12, "TFLOP/s",
            ratio=useful / s_moe / peak.flops),
        Row("dense_ffn_fwd_bwd_ms", tag, s_dense * 1e3, "ms"),
        Row("dense_ffn_fwd_bwd_tflops", tag, useful / s_dense / 1e12, "TFLOP/s",
            ratio=useful / s_dense / peak.flops),
        target_row("moe_over_dense_time", tag, s_moe / s_dense, "<=", 1.5),
    ]


def engram_rows(cfg: ModelConfig, hash_ids_BxTxG: np.ndarray, t: Timing, tag: str) -> list[Row]:
    """Engram lookup (gather) and table gradient (scatter-add) vs plain take / .at[].add ceilings.

    The ceiling gathers the same number of uniformly random rows from a table of the same shape;
    the ratio is ceiling time / Engram time (1.0 = at the ceiling).
    """
    lid = cfg.engram.layer_ids[0]
    eng = Engram(cfg.d_model, cfg.engram, lid, rngs=nnx.Rngs(0))
    table = eng.table[...]
    R, H = table.shape
    ids = jnp.asarray(hash_ids_BxTxG)
    N = ids.size
    offsets = jnp.asarray(eng.offsets, jnp.int32)
    M = cfg.engram.d_mem

    def lookup(tab, ids_):
        e = jnp.take(tab, ids_ + offsets, axis=0)
        return e.reshape(*ids_.shape[:2], M)

    ct = jax.random.normal(jax.random.key(3), (*ids.shape[:2], M), jnp.float32)
    fwd = jax.jit(lookup)
    bwd = jax.jit(jax.grad(lambda tab, ids_, ct_: jnp.sum(lookup(tab, ids_) * ct_)))
    rnd = jax.random.randint(jax.random.key(5), (N,), 0, R, jnp.int32)
    rows_ct = ct.reshape(N, H)
    take = jax.jit(lambda tab, i: jnp.take(tab, i, axis=0))
    scat = jax.jit(lambda tab, i, g: jnp.zeros_like(tab).at[i].add(g))

    s_fwd = timeit(lambda: fwd(table, ids), repeats=t.repeats, warmup=2)
    s_bwd = timeit(lambda: bwd(table, ids, ct), repeats=t.repeats, warmup=2)
    s_take = timeit(lambda: take(table, rnd), repeats=t.repeats, warmup=2)
    s_scat = timeit(lambda: scat(table, rnd, rows_ct), repeats=t.repeats, warmup=2)
    row_bytes = H * 4
    return [
        Row("engram_gather_rows_per_s", tag, N / s_fwd, "rows/s"),
        Row("engram_gather_gb_per_s", tag, 2 * N * row_bytes / s_fwd / 1e9, "GB/s"),
        Row("ceiling_take_rows_per_s", tag, N / s_take, "rows/s"),
        target_row("engram_gather_vs_ceiling", tag, s_take / s_fwd, ">=", 0.7),
        Row("engram_table_grad_ms", tag, s_bwd * 1e3, "ms"),
        Row("ceiling_scatter_add_ms", tag, s_scat * 1e3, "ms"),
        target_row("engram_scatter_vs_ceiling", tag, s_scat / s_bwd, ">=", 0.7),
    ]


def pipeline_rows(it_factory, cfg: ModelConfig, B: int, train_tps: float, t: Timing,
                  tag: str) -> list[Row]:
    """Host batch production (windows + compressed hashing), one thread, no device work."""
    it = it_factory(prefetch=0)
    it.batch_at(0)
    n = max(3, t.repeats)
    t0 = time.perf_counter()
    for s in range(1, n + 1):
        b = it.batch_at(s)
    dt = (time.perf_counter() - t0) / n
    tokens = B * cfg.seq_len
    ids = sum(h.size for h in b["hash_ids"].values())
    tps = tokens / dt
    rows = [Row("pipeline_tokens_per_s", tag, tps, "tok/s")]
    if ids:
        rows.append(Row("pipeline_hash_ids_per_s", tag, ids / dt, "ids/s"))
    return rows + [target_row("pipeline_over_train_tokens", tag, tps / train_tps, ">=", 1.0, value=tps,
                       unit="tok/s")]


def train_rows(cfg: ModelConfig, tcfg: TrainConfig, it_factory, peak: Peak, t: Timing,
               tag: str) -> tuple[list[Row], float]:
    """Train step on a device-resident batch and on the real prefetching pipeline.

    Returns the rows and the synthetic-batch tokens/s (for the hybrid / MoE ratio).
    """
    from engram_jax.model import HybridLM
    from engram_jax.optim import TrainState, make_optimizer, step_functions
    from engram_jax.parallel.sharding import Parallel

    B, T = tcfg.batch_size, cfg.seq_len
    par = Parallel(tcfg.mesh, cfg, tcfg)  # one device unless the train config names a mesh
    model = HybridLM(cfg, rngs=nnx.Rngs(tcfg.seed), remat=tcfg.remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = par.put(par.pad_tables(params))
    tx = make_optimizer(tcfg)
    state = par.put(TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32)))
    train_step, _ = par.jit_steps(*step_functions(graphdef, cfg, tcfg, tx), state)
    state_bytes = par.per_device_bytes(state)
    it = it_factory(prefetch=4, post_fn=par.put_batch)
    try:
        fixed = par.put_batch(it.batch_at(10_000))  # a real batch, resident on the device(s)
        holder = {"state": state}

        def synthetic():
            holder["state"], m = train_step(holder["state"], fixed)
            return m["loss"]

        def real():
            holder["state"], m = train_step(holder["state"], next(it))
            return m["loss"]

        s_syn = timeit(synthetic, repeats=t.repeats, warmup=2, inner=t.inner)
        s_real = timeit(real, repeats=t.repeats, warmup=1, inner=t.inner)
        s_syn2 = timeit(synthetic, repeats=t.repeats, warmup=0, inner=t.inner)
        s_syn = (s_syn + s_syn2) / 2  # medians before and after the real-pipeline run (drift)
    finally:
        it.close()
    fpt = flops_per_token(cfg)
    tps = B * T / s_syn
    n_dev = tcfg.mesh.size
    mfu = tps / n_dev * fpt / peak.flops  # per device
    rows = [
        Row("train_step_ms", tag, s_syn * 1e3, "ms"),
        Row("train_tokens_per_s", tag, tps, "tok/s"),
        Row("model_flops_per_token", tag, fpt, "FLOP"),
        Row("mfu", tag, mfu, "fraction", ratio=mfu),
        Row("train_step_real_pipeline_ms", tag, s_real * 1e3, "ms"),
        target_row("real_over_synthetic_step", tag, s_real / s_syn, "<=", 1.02),
    ]
    if n_dev > 1:  # the trial's mesh: what one device does and holds
        from engram_jax.parallel.rules import per_device_params

        rows += [
            Row("train_tokens_per_s_per_device", tag, tps / n_dev, "tok/s"),
            Row("params_per_device", tag, per_device_params(cfg, tcfg.mesh)["total"], "params"),
            Row("state_bytes_per_device", tag, state_bytes, "B"),
        ]
    return rows, tps
