"""Properties of the sparsity-allocation solver (docs/paper.md section 2) over random MoE bases.

A seeded numpy loop stands in for property-based testing: ~50 random bases, random rho.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from engram_jax.allocation import (
    BUDGETS,
    DEFAULT_RHOS,
    TOLERANCE,
    allocate,
    budget_ladder,
    default_engram,
    n_routed_for,
)
from engram_jax.config import PRESETS, EngramConfig, ModelConfig, MoEConfig, preset


def random_base(rng: np.random.Generator) -> ModelConfig:
    """A pure MoE base large enough that Engram's dense params fit in the 2% active tolerance."""
    n_heads = int(rng.choice([2, 4, 8]))
    d_model = n_heads * int(rng.choice([16, 32, 64]))
    k = int(rng.integers(1, 5))
    e0 = k + 10 * int(rng.integers(1, 6))
    n_layers = int(rng.integers(2, 13))
    return ModelConfig(
        vocab_size=int(rng.choice([256, 1024, 8192])), d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, d_ff=2 * d_model, n_dense_layers=int(rng.integers(0, 2)),
        moe=MoEConfig(n_routed=e0, top_k=k, n_shared=int(rng.integers(0, 3)),
                      d_expert=int(rng.choice([1, 2])) * d_model),
    )


def _bases(n: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(random_base(rng), float(rng.uniform(0.3, 1.0))) for _ in range(n)]


def test_properties_over_random_bases():
    checked = refused = 0
    for base, rho in _bases():
        b = base.param_counts()
        try:
            cfg = allocate(base, rho)
        except ValueError as e:
            # A refusal must name its constraint (the rho rounding case, or the 2% tolerance).
            assert re.search(r"rounds to all|parameters (grow|shrink) by", str(e)), (base, rho, e)
            refused += 1
            continue
        c = cfg.param_counts()
        m0, m = base.moe, cfg.moe
        assert m.n_routed == m0.top_k + math.floor(rho * (m0.n_routed - m0.top_k) + 0.5)
        assert (m.top_k, m.n_shared, m.d_expert) == (m0.top_k, m0.n_shared, m0.d_expert)
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size) == (
            base.d_model, base.n_layers, base.n_heads, base.vocab_size)
        for key in ("total", "active"):
            assert abs(c[key] / b[key] - 1) <= TOLERANCE, (key, c[key], b[key])
        assert c["p_tot"] == pytest.approx(b["p_tot"], rel=TOLERANCE)
        # Realised rho within half an expert's share (rounding) plus the router/Engram-dense terms.
        half_expert = 0.5 / (m0.n_routed - m0.top_k)
        assert abs(c["rho"] - rho) <= half_expert + 0.01, (c["rho"], rho)
        assert c["engram_tables"] > 0
        checked += 1
    assert checked >= 40, (checked, refused)


def test_rho_one_is_identity_and_has_no_tables():
    for name in ("smoke", "cpu-small", "gpu-s", "gpu-m"):
        base = preset(name)
        assert allocate(base, 1.0) is base
        assert allocate(base, 1.0).param_counts()["engram_tables"] == 0
    for base, _ in _bases(10, seed=1):
        assert allocate(base, 1.0) == base


def test_lower_rho_means_more_rows_and_fewer_experts():
    for base, _ in _bases(15, seed=2):
        rows, experts = [], []
        for rho in DEFAULT_RHOS:
            try:
                cfg = allocate(base, rho)
            except ValueError:
                continue
            rows.append(sum(cfg.engram.rows().values()) * cfg.engram.d_head if cfg.engram else 0)
            experts.append(cfg.moe.n_routed)
        assert rows == sorted(rows) and experts == sorted(experts, reverse=True), (rows, experts)
        assert len(set(rows)) == len(rows)


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_every_budget_grid_is_feasible(name):
    b = BUDGETS[name]
    base = b.base()
    assert base.moe is not None and base.engram is None
    m = base.moe
    assert (m.n_routed - m.top_k) % 10 == 0, "whole experts at every 0.1 step of rho"
    ratio = base.param_counts()["p_tot"] / base.param_counts()["active"]
    assert 8 <= ratio <= 12, f"P_tot / P_act = {ratio:.1f}, the paper's budgets are ~10"
    for rho in b.rhos:
        cfg = allocate(base, rho, b.engram)
        assert abs(cfg.param_counts()["rho"] - rho) < 0.01
        assert cfg.moe.n_routed == n_routed_for(base, rho)


def test_table_sizes_are_prime_starts_and_rows_split_evenly():
    base = preset("gpu-s")
    cfg = allocate(base, 0.7)
    e = cfg.engram
    assert len(set(e.table_sizes)) == 1
    primes = e.primes()
    assert set(primes) == set(e.layer_ids)
    sizes = [p for per_layer in primes.values() for order in per_layer for p in order]
    assert len(sizes) == len(e.layer_ids) * e.n_heads
    assert max(sizes) / min(sizes) < 1.01  # every head ~ the same size


def test_explicit_engram_plan_is_used():
    base = preset("cpu-small")
    plan = EngramConfig(layer_ids=(2,), heads_per_ngram=1, d_head=4, table_sizes=(2, 2))
    cfg = allocate(base, 0.5, plan)
    assert cfg.engram.layer_ids == (2,) and cfg.engram.d_head == 4 and cfg.engram.heads_per_ngram == 1


def test_default_engram_placement_follows_the_paper():
    b12 = dataclasses.replace(preset("gpu-m"), n_layers=12)
    assert default_engram(b12).layer_ids == (1, 5)  # the paper's layers 2 and 6 of 12
    assert default_engram(preset("cpu-small")).layer_ids == (1,)


@pytest.mark.parametrize(
    "base, rho, engram, match",
    [
        ("smoke", 1.5, None, r"rho must be in \[0, 1\]"),
        ("smoke", -0.1, None, r"rho must be in \[0, 1\]"),
        ("smoke", float("nan"), None, r"rho must be in \[0, 1\]"),
        ("tiny-dense", 0.5, None, "needs a base with MoE"),
        ("tiny", 0.5, None, "already has Engram"),
        ("smoke", 0.99, None, "rounds to all"),
        # A wide memory on a small base: its projections grow the active parameters too much.
        ("smoke", 0.8, EngramConfig(layer_ids=(1,), d_head=64, table_sizes=(2, 2)),
         r"active parameters grow by .*%.*lower engram.d_head or heads"),
        # So wide that the freed experts cannot even pay for the projections.
        ("smoke", 0.9, EngramConfig(layer_ids=(0, 1), heads_per_ngram=8, d_head=64, table_sizes=(2, 2)),
         "table sizes too small"),
        ("smoke", 0.5, EngramConfig(layer_ids=(7,), table_sizes=(2, 2)), "outside"),
    ],
)
def test_impossible_requests_name_the_constraint(base, rho, engram, match):
    with pytest.raises(ValueError, match=match):
        allocate(PRESETS[base], rho, engram)


def test_budget_ladder_lists_every_budget():
    table = budget_ladder()
    for name in BUDGETS:
        assert f"| {name} |" in table


def test_paper_regime_ladder_shape():
    """The cpu-1e12 .. cpu-1e13 rungs: shaped like the paper's budgets and trained in its regime."""
    ladder = [b for n, b in BUDGETS.items() if n.startswith("cpu-1e") or n.startswith("cpu-3e")]
    assert len(ladder) >= 3
    compute = []
    for b in ladder:
        base = b.base()
        c = base.param_counts()
        assert 8 <= c["p_tot"] / c["active"] <= 12, b.name
        assert (base.moe.n_routed - base.moe.top_k) % 10 == 0, b.name
        assert b.tokens() >= 30 * c["active"], b.name
        assert b.corpus == "pysrc" and len(b.seeds) == 3 and min(b.rhos) <= 0.4 and 1.0 in b.rhos
        C = 6 * c["active"] * b.tokens()
        mantissa, exponent = b.name.removeprefix("cpu-").split("e")
        assert abs(math.log10(C) - math.log10(float(mantissa) * 10 ** int(exponent))) < 0.1, (b.name, C)
        compute.append(C)
        for rho in b.rhos:  # every point realised within the tolerance, on whole experts
            assert abs(allocate(base, rho).param_counts()["rho"] - rho) < 0.01
    assert max(compute) / min(compute) >= 10


def test_gpu_ladder_is_the_papers_regime_and_fits_an_80gb_gpu():
    """gpu-1e17 .. gpu-1e18: shaped like the paper's budgets (P_tot/P_act ~ 10, fine-grained
    top-6 experts, D = 100 P_act, named by C = 6 P_act D over a decade), the paper's Engram shape,
    a web corpus, and a memory plan that fits an 80 GB GPU at the sweep's fraction 0.9."""
    from engram_jax.allocation import WEB_CORPUS
    from engram_jax.config import TrainConfig
    from engram_jax.memory import memory_plan

    ladder = [b for n, b in BUDGETS.items() if re.fullmatch(r"gpu-\de\d+", n)]
    assert len(ladder) >= 3
    compute = []
    for b in ladder:
        base = b.base()
        c = base.param_counts()
        assert 8 <= c["p_tot"] / c["active"] <= 12 and base.moe.top_k == 6, b.name
        assert base.moe.d_expert * 2 == base.d_model and base.vocab_size == 32768, b.name
        assert 95 <= b.tokens() / c["active"] <= 105, b.name
        C = 6 * c["active"] * b.tokens()
        mantissa, exponent = b.name.removeprefix("gpu-").split("e")
        assert abs(math.log10(C) - math.log10(float(mantissa) * 10 ** int(exponent))) < 0.1, (b.name, C)
        compute.append(C)
        e = b.engram
        assert (e.max_ngram, e.heads_per_ngram) == (3, 8) and e.n_heads * e.d_head * 2 == base.d_model
        assert e.layer_ids[0] == 1 and b.corpus == WEB_CORPUS and len(b.seeds) == 3
        assert min(b.rhos) <= 0.3 and 1.0 in b.rhos
        tcfg = TrainConfig(**{**b.train_overrides(), "seed": 0})
        for rho in b.rhos:
            cfg = allocate(base, rho, b.engram)
            assert abs(cfg.param_counts()["rho"] - rho) < 0.01
            assert memory_plan(cfg, tcfg)["total"] <= 0.9 * 80e9, (b.name, rho)
    assert max(compute) / min(compute) >= 10


def test_gpu_planning_figures_are_the_measured_ones():
    """The GPU planning constants are the H200 measurements committed in results/bench."""
    import csv
    from pathlib import Path

    from engram_jax.allocation import H200_MFU, H200_PEAK_FLOPS

    rows = list(csv.DictReader(open(Path(__file__).parent.parent / "results/bench/nvidia-h200.csv")))
    peak = [float(r["value"]) for r in rows if r["name"] == "reference_peak_tflops"]
    mfu = [float(r["value"]) for r in rows if r["name"] == "mfu"]
    assert peak and H200_PEAK_FLOPS == pytest.approx(peak[0] * 1e12, rel=1e-3)
    assert mfu and H200_MFU == pytest.approx(min(mfu), abs=1e-3)
