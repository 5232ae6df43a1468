"""``make bench``: step time, tokens/s, MFU and a per-part breakdown of the sweep presets.

For each preset of the chosen size, at rho = 1.0 (pure MoE) and rho = 0.8 (an iso-parameter
hybrid from ``allocation.allocate``, same active FLOPs), it measures the train step, attention,
the MoE layer vs a dense FFN with the same useful FLOPs, the Engram gather/scatter vs plain
take / scatter-add ceilings, the host input pipeline and the real pipeline vs a device-resident
batch; ``--only offload`` compares host-offloaded Engram tables with device-resident ones, and
``--only breakdown`` (CPU) splits a train step, on one core, of every CPU budget into its
sublayers and the optimizer update (``bench/breakdown.py``).

Sizes: ``full`` = the GPU presets gpu-s and gpu-m at their budgets' batch sizes (default on a GPU);
``small`` = cpu-small (default on the CPU, a few minutes on 2 cores, plus the ``grid`` part: a
two-trial grid of every CPU budget, ``bench/grid.py``, about ten minutes); ``tiny`` = smoke (tests).
Writes ``<out>/<device-kind-slug>.csv`` (rows of this run replace rows with the same name and
config) and prints a table last. ``mfu`` is against the H100's measured bf16 peak on an H100 and
against a matmul measured in the same run elsewhere (the table's header says which);
``mfu_rated`` is against the chip's rated dense peak (``engram_jax.peaks``: H100, H200, A100,
B200, TPU v4/v5e/v5p/v6e; a CPU has none). ``python -m bench.gpucheck`` (``make bench-gpu``) is
the accelerator check: the GPU budgets' train step with each option on and off.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import jax

from bench.common import (Results, Row, rated_mfu_row, rated_peak_for_run, reference_peak,
                          target_row)
from bench.parts import Timing, attention_rows, engram_rows, moe_rows, pipeline_rows, train_rows
from engram_jax import host_malloc
from engram_jax.allocation import BUDGETS, allocate
from engram_jax.config import TrainConfig, preset

PARTS = ("train", "attention", "moe", "engram", "pipeline", "grid", "offload", "breakdown")


@dataclasses.dataclass(frozen=True)
class Size:
    presets: tuple[str, ...]
    batch_size: int | None  # None: the budget's batch size
    repeats: int
    inner: int
    cpu_matmul_n: tuple[int, ...]  # the CPU peak is the best f32 matmul of these sizes
    corpus: str | None  # None: the budget's corpus
    offload_steps: int
    offload_max_doublings: int


SIZES = {
    "full": Size(("gpu-s", "gpu-m"), None, 10, 5, (4096,), None, 20, 8),
    "small": Size(("cpu-small",), 8, 5, 2, (1024, 2048), "pystdlib", 4, 3),
    "tiny": Size(("smoke",), 2, 3, 1, (256,), "pystdlib", 2, 1),
}
# The grid part (CPU only): which budgets, at what share of their steps, on which corpus.
GRID_SIZES = {"small": (None, 0.25, None), "tiny": (("smoke",), 0.25, "pystdlib")}


def configs(name: str, size: Size, dtype: str, mesh: str | None = None):
    """(tag, model config, train config, corpus) at rho = 1.0 and rho = 0.8; with a device
    ``mesh`` the train config names it and the tag ends in ``@mesh=...``."""
    budget = BUDGETS[name]
    base = dataclasses.replace(preset(name), dtype=dtype)
    B = size.batch_size or budget.batch_size
    tcfg = TrainConfig(**{**budget.train_overrides(), "batch_size": B, "steps": 1000,
                          **({"mesh": mesh} if mesh else {})})
    corpus = size.corpus or budget.corpus
    suffix = f"@mesh={tcfg.mesh}" if tcfg.mesh.size > 1 else ""
    for rho in (1.0, 0.8):
        yield f"{name}@rho={rho}{suffix}", allocate(base, rho), tcfg, corpus


def run(size_name: str, only: str | None, out: Path | None, corpus: str | None = None,
        mesh: str | None = None) -> Results:
    from engram_jax import data as data_lib
    from engram_jax.train import _git_commit

    size = SIZES[size_name]
    if corpus is not None:
        size = dataclasses.replace(size, corpus=corpus)
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    peak = reference_peak(dtype, cpu_matmul_n=size.cpu_matmul_n)
    res = Results()
    res.notes.append(f"peak for MFU and achieved/peak: {peak.label} = {peak.flops / 1e12:.4g} "
                     "TFLOP/s")
    # One peak per run: every ratio of this run's rows is taken against this row (same `run`).
    res.add(Row("reference_peak_tflops", f"run:{res.run_id}", peak.flops / 1e12, "TFLOP/s"))
    # Beside it the chip's rated dense peak (engram_jax.peaks), where the table has one: the
    # ``mfu_rated`` rows are taken against it.
    rated = rated_peak_for_run(dtype)
    if rated is not None:
        res.add(Row("rated_peak_tflops", f"run:{res.run_id}", rated.flops / 1e12, "TFLOP/s"))
        res.notes.append(f"rated peak for mfu_rated: {rated.chip} {dtype} "
                         f"{rated.flops / 1e12:.4g} TFLOP/s ({rated.source})")
    t = Timing(size.repeats, size.inner)
    want = (lambda p: p == only) if only else (lambda p: p not in ("offload", "breakdown"))
    # The grid part runs by default at size small (make bench) and whenever it is named.
    if (want("grid") and jax.default_backend() == "cpu" and size_name in GRID_SIZES
            and (only == "grid" or size_name == "small")):
        # First, while nothing else of this run holds the cores: it runs trials in subprocesses.
        from bench.grid import grid_rows

        budgets, frac, grid_corpus = GRID_SIZES[size_name]
        res.add(*grid_rows(peak, budgets=list(budgets) if budgets else None, steps_fraction=frac,
                           corpus=corpus or grid_corpus))
    if want("breakdown") and jax.default_backend() == "cpu" and size_name in GRID_SIZES:
        from bench.breakdown import breakdown_rows
        from bench.grid import cpu_budgets

        budgets = GRID_SIZES[size_name][0]
        res.add(*breakdown_rows(peak, list(budgets) if budgets else cpu_budgets(),
                                repeats=t.repeats))
    if only in ("grid", "breakdown"):
        want = lambda p: False  # noqa: E731
    if mesh is not None:  # a trial over a mesh: its train step (the parts are one-device probes)
        want = lambda p: p == "train"  # noqa: E731
    for name in size.presets:
        tps = {}
        for tag, cfg, tcfg, corp in configs(name, size, dtype, mesh):
            data = data_lib.prepare(corp, cfg.vocab_size, progress=False)
            hash_fn = data_lib.make_hash_fn(cfg.engram, data, cfg.vocab_size) if cfg.engram else None
            it_factory = functools.partial(
                data_lib.BatchIterator, data.train_tokens, batch_size=tcfg.batch_size,
                seq_len=cfg.seq_len, seed=0, hash_fn=hash_fn)
            B = tcfg.batch_size
            hybrid = cfg.engram is not None
            if want("train") or want("pipeline"):
                rows, tps[tag] = train_rows(cfg, tcfg, it_factory, peak, t, tag)
                if want("train"):
                    res.add(*rows)
                    from engram_jax.counting import flops_per_token

                    r = rated_mfu_row(tag, tps[tag], flops_per_token(cfg), rated, tcfg.mesh.size)
                    if r is not None:
                        res.add(r)
                if want("pipeline"):
                    res.add(*pipeline_rows(it_factory, cfg, B, tps[tag], t, tag))
            if want("attention") and not hybrid:  # attention is the same in both configs
                res.add(*attention_rows(cfg, B, peak, t, name))
            if want("moe") and not hybrid:
                res.add(*moe_rows(cfg, B, peak, t, tag))
            if want("engram") and hybrid:
                ids = it_factory(prefetch=0).batch_at(0)["hash_ids"][cfg.engram.layer_ids[0]]
                res.add(*engram_rows(cfg, ids, t, tag))
            if want("offload") and hybrid:
                from bench.offload import offload_rows

                def make_it(c, *, prefetch, post_fn, data=data, tcfg=tcfg):
                    return data_lib.BatchIterator(
                        data.train_tokens, batch_size=tcfg.batch_size, seq_len=c.seq_len, seed=0,
                        hash_fn=data_lib.make_hash_fn(c.engram, data, c.vocab_size),
                        prefetch=prefetch, post_fn=post_fn)

                res.add(*offload_rows(cfg, tcfg, make_it, tag, steps=size.offload_steps,
                                      max_doublings=size.offload_max_doublings))
        if len(tps) == 2:
            moe_tps, hyb_tps = tps.values()
            res.add(target_row("hybrid_over_moe_tokens_per_s", name, hyb_tps / moe_tps, ">=", 0.97))
    if out is not None:
        path = res.write(out, _git_commit())
        res.notes.append(f"wrote {path}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench", help="directory of the CSV")
    ap.add_argument("--size", choices=sorted(SIZES),
                    help="default: full on a GPU/TPU, small on the CPU")
    ap.add_argument("--only", choices=PARTS, help="run one part (offload and breakdown run only when named)")
    ap.add_argument("--corpus", help="override the size's corpus (pystdlib | pysrc | a path)")
    ap.add_argument("--mesh", metavar="data=N,fsdp=N,expert=N",
                    help="time the train step over this device mesh (engram_jax.parallel) and "
                         "report per-device figures: tokens/s, MFU, parameters and state")
    a = ap.parse_args(argv)
    try:  # the trials' malloc settings, before JAX starts its threads
        host_malloc.apply_in_process()
    except ValueError as e:  # a bad $ENGRAM_JAX_HOST_MALLOC
        ap.error(str(e))
    size = a.size or ("small" if jax.default_backend() == "cpu" else "full")
    if a.mesh is not None:
        from engram_jax.parallel import MeshShape, check_mesh

        try:
            for name in SIZES[size].presets:
                for _, cfg, tcfg, _ in configs(name, SIZES[size], "float32", a.mesh):
                    check_mesh(tcfg.mesh, cfg, tcfg, devices=jax.device_count())
        except ValueError as e:
            ap.error(str(e))
        a.mesh = str(MeshShape.parse(a.mesh))
    res = run(size, a.only, Path(a.out), a.corpus, a.mesh)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), size {size}")
    for n in res.notes:
        print(n)
    print(res.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
