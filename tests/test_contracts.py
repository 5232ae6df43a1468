"""The public names and call shapes of docs/design.md section 4 (Contracts); ``make contracts``.

Each test checks that a contract exists with its documented signature and return structure, the
way the README, the notebooks and the sweeps call it. Whether the values are right is for the
module's own tests (test_hashing, test_counting, test_allocation, test_model, test_fit).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
COUNT_KEYS = ("total", "p_tot", "active", "sparse", "routed_experts", "engram_tables", "embedding")


def test_ngram_hasher_shape():
    from engram_jax.hashing import NgramHasher

    h = NgramHasher(vocab_size=1000, table_sizes=[5003, 5003], max_ngram=3, heads_per_ngram=4,
                    layer_ids=[1, 3], pad_id=0, seed=0)
    ids_BxT = np.random.default_rng(0).integers(0, 1000, size=(2, 9))
    out = h(ids_BxT)
    assert set(out) == {1, 3}
    for layer in (1, 3):
        hashes_BxTxH = np.asarray(out[layer])
        assert hashes_BxTxH.shape == (2, 9, (3 - 1) * 4)
        assert hashes_BxTxH.dtype == np.int64
        # one list per order 2..max_ngram, each holding the heads' table sizes
        assert [len(p) for p in h.primes[layer]] == [4, 4]


def test_config_counts_and_presets():
    from engram_jax.config import PRESETS, ModelConfig, preset

    assert "tiny" in PRESETS and len(PRESETS) > 1, "tiny and the sweep bases"
    cfg = preset("tiny")
    assert isinstance(cfg, ModelConfig) and isinstance(cfg.vocab_size, int)
    counts = cfg.param_counts()
    missing = [k for k in COUNT_KEYS if k not in counts]
    assert not missing, f"param_counts() lacks {missing}"
    assert counts["routed_experts"] > 0 and counts["engram_tables"] > 0, \
        "tiny must have both routed experts and Engram tables"
    assert isinstance(cfg.flops_per_token(), float) and cfg.flops_per_token() > 0


def test_model_logits_and_live_count():
    import jax
    from flax import nnx

    from engram_jax.config import preset
    from engram_jax.model import HybridLM, logits

    cfg = preset("tiny")
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    logits_BxTxV = np.asarray(logits(model, np.zeros((1, 8), dtype=np.int64)))
    assert logits_BxTxV.shape == (1, 8, cfg.vocab_size)
    live = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert live == cfg.param_counts()["total"]


def test_allocate_rho_one_is_pure_moe():
    from engram_jax.allocation import allocate
    from engram_jax.config import PRESETS

    accepted = []
    for name, base in PRESETS.items():
        if name == "tiny":
            continue
        try:
            cfg = allocate(base, 1.0)
        except ValueError as e:  # a base the solver refuses must say which constraint
            assert str(e), name
            continue
        assert cfg.param_counts()["engram_tables"] == 0, f"{name}: rho = 1 must have no tables"
        accepted.append(name)
    assert accepted, "no sweep base accepts rho = 1"


def test_allocate_refuses_impossible_rho():
    from engram_jax.allocation import allocate
    from engram_jax.config import preset

    with pytest.raises(ValueError, match="rho"):
        allocate(preset("cpu-small"), 1.5)


def test_analysis_fitters_return_their_keys():
    from analysis.fit import fit_power_law, fit_u_curve

    df = pd.DataFrame({"rho": np.repeat([0.4, 0.6, 0.8, 1.0], 2),
                       "val_loss": [3.1, 3.1, 3.0, 3.0, 2.98, 2.98, 3.01, 3.01]})
    f = fit_u_curve(df, x="rho", y="val_loss", n_boot=20)
    assert {"rho_star", "ci_low", "ci_high", "l_star", "is_u_shaped"} <= set(f)
    p = fit_power_law(np.array([1e5, 1e6, 1e7, 1e8]), np.array([3.0, 2.9, 2.85, 2.83]), n_boot=0)
    assert {"E", "A", "alpha"} <= set(p)


def test_train_cli_arguments():
    out = subprocess.run([sys.executable, "-m", "engram_jax.train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--preset", "--corpus", "--steps", "--out", "--set"):
        assert flag in out.stdout, f"python -m engram_jax.train lacks {flag}"


def test_make_sweep_target():
    makefile = (ROOT / "Makefile").read_text()
    assert "GRID    ?= sweeps/grids/smoke.yaml" in makefile
    assert "-m sweeps.run $(GRID) --results $(RESULTS)" in makefile
    assert (ROOT / "sweeps" / "grids" / "smoke.yaml").is_file(), "the default GRID"
