"""The matmul-only ceiling of a CPU budget's train step (CPU, not a part of ``make bench``).

Collects every ``dot_general`` of the program a trial runs (forward, backward and optimizer,
from the jitted train step's jaxpr, custom VJPs included), times each alone at its own shapes and
dtypes, and adds them up with their multiplicities. Against the timed step this says how much of
a step its matmuls are, and what the step would reach if everything else took no time:
``ceiling_model_tflops`` = the model's FLOPs per step (``counting.flops_per_token``) over the
matmuls' time.

    python -m bench.dots --budget cpu-1e13 --rho 1.0 --core 1 [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys

from bench.cli import add_step_arguments, check_step_arguments


def _dots(jaxpr) -> collections.Counter:
    """(lhs shape, lhs dtype, rhs shape, rhs dtype, dimension numbers, preferred type) -> count."""
    from jax.extend.core import jaxprs_in_params

    found = collections.Counter()

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "dot_general":
                a, b = (v.aval for v in e.invars)
                pref = e.params.get("preferred_element_type")
                found[(a.shape, str(a.dtype), b.shape, str(b.dtype), e.params["dimension_numbers"],
                       None if pref is None else str(pref))] += 1
            for sub in jaxprs_in_params(e.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def dot_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
    """2 x (product of lhs dims) x (product of rhs dims that are neither contracted nor batch)."""
    (_, rc), (_, rb) = dimension_numbers
    free = [n for i, n in enumerate(rhs_shape) if i not in rc and i not in rb]
    return 2 * math.prod(lhs_shape) * math.prod(free)


def measure(budget: str, rho: float, *, repeats: int = 7) -> dict:
    import jax
    import jax.numpy as jnp

    from bench.common import budget_train_step, timeit

    cfg, tcfg, batch, state, train_step = budget_train_step(budget, rho)
    holder = {"state": state}
    dots = _dots(jax.make_jaxpr(train_step)(holder["state"], batch))

    def step():
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    step_s = timeit(step, repeats=repeats, warmup=3, inner=5)
    key = jax.random.key(0)
    total_s, total_flops, kinds = 0.0, 0, []
    for (sa, da, sb, db, dn, pref), n in dots.items():
        ka, kb = jax.random.split(jax.random.fold_in(key, len(kinds)))
        x = jax.random.normal(ka, sa, jnp.float32).astype(da)
        y = jax.random.normal(kb, sb, jnp.float32).astype(db)
        f = jax.jit(lambda x, y, dn=dn, pref=pref: jax.lax.dot_general(
            x, y, dn, preferred_element_type=None if pref is None else jnp.dtype(pref)))
        t = timeit(lambda: f(x, y), repeats=repeats, warmup=2, inner=5)
        fl = dot_flops(sa, sb, dn)
        total_s += n * t
        total_flops += n * fl
        kinds.append({"lhs": list(sa), "rhs": list(sb), "count": n, "us": t * 1e6,
                      "gflops": fl / t / 1e9})
    model_flops = tcfg.batch_size * cfg.seq_len * cfg.flops_per_token()
    return {"budget": budget, "rho": rho, "step_ms": step_s * 1e3, "dots_ms": total_s * 1e3,
            "dot_share": total_s / step_s, "dot_calls": sum(dots.values()),
            "dot_flops": total_flops, "model_flops": model_flops,
            "ceiling_model_tflops": model_flops / total_s / 1e12,
            "step_model_tflops": model_flops / step_s / 1e12, "kinds": kinds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    a = ap.parse_args(argv)
    check_step_arguments(ap, a, "the matmul ceiling times CPU budgets")
    r = measure(a.budget, a.rho, repeats=a.repeats)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{a.budget} at rho {a.rho}: step {r['step_ms']:.1f} ms; its {r['dot_calls']} matmuls "
          f"({len(r['kinds'])} shapes), each timed alone: {r['dots_ms']:.1f} ms "
          f"({100 * r['dot_share']:.0f}% of the step)")
    print(f"model FLOP/s: step {r['step_model_tflops'] * 1e3:.1f} GFLOP/s, matmuls only "
          f"{r['ceiling_model_tflops'] * 1e3:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
