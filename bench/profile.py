"""Where a train step's time goes, op by op, from XLA's own trace.

``python -m bench.profile --budget cpu-1e12 --rho 1.0 [--core 0]`` builds a budget's train step
(its batch size and sequence length, random tokens and hash ids), runs it under
``jax.profiler`` and attributes every executed XLA operation's time to the part of the model
its HLO came from: attention (``attn_proj`` = the q/k/v/o projections, ``rope``,
``attn_core`` = scores, softmax and the weighted sum), ``router``, ``moe`` (dispatch, experts,
combine and the shared expert), ``engram``, ``norm``, ``head`` (projection to the vocabulary),
``loss`` (cross-entropy) and ``optimizer``; each split into forward and backward. The parts are
named with ``jax.named_scope`` around the modules' calls in this process only (the model's
code is unchanged; scopes only label the HLO). Unlike ``bench.breakdown``, which compiles each
sublayer alone, this measures the one program a trial runs, fusion included.

Prints a table (milliseconds per step and share), with ``--top N`` the N costliest HLO op names,
and with ``--json`` all the numbers. With
``--core N`` the process is pinned to that core before JAX starts (a grid trial's share of the
machine when two run side by side). A CPU tool: the trace's op events are those of XLA's CPU
runtime.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import re
import sys
import tempfile

from bench.cli import add_step_arguments, check_step_arguments

# (module path, attribute, scope): the calls wrapped in a named scope while profiling.
SCOPES = (
    ("engram_jax.layers.attention", "rope", "rope"),
    ("engram_jax.layers.attention", "causal_attention_heads_major", "attn_core"),
    ("engram_jax.layers.attention", "Attention.__call__", "attn_proj"),
    ("engram_jax.layers.moe", "route", "router"),
    ("engram_jax.layers.moe", "MoE.__call__", "moe"),
    ("engram_jax.layers.common", "SwiGLU.__call__", "dense_ffn"),
    ("engram_jax.layers.common", "RMSNorm.__call__", "norm"),
    ("engram_jax.layers.engram", "Engram.__call__", "engram"),
    ("engram_jax.optim", "cross_entropy", "loss"),
    ("engram_jax.model", "project", "head"),  # the model's only direct projection: the LM head
)
TOP_OPS = 50  # op names kept in the result, costliest first
# Innermost first: an op under attn_proj/rope counts as rope.
PRIORITY = ("rope", "attn_core", "attn_proj", "router", "moe", "dense_ffn", "engram", "norm",
            "loss", "head")


def _install_scopes() -> None:
    import importlib

    import jax

    for mod_name, attr, scope in SCOPES:
        mod = importlib.import_module(mod_name)
        owner, name = (mod, attr) if "." not in attr else (getattr(mod, attr.split(".")[0]),
                                                           attr.split(".")[1])
        fn = getattr(owner, name)

        def wrapped(*a, __fn=fn, __scope=scope, **k):
            with jax.named_scope(__scope):
                return __fn(*a, **k)

        setattr(owner, name, functools.wraps(fn)(wrapped))


def _part(op_name: str) -> str:
    """The model part of an HLO op from its ``op_name`` metadata."""
    for scope in PRIORITY:
        if re.search(rf"(^|/|\(){scope}(/|\)|$)", op_name):
            return scope
    if "btd,dv->btv" in op_name:  # the head as an einsum (backends other than the CPU)
        return "head"
    if op_name.startswith("jit(train_step)/") and "jvp(" not in op_name and "transpose(" not in op_name:
        return "optimizer"  # after the gradient: clipping, Adam, the routing-bias update
    return "other"


def profile(budget: str, rho: float, *, steps: int = 10) -> dict:
    """Milliseconds per train step of each (part, direction) and of the whole step."""
    _install_scopes()
    import jax

    from bench.common import budget_train_step, timeit

    _, _, batch, state, train_step = budget_train_step(budget, rho)
    holder = {"state": state}
    hlo = train_step.lower(holder["state"], batch).compile().as_text()
    meta = {}
    for line in hlo.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
        if m:
            meta[m.group(1)] = m.group(2)

    def step():
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    step_s = timeit(step, repeats=5, warmup=3, inner=steps)
    with tempfile.TemporaryDirectory(prefix="engram-profile-") as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            out = step()
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
        ns, per_op = collections.Counter(), collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if "XLAEigen" not in line.name and "PjRt" not in line.name:
                    continue
                for ev in line.events:
                    if ev.name.startswith(("ThunkExecutor", "Slinky")):
                        continue  # wrappers around the ops, not ops
                    op = meta.get(ev.name)
                    part = _part(op) if op is not None else "other"
                    direction = "bwd" if op is not None and "transpose(" in op else "fwd"
                    if part == "optimizer":
                        direction = "-"
                    ns[(part, direction)] += ev.duration_ns
                    per_op[(part, op or ev.name)] += ev.duration_ns
    ops_ms = {f"{p}/{d}": v / 1e6 / steps for (p, d), v in sorted(ns.items())}
    top = [{"part": p, "op_name": o.removeprefix("jit(train_step)/"), "ms": v / 1e6 / steps}
           for (p, o), v in per_op.most_common(TOP_OPS)]
    return {"budget": budget, "rho": rho, "step_ms": step_s * 1e3,
            "ops_ms_total": sum(ops_ms.values()), "ops_ms": ops_ms, "top_ops": top}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap)
    ap.add_argument("--steps", type=int, default=10, help="steps traced (default 10)")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help=f"also list the N costliest HLO op names (summed over their instances; at most {TOP_OPS})")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    a = ap.parse_args(argv)
    check_step_arguments(ap, a, "the profile reads XLA's CPU trace")
    if a.steps < 1:
        ap.error(f"--steps must be >= 1, got {a.steps}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    r = profile(a.budget, a.rho, steps=a.steps)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{a.budget} at rho {a.rho}: step {r['step_ms']:.1f} ms (timed), ops {r['ops_ms_total']:.1f} "
          "ms (traced)")
    print(f"{'part':<12} {'fwd ms':>8} {'bwd ms':>8} {'share':>6}")
    parts = sorted({k.split('/')[0] for k in r["ops_ms"]},
                   key=lambda p: -sum(v for k, v in r["ops_ms"].items() if k.startswith(p + "/")))
    for p in parts:
        f, bw, o = (r["ops_ms"].get(f"{p}/{d}", 0.0) for d in ("fwd", "bwd", "-"))
        print(f"{p:<12} {f + o:8.2f} {bw:8.2f} {(f + bw + o) / r['ops_ms_total']:6.1%}")
    if a.top:
        print(f"\n{'ms':>7}  {'part':<12} op_name")
        for t in r["top_ops"][: a.top]:
            print(f"{t['ms']:7.2f}  {t['part']:<12} {t['op_name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
