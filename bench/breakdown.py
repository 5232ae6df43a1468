"""The ``breakdown`` part of ``make bench``: where a CPU trial's train step spends its time.

For each CPU budget at rho = 1.0 and 0.8 (the budget's batch size and sequence length) this times,
in a subprocess pinned to one core (a grid trial's share of the machine when two run side by
side):

* ``step``: the jitted train step (``optim.make_steps``), forward, backward and optimizer update;
* ``grad``: forward and backward of the whole model (``jax.grad`` of the same loss), so
  ``optimizer`` = step - grad;
* per sublayer, forward and backward of one module on a [B, T, D] input, times the number of
  such modules: ``attention``, ``moe``, ``dense_ffn``, ``engram`` (lookup, gate, convolution and
  the table gradient) and ``head`` (final projection to the vocabulary and cross-entropy);
* ``other`` = grad - the sum of the sublayers: embedding gather, norms, residual adds, the loss
  reduction and what fusing the whole model saves or costs.

Each component row gives milliseconds and its share of the step; matmul components also give
their achieved FLOP/s (``counting.py``'s convention: 3 x forward matmul FLOPs). Inputs are random
(tokens uniform over the vocabulary, hash ids uniform within each head's sub-table).
Run alone: ``python -m bench.breakdown --budget cpu-1e12 --rho 0.8 --core 0`` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.cli import add_step_arguments, check_step_arguments

REPO_MODULE = "bench.breakdown"


def measure(budget: str, rho: float, *, repeats: int = 7) -> dict:
    """Milliseconds per component of one train step of ``budget`` at ``rho`` (this process's
    threading) and the FLOPs of the matmul components."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.common import budget_step_inputs, timeit
    from bench.parts import _fwd_bwd, _x
    from engram_jax.layers.attention import Attention
    from engram_jax.layers.common import SwiGLU
    from engram_jax.layers.engram import Engram
    from engram_jax.layers.moe import MoE
    from engram_jax.model import HybridLM
    from engram_jax.optim import TrainState, cross_entropy, make_optimizer, make_steps

    cfg, tcfg, batch = budget_step_inputs(budget, rho)
    B, T, D, V = tcfg.batch_size, cfg.seq_len, cfg.d_model, cfg.vocab_size
    tokens, hash_ids = batch["tokens"], batch["hash_ids"]

    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tcfg)
    # The train step donates its state: it gets its own copies.
    holder = {"state": TrainState(jax.tree.map(jnp.copy, params), tx.init(params),
                                  jax.tree.map(jnp.copy, rest), jnp.zeros((), jnp.int32))}
    train_step, _ = make_steps(graphdef, cfg, tcfg, tx)

    def step():
        holder["state"], m = train_step(holder["state"], batch)
        return m["loss"]

    def loss(p):
        logits, _ = nnx.merge(graphdef, p, rest)(tokens[:, :-1], hash_ids)
        return cross_entropy(logits, tokens[:, 1:])

    grad = jax.jit(jax.grad(loss))
    ms = {"step": timeit(step, repeats=repeats, warmup=2) * 1e3,
          "grad": timeit(lambda: grad(params), repeats=repeats, warmup=2) * 1e3}

    x = _x(cfg, B)
    n_moe = len(cfg.moe_layer_ids)
    n_dense = cfg.n_layers - n_moe
    counts = {"attention": cfg.n_layers, "moe": n_moe, "dense_ffn": n_dense,
              "engram": len(hash_ids), "head": 1}
    one = {}
    one["attention"] = timeit(_fwd_bwd(Attention(D, cfg.n_heads, n_layers=cfg.n_layers,
                                                 rope_theta=cfg.rope_theta, rngs=nnx.Rngs(0)), x),
                              repeats=repeats, warmup=2)
    if n_moe:
        one["moe"] = timeit(_fwd_bwd(MoE(D, cfg.moe, n_layers=cfg.n_layers, rngs=nnx.Rngs(0)), x),
                            repeats=repeats, warmup=2)
    if n_dense:
        one["dense_ffn"] = timeit(_fwd_bwd(SwiGLU(D, cfg.d_ff, n_layers=cfg.n_layers,
                                                  rngs=nnx.Rngs(0)), x), repeats=repeats, warmup=2)
    if hash_ids:
        lid = cfg.engram.layer_ids[0]
        gd, st = nnx.split(Engram(D, cfg.engram, lid, rngs=nnx.Rngs(0)))
        ct = jax.random.normal(jax.random.key(7), x.shape, jnp.float32)
        eng = jax.jit(jax.grad(lambda s, h, i: jnp.sum(nnx.merge(gd, s)(h, i) * ct), argnums=(0, 1)))
        one["engram"] = timeit(lambda: eng(st, x, hash_ids[lid]), repeats=repeats, warmup=2)
    w = jax.random.normal(jax.random.key(2), (D, V), jnp.float32) * D**-0.5
    head = jax.jit(jax.grad(lambda w_, h: cross_entropy(
        jnp.einsum("btd,dv->btv", h, w_), tokens[:, 1:]), argnums=(0, 1)))
    one["head"] = timeit(lambda: head(w, x), repeats=repeats, warmup=2)
    for k, s in one.items():
        ms[k] = s * 1e3 * counts[k]
    ms["optimizer"] = ms["step"] - ms["grad"]
    ms["other"] = ms["grad"] - sum(ms[k] for k in one)

    flops = component_flops(cfg, B)
    return {"budget": budget, "rho": rho, "batch": B, "seq_len": T, "ms": ms, "flops": flops}


def component_flops(cfg, B: int) -> dict[str, float]:
    """Training FLOPs of one step (3 x forward matmul FLOPs, ``counting.py``'s convention) of the
    whole model (``step``, ``grad``) and of each matmul component over all its layers."""
    from engram_jax.counting import flops_per_token

    m, D, T, V = cfg.moe, cfg.d_model, cfg.seq_len, cfg.vocab_size
    S = B * T
    n_moe = len(cfg.moe_layer_ids)
    n_dense = cfg.n_layers - n_moe
    flops = {"step": flops_per_token(cfg) * S, "grad": flops_per_token(cfg) * S,
             "attention": cfg.n_layers * 3.0 * S * (2 * 4 * D * D + 2 * 2 * T * D),
             "head": 3.0 * S * 2 * D * V}
    if n_moe:  # routed top-k and shared experts, router included (2 D E per token)
        flops["moe"] = n_moe * 3.0 * S * (2 * 3 * D * m.d_expert * (m.top_k + m.n_shared)
                                          + 2 * D * m.n_routed)
    if n_dense:
        flops["dense_ffn"] = n_dense * 3.0 * S * 2 * 3 * D * cfg.d_ff
    return flops


def run_subprocess(budget: str, rho: float, *, repeats: int = 7, timeout: int = 900) -> dict:
    """``measure`` in a fresh process pinned to one core (XLA sizes its CPU thread pool when JAX
    starts), the share of the machine a grid trial has when two run side by side."""
    core = min(os.sched_getaffinity(0))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", REPO_MODULE, "--budget", budget, "--rho", str(rho),
                           "--repeats", str(repeats), "--core", str(core)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"breakdown of {budget} at rho {rho} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


COMPONENTS = ("attention", "moe", "dense_ffn", "engram", "head", "other", "optimizer")


def breakdown_rows(peak, budgets: list[str], *, repeats: int = 7) -> list:
    """Rows ``step_breakdown_ms`` per budget, rho and component (ratio = share of the step) and
    ``step_breakdown_tflops`` for the matmul components (ratio = against the run's peak, which is
    both cores': a component on one core can reach about half of it)."""
    from bench.common import Row

    out = []
    for budget in budgets:
        for rho in (1.0, 0.8):
            r = run_subprocess(budget, rho, repeats=repeats)
            ms, flops = r["ms"], r["flops"]
            tag = f"{budget}@rho={rho}@1core"
            out.append(Row("step_breakdown_ms", f"{tag}@step", ms["step"], "ms", ratio=1.0))
            for c in COMPONENTS:
                if c in ms:
                    out.append(Row("step_breakdown_ms", f"{tag}@{c}", ms[c], "ms",
                                   ratio=ms[c] / ms["step"]))
            for c in ("step", "attention", "moe", "dense_ffn", "head"):
                if c in flops and ms.get(c, 0) > 0:
                    fps = flops[c] / (ms[c] / 1e3)
                    out.append(Row("step_breakdown_tflops", f"{tag}@{c}", fps / 1e12, "TFLOP/s",
                                   ratio=fps / peak.flops))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    check_step_arguments(ap, a, "the breakdown times CPU budgets")
    print(json.dumps(measure(a.budget, a.rho, repeats=a.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
