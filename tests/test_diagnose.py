"""The mechanism diagnostics (analysis.diagnose) on synthetic grids with known answers."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import diagnose

REQUIRED = {"trial_id": "t", "status": "ok", "budget": "cpu-3e12", "corpus": "pywheels-v1"}


def _write(root: Path, grid: str, rows: list[dict]) -> None:
    d = pd.DataFrame([{**REQUIRED, "grid": grid, **r} for r in rows])
    d["trial_id"] = [f"r{i}" for i in range(len(d))]
    (root / grid).mkdir(parents=True)
    d.to_csv(root / grid / "runs.csv", index=False)


def test_nats_per_decade_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    slots = np.repeat([6e3, 2.4e4, 9.6e4, 3.84e5], 3)
    loss = 2.5 - 0.05 * np.log10(slots) + rng.normal(0, 0.003, slots.size)
    m = diagnose.nats_per_decade(slots, loss)
    assert m["lo"] < 0.05 < m["hi"] and m["value"] == pytest.approx(0.05, abs=0.006)
    assert m["sizes"] == 4 and m["n"] == 12 and m["decades"] == pytest.approx(np.log10(64))
    # the interval is the t interval of an ordinary least-squares slope
    r = stats.linregress(np.log10(slots), loss)
    assert m["hi"] - m["lo"] == pytest.approx(2 * stats.t.ppf(0.975, 10) * r.stderr)
    assert np.isnan(diagnose.nats_per_decade([1e3, 1e3], [2.0, 2.1])["value"])


def test_diagnostics_read_back_from_grids(tmp_path):
    """(a) L(0.3) - L(0.8) per arm, reference first; (b) the cost of removed experts and what the
    reference's tables buy back at the rho that keeps as many; the mechanism ratios."""
    seeds = [0, 1, 2]
    noise = np.array([-0.002, 0.0, 0.002])
    # reference arm: rho 0.8 (34 experts) at 2.40, rho 0.3 (14 experts) at 2.38
    _write(tmp_path, "diag-a-cpu-3e12-base",
           [{"rho": 0.8, "seed": s, "n_routed": 34, "val_loss": 2.40 + e} for s, e in zip(seeds, noise)]
           + [{"rho": 0.3, "seed": s, "n_routed": 14, "val_loss": 2.38 + e} for s, e in zip(seeds, noise)])
    # an arm whose low-rho end is worse: a left arm
    _write(tmp_path, "diag-a-cpu-3e12-lr3e-3",
           [{"rho": 0.8, "seed": s, "val_loss": 2.50 + e} for s, e in zip(seeds, noise)]
           + [{"rho": 0.3, "seed": s, "val_loss": 2.53 + e} for s, e in zip(seeds, noise)])
    a = diagnose.left_arm(tmp_path)
    assert list(a["arm"]) == ["base", "lr3e-3"]
    assert a["diff"].to_numpy() == pytest.approx([-0.02, 0.03])
    assert a["diff_vs_base"].to_numpy() == pytest.approx([0.0, 0.05])
    assert (a["lo"] < a["diff"]).all() and (a["diff"] < a["hi"]).all()
    text = diagnose.left_arm_markdown(a)
    assert "peak learning rate 3e-3" in text and "| +0.0300 [+0.0255, +0.0345] |" in text

    _write(tmp_path, "diag-b-cpu-3e12-experts",
           [{"rho": 1.0, "seed": s, "n_routed": n, "val_loss": v + e}
            for n, v in ((42, 2.45), (34, 2.47), (14, 2.55)) for s, e in zip(seeds, noise)])
    b = diagnose.expert_cost(tmp_path).set_index("n_routed")
    assert list(b.index) == [42, 34, 14]
    assert b.loc[34, "cost"] == pytest.approx(0.02) and b.loc[14, "cost"] == pytest.approx(0.10)
    assert b.loc[34, "rho"] == 0.8 and b.loc[34, "buys"] == pytest.approx(0.07)
    assert b.loc[14, "buys"] == pytest.approx(0.17) and np.isnan(b.loc[42, "rho"])
    assert "| 14 |" in diagnose.expert_cost_markdown(diagnose.expert_cost(tmp_path))
    # the dropless reruns pair with each other, never with the capacity grids
    assert diagnose.expert_cost(tmp_path, dispatch="dropless").empty
    _write(tmp_path, "diag-a-cpu-3e12-dropless",
           [{"rho": r, "seed": s, "n_routed": n, "val_loss": v + e}
            for r, n, v in ((0.8, 34, 2.39), (0.3, 14, 2.41)) for s, e in zip(seeds, noise)])
    _write(tmp_path, "diag-b-cpu-3e12-experts-dropless",
           [{"rho": 1.0, "seed": s, "n_routed": n, "val_loss": v + e}
            for n, v in ((42, 2.40), (34, 2.43), (14, 2.60)) for s, e in zip(seeds, noise)])
    bd = diagnose.expert_cost(tmp_path, dispatch="dropless").set_index("n_routed")
    assert bd.loc[34, "cost"] == pytest.approx(0.03) and bd.loc[14, "cost"] == pytest.approx(0.20)
    assert bd.loc[34, "buys"] == pytest.approx(0.04) and bd.loc[14, "buys"] == pytest.approx(0.19)
    assert diagnose.expert_cost(tmp_path).loc[2, "buys"] == pytest.approx(0.17)  # unchanged
    dl = diagnose.left_arm(tmp_path).set_index("arm").loc["dropless"]
    assert dl["diff"] == pytest.approx(0.02) and "no routed assignment dropped" in dl["label"]

    _write(tmp_path, "diag-c-cpu-3e12-memory",
           [{"rho": 1.0, "seed": s, "n_routed": 42, "engram_slots": x,
             "val_loss": 2.45 - 0.03 * np.log10(x / 1e3) + e}
            for x in (6e3, 2.4e4, 9.6e4, 3.84e5) for s, e in zip(seeds, noise)])
    t = diagnose.mechanism_table(tmp_path).set_index("regime")
    mine = t.loc["cpu-3e12 shape on pywheels-v1 (diagnostics)"]
    assert mine["npd"] == pytest.approx(0.03) and mine["npd_ratio"] == pytest.approx(0.03 / 0.028)
    # the pure MoE (42 experts, diagnostic b) is rho = 1.0; the best rho is 0.3
    assert mine["best_rho"] == 0.3 and mine["gain"] == pytest.approx(0.07 / 2.45)
    # without drops: its own pure MoE (42 experts, 2.40) against its own allocation runs
    dropless = t.loc["cpu-3e12 shape on pywheels-v1, dropless (diagnostics)"]
    assert dropless["best_rho"] == 0.8 and dropless["gain"] == pytest.approx(0.01 / 2.40)
    assert np.isnan(dropless["npd"])
    paper = t.loc[t.index.str.startswith("paper")].iloc[0]
    assert paper["gain"] == pytest.approx(0.0139 / 1.7248) and paper["npd_ratio"] == 1.0
    assert "1.1x" in diagnose.mechanism_markdown(diagnose.mechanism_table(tmp_path))


def test_regime_shape_reads_the_configs_back():
    """The mechanism table's shape column comes from the runs' own config JSON: vocabulary,
    layers x width, the Engram's heads per order and d_mem, tokens per active parameter."""
    import json

    import pandas as pd

    from engram_jax.allocation import BUDGETS, allocate
    from engram_jax.config import preset

    b = BUDGETS["cpu2k-5e12"]
    base, hybrid = preset("cpu2k-5e12"), allocate(preset("cpu2k-5e12"), 0.6, b.engram)
    runs = pd.DataFrame([
        {"rho": 1.0, "config_json": json.dumps(base.to_dict()), "tokens_seen": b.tokens(),
         "params_active": base.param_counts()["active"]},
        {"rho": 0.6, "config_json": json.dumps(hybrid.to_dict()), "tokens_seen": b.tokens(),
         "params_active": hybrid.param_counts()["active"]},
    ])
    assert diagnose.regime_shape(runs) == (
        "V 2048, 4 x 32, Engram 8 heads/order, d_mem 16 = d/2, 100 tokens/P_act")
    assert diagnose.regime_shape(runs.drop(columns="config_json")) == "-"
