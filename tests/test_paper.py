"""analysis.paper on synthetic grids with known answers: Engram against OverEncoding, the
ablation table, Muon beside AdamW, and that none of those grids leaks into a budget's curve."""

import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

matplotlib.use("Agg")

from analysis import load, paper, plots, synthetic  # noqa: E402
from analysis.readme import render  # noqa: E402

P_ACT, TOKENS, _ = synthetic.BUDGETS["small"]


def _grid(root, name, cells, *, key="rho", oe=False):
    """Writes ``root/name/runs.csv``: cells are (value, seed, loss, table params) with the value
    stored as the swept key's value (rho for key == "rho")."""
    rng = np.random.default_rng(0)
    rows = []
    for value, seed, loss, tables in cells:
        rho = float(value) if key == "rho" else 0.8
        r = synthetic._row(name, f"{value}-s{seed}", rho, seed, "small", P_ACT, TOKENS, 0, loss,
                           key, str(value), rng)
        r["params_engram_tables"] = 0 if oe else tables
        r["params_overencoding_tables"] = tables if oe else 0
        rows.append(r)
    gdir = root / name
    gdir.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(gdir / "runs.csv", index=False)
    return gdir


def test_welch_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(2.01, 0.004, 3), rng.normal(2.0, 0.009, 3)
    w = paper.welch(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert w["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-15)
    assert (w["lo"], w["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)  # equal n: the mean of the variances
    assert w["sd"] == pytest.approx(pooled, rel=1e-12)
    assert np.isnan(paper.welch(a[:1], b)["lo"])  # one seed: no interval, not a fake one


def _memory_results(tmp_path, noise=0.002):
    rng = np.random.default_rng(1)
    sizes = [3.2e4, 1.28e5, 5.12e5, 2.05e6]
    law = {"e": (2.5, 40.0, 0.35), "o": (2.6, 20.0, 0.30)}
    cells = {k: [(int(x), s, E + A * x**-a + rng.normal(0, noise), x * (1.003 if k == "o" else 1))
                 for x in sizes for s in (0, 1)] for k, (E, A, a) in law.items()}
    _grid(tmp_path, "memory-engram-small", cells["e"], key="engram.table_sizes")
    _grid(tmp_path, "memory-overencoding-small", cells["o"], key="overencoding.modulus", oe=True)
    _grid(tmp_path, "small", [(r, s, 3.0 + rng.normal(0, noise), 0) for r in (1.0, 0.8)
                              for s in (0, 1, 2)])
    return law, sizes


def test_memory_comparison_recovers_both_laws(tmp_path):
    law, sizes = _memory_results(tmp_path)
    cmp = paper.memory_comparison(tmp_path, "small", n_boot=200)
    for name, key in (("Engram", "e"), ("OverEncoding", "o")):
        f = cmp["arms"][name]["fit"]
        assert f["ok"] and f["n_points"] == 8
        E, A, alpha = law[key]
        # Each arm's runs are its own: the fitted curve passes through the true one at every size.
        assert np.allclose([paper.power_law(x, f["E"], f["A"], f["alpha"]) for x in sizes],
                           [E + A * x**-alpha for x in sizes], atol=0.004)
    t = cmp["table"]
    assert len(t) == 4 and (t["engram_n"] == 2).all() and (t["oe_n"] == 2).all()
    assert np.allclose(t["x_engram"], sizes) and np.allclose(t["x_overencoding"], np.array(sizes) * 1.003)
    truth = [(2.5 + 40 * x**-0.35) - (2.6 + 20 * x**-0.30) for x in sizes]
    assert np.allclose(t["diff"], truth, atol=0.006)  # OverEncoding ahead at the smallest size only
    assert (t["diff_lo"] <= t["diff"]).all() and (t["diff"] <= t["diff_hi"]).all()
    # The memory-free backbone: rho = 1 of the budget's grid, only the arms' seeds (0, 1).
    assert sorted(cmp["baseline"]["seed"]) == [0, 1] and (cmp["baseline"]["rho"] == 1.0).all()
    md = paper.memory_markdown(cmp)
    assert md.count("\n| ") >= 4 + 2 and "OverEncoding" in md and "seeds 0, 1" in md
    assert paper.memory_comparison(tmp_path, "other") is None
    assert paper.memory_markdown(None) == "Not run yet."


def test_memory_figure_and_per_grid_figures(tmp_path):
    _memory_results(tmp_path)
    written = plots.make_all(tmp_path, tmp_path / "fig", n_boot=30)
    names = {p.name for p in written}
    assert "memory-engram-vs-overencoding-small.png" in names
    # The OverEncoding arm is a memory grid over its own table parameters, not an allocation curve.
    oe = load.load_runs(tmp_path / "memory-overencoding-small")
    assert load.is_memory_grid(oe) and load.memory_column(oe) == "params_overencoding_tables"
    assert "memory-overencoding-small_memory_scaling.png" in names
    assert not any("allocation_pooled" in n for n in names)


def _ablation_results(tmp_path, noise=0.003):
    rng = np.random.default_rng(2)

    def arm(value, mean, n=3):
        return [(value, s, mean + rng.normal(0, noise), 1e5) for s in range(n)]

    _grid(tmp_path, "ablation-small-gate", arm(True, 2.00) + arm(False, 2.06),
          key="engram.gate")
    _grid(tmp_path, "ablation-small-conv", arm(False, 2.0005), key="engram.conv")
    _grid(tmp_path, "ablation-small-layers01", arm(0.8, 1.97))
    _grid(tmp_path, "ablation-small-hc4-gate", arm(True, 1.90) + arm(False, 1.99),
          key="engram.gate_per_branch")


def test_ablation_table_in_the_papers_form(tmp_path):
    _ablation_results(tmp_path)
    t = paper.ablation_table(tmp_path, "small").set_index("change")
    assert len(t) == 4  # the missing grids (compress, layer0, 4gram) are skipped, not invented
    gate = t.loc["no context-aware gate"]
    assert gate["n"] == 3 and gate["ref_n"] == 3 and gate["reference"] == "reference"
    assert gate["diff"] == pytest.approx(0.06, abs=0.01) and gate["verdict"] == "worse"
    assert gate["diff_sd"] == pytest.approx(gate["diff"] / np.sqrt(
        (gate["loss_sd"] ** 2 + gate["ref_sd"] ** 2) / 2), rel=1e-9)
    assert t.loc["no short convolution", "verdict"] == "within noise"
    assert t.loc["Engram at layers 0 and 1 (tables split)", "verdict"] == "better"
    hc = t.loc["per-branch gates -> one shared gate (hc_mult = 4)"]
    # Measured against its own 4-branch reference (1.90), not the 1-branch one (2.00).
    assert hc["reference"] == "hc4" and hc["ref_loss"] == pytest.approx(1.90, abs=0.005)
    assert hc["diff"] == pytest.approx(0.09, abs=0.01)
    md = paper.ablation_markdown(paper.ablation_table(tmp_path, "small"))
    assert md.count("\n| ") == 4 and "largest" in md  # a row per ablation below the header
    assert paper.ablation_markdown(paper.ablation_table(tmp_path, "nothing")) == "Not run yet."


def test_ablation_grids_get_a_figure_of_their_arms(tmp_path):
    """An ablation is one switch at a fixed rho: its figure shows the arms, never an allocation
    curve; a grid without a rho (the multi-branch model's) plots too."""
    _ablation_results(tmp_path)
    hc4 = tmp_path / "ablation-small-hc4-gate" / "runs.csv"
    pd.read_csv(hc4).assign(rho=np.nan).to_csv(hc4, index=False)
    names = {p.name for p in plots.make_all(tmp_path, tmp_path / "fig", n_boot=20)}
    for g in ("gate", "conv", "layers01", "hc4-gate"):
        assert f"ablation-small-{g}_arms.png" in names, g
    assert not any("allocation" in n for n in names)


def test_optimizer_comparison_and_no_leak_into_the_budget_curve(tmp_path):
    synthetic.write_rho_grid(tmp_path, "small", shape="monotone", curves=False)
    muon = synthetic.write_rho_grid(tmp_path, "muon-small", rho_star=0.7, curvature=0.5,
                                    curves=False)
    t = paper.optimizer_comparison(tmp_path, "small", n_boot=100).set_index("optimizer")
    assert not t.loc["AdamW", "is_u_shaped"]
    assert t.loc["Muon", "is_u_shaped"] and t.loc["Muon", "ci_low"] <= 0.7 <= t.loc["Muon", "ci_high"]
    assert t.loc["Muon", "trials"] == 21
    md = paper.optimizer_markdown(t.reset_index())
    assert "| Muon | muon-small | 21 |" in md and "no interior optimum" in md
    # muon-small shares the budget column with small but is another curve: never pooled into it.
    assert load.is_variant_grid("muon-small") and load.is_variant_grid("ablation-small-conv")
    assert load.is_variant_grid("cand-small-pe") and load.is_variant_grid("diag-a-small-base")
    assert not load.is_variant_grid("small") and not load.is_variant_grid("small-seeds")
    assert load.is_variant_grid("small-dropless") and not load.is_variant_grid("dropless-small")
    assert load.load_runs(muon)["budget"].iloc[0] == "small"
    written = {p.name for p in plots.make_all(tmp_path, tmp_path / "fig", n_boot=20)}
    assert "muon-small_allocation.png" in written and "small_allocation.png" in written
    assert not any("pooled" in n for n in written)
    synthetic.write_rho_grid(tmp_path, "small-seeds", shape="monotone", curves=False, seed=5)
    written = {p.name for p in plots.make_all(tmp_path, tmp_path / "fig2", n_boot=20)}
    assert "small_allocation_pooled.png" in written


def test_readme_blocks_say_not_run_yet_without_grids(tmp_path):
    text = "\n".join(f"<!-- generated:{b} -->\nold\n<!-- end:{b} -->"
                     for b in ("overencoding", "ablations", "optimizer"))
    out = render(text, tmp_path)
    assert out.count("Not run yet.") == 3 and "old" not in out
