"""Train steps of one model on several device meshes in one process, for tests/test_parallel.py.

``python -m tests.mesh_worker SPEC_JSON`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
set before JAX starts (the device count is fixed when JAX initialises, so the tests run this in a
subprocess). SPEC: ``{"preset": name, "overrides": {...}, "train": {...}, "steps": n,
"meshes": ["data=1", "data=2,fsdp=2,expert=2", ...], "shards": bool, "eval": bool}``. Each mesh trains the
same model from the same initial weights on the same synthetic batches through
``Parallel.jit_steps``, exactly as ``engram_jax.train`` does; prints one JSON line:
``{"losses": {mesh: [loss per step]}, "grad_norms": {...}, "eval": {mesh: loss}, "shards":
{mesh: {param path: [global rows, rows on each device ...]}}}``.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config import TrainConfig, preset
from engram_jax.model import HybridLM, default_hash_fn
from engram_jax.optim import TrainState, make_optimizer, step_functions
from engram_jax.parallel import rules
from engram_jax.parallel.sharding import Parallel


def batches(cfg, B: int, steps: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    hash_fn = default_hash_fn(cfg)
    out = []
    for _ in range(steps + 1):  # the last one is the evaluation batch
        tok = rng.integers(1, cfg.vocab_size, size=(B, cfg.seq_len + 1)).astype(np.int32)
        out.append({"tokens": tok, "hash_ids": hash_fn(tok[:, :-1])})
    return out


def run(spec: dict) -> dict:
    cfg = preset(spec["preset"]).with_overrides(spec.get("overrides", {}))
    result = {"losses": {}, "grad_norms": {}, "eval": {}, "shards": {}}
    for mesh in spec["meshes"]:
        tcfg = TrainConfig(**{**spec.get("train", {}), "mesh": mesh})
        data = batches(cfg, tcfg.batch_size, spec["steps"])
        par = Parallel(tcfg.mesh, cfg, tcfg)
        model = HybridLM(cfg, rngs=nnx.Rngs(tcfg.seed), remat=tcfg.remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = par.put(par.pad_tables(params))
        tx = make_optimizer(tcfg)
        state = par.put(TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32)))
        train_step, eval_step = par.jit_steps(*step_functions(graphdef, cfg, tcfg, tx), state)
        losses, norms = [], []
        for b in data[:-1]:
            state, m = train_step(state, par.put_batch(b))
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
        result["losses"][mesh], result["grad_norms"][mesh] = losses, norms
        if spec.get("eval", True):
            result["eval"][mesh] = float(eval_step(state, par.put_batch(data[-1])))
        if spec.get("shards"):
            shards = {}
            for path, x in jax.tree_util.tree_leaves_with_path(state.params):
                name = "/".join(rules.path_names(path))
                shards[name] = [list(x.shape)] + [list(s.data.shape) for s in x.addressable_shards]
            for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
                if np.ndim(x) >= 2:
                    shards["opt:" + "/".join(rules.path_names(path))] = (
                        [list(x.shape)] + [list(s.data.shape) for s in x.addressable_shards])
            result["shards"][mesh] = shards
    return result


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
