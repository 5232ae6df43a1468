"""The paper-fidelity grid files (OverEncoding vs Engram, ablations, Muon) load and mean what they
say: each differs from its reference in the one switch it names."""

import dataclasses
from pathlib import Path

import pytest

from engram_jax.allocation import allocate
from engram_jax.config import preset
from sweeps.grid import load_grid

GRIDS = Path(__file__).resolve().parents[1] / "sweeps" / "grids"
REFERENCE = allocate(preset("cpu-1e12"), 0.8)
NAMES = ["memory-engram-cpu-1e12", "memory-overencoding-cpu-1e12", "ablation-cpu-1e12-gate",
         "ablation-cpu-1e12-conv", "ablation-cpu-1e12-compress", "ablation-cpu-1e12-layer0",
         "ablation-cpu-1e12-layers01", "ablation-cpu-1e12-4gram", "muon-cpu-1e12",
         "lr-muon-cpu-1e12"]


def _load(name):
    return load_grid(GRIDS / f"{name}.yaml", check_corpus=False)


@pytest.mark.parametrize("name", NAMES)
def test_grid_loads_with_the_budgets_training(name):
    g = _load(name)
    base = load_grid(GRIDS / "cpu-1e12.yaml", check_corpus=False).trials[0].train
    for t in g.trials:
        # the budget's training settings, apart from the optimizer switches
        assert dataclasses.replace(t.train, seed=0, optimizer="adamw", muon_lr_mult=1.0) == base
        assert t.corpus == "pysrc"


def test_memory_arms_match_in_table_parameters():
    e, o = _load("memory-engram-cpu-1e12"), _load("memory-overencoding-cpu-1e12")
    assert len(e.trials) == len(o.trials) == 8
    sizes = []
    for te, to in zip(e.trials, o.trials, strict=True):
        ce, co = te.model.param_counts(), to.model.param_counts()
        assert te.model.overencoding is None and to.model.engram is None
        assert te.model.moe == to.model.moe == preset("cpu-1e12").moe  # the same backbone
        assert abs(ce["engram_tables"] / co["overencoding_tables"] - 1) < 0.02
        sizes.append(ce["engram_tables"])
    assert max(sizes) / min(sizes) > 10**1.5


def test_ablations_change_one_thing():
    gate = _load("ablation-cpu-1e12-gate")
    ref = [t for t in gate.trials if t.meta["sweep_value"] == "True"]
    assert len(ref) == 3 and all(t.model == REFERENCE for t in ref)
    e = REFERENCE.engram
    for name, check in {
        "ablation-cpu-1e12-gate": lambda c: c.engram == e or c.engram == dataclasses.replace(e, gate=False),
        "ablation-cpu-1e12-conv": lambda c: c.engram == dataclasses.replace(e, conv=False),
        "ablation-cpu-1e12-compress": lambda c: c.engram == dataclasses.replace(e, compress=False),
        "ablation-cpu-1e12-layer0": lambda c: c.engram.layer_ids == (0,),
        "ablation-cpu-1e12-layers01": lambda c: c.engram.layer_ids == (0, 1),
        "ablation-cpu-1e12-4gram": lambda c: c.engram.max_ngram == 4,
    }.items():
        g = _load(name)
        assert {t.train.seed for t in g.trials} == {0, 1, 2}, name
        for t in g.trials:
            c = t.model
            assert check(c), name
            assert c.moe == REFERENCE.moe, name
            # the table budget is the reference's (the prime rounding aside)
            ratio = c.param_counts()["engram_tables"] / REFERENCE.param_counts()["engram_tables"]
            assert abs(ratio - 1) < 0.01, (name, ratio)


def test_muon_grid_is_the_allocation_grid_with_muon():
    adamw, muon = _load("cpu-1e12"), _load("muon-cpu-1e12")
    assert [t.model for t in adamw.trials] == [t.model for t in muon.trials]
    assert all(t.train.optimizer == "muon" for t in muon.trials)
    assert [dataclasses.replace(t.train, optimizer="adamw") for t in muon.trials] == [
        t.train for t in adamw.trials]
