"""The ladder's answers on synthetic grids with a known optimum and known gains."""

import numpy as np
import pandas as pd
import pytest

from analysis import load, synthetic
from analysis.ladder import PAPER_GAINS, ladder_report, main, report_markdown


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    return load.load_runs(synthetic.write_rho_grid(root, "fake", budgets=("small", "medium", "large"),
                                                   rho_star=0.78))


def test_ladder_report_recovers_the_truth(runs):
    rep = ladder_report(runs, n_boot=150)
    per = rep["per_budget"]
    assert list(per["budget"]) == ["small", "medium", "large"]  # by compute
    assert (per["C"].diff().dropna() > 0).all()
    # C = 6 P_act D of the synthetic budgets
    want = {b: 6 * p * t for b, (p, t, _) in synthetic.BUDGETS.items()}
    assert np.allclose(per.set_index("budget")["C"], [want[b] for b in per["budget"]])
    for r in per.itertuples():
        assert r.is_u_shaped and r.ci_low <= 0.78 <= r.ci_high, r
        assert r.gain_lo <= r.gain <= r.gain_hi and r.gain > 0
        assert r.rel_gain == pytest.approx(r.gain / r.L1)
        assert r.rel_gain_lo <= r.rel_gain <= r.rel_gain_hi
        assert r.n_rho == 7 and r.n_seeds == 3
        # loss = L_b + 0.3 (rho - 0.78)^2 at rho 0.4, 0.5, 0.6: least-squares slope
        # 2 * 0.3 * (0.5 - 0.78) = -0.168 exactly (a parabola's secant slopes are linear in rho).
        assert r.tail_lo <= -0.168 <= r.tail_hi and r.tail_slope == pytest.approx(-0.168, abs=0.025)  # 3 se
        assert r.tail_hi - r.tail_lo < 0.05
    # The synthetic loss falls with compute: negative exponents with intervals around them.
    for key in ("L1", "L_best"):
        lo, hi = rep["laws"][key]["b_ci"]
        assert lo <= rep["laws"][key]["b"] <= hi < 0
    ovc = rep["optimum_vs_compute"]
    assert ovc["ok"] and ovc["b_ci"][0] <= 0 <= ovc["b_ci"][1]  # the true optimum does not move
    ext = rep["extrapolation"]
    assert list(ext["C"]) == list(PAPER_GAINS) and (ext["lo"] <= ext["gain"]).all()
    assert (ext["gain"] <= ext["hi"]).all() and (ext["decades"] > 3).all()
    span = np.log10(per["C"].max() / per["C"].min())
    assert np.allclose(ext["fit_decades"], span) and rep["law_decades"] == pytest.approx(span)
    text = report_markdown(rep)
    assert "| small |" in text and "rho* against compute" in text and "6e+20" in text
    assert "tail slope dL/drho at rho <= 0.6" in text
    # estimates with an interval are printed at the precision the interval supports
    from analysis.report import est

    small = rep["per_budget"].set_index("budget").loc["small"]
    assert f"| {est(small.tail_slope, small.tail_lo, small.tail_hi, sign=True)} |" in text
    assert est(-0.1683, -0.19, -0.15, sign=True) == "-0.168 [-0.190, -0.150]"


def test_a_budgets_intervals_do_not_depend_on_the_other_budgets(runs):
    """Each budget bootstraps with its own generator: dropping a budget, or a seed of another
    budget, leaves the intervals of the rest exactly as they were."""
    cols = ["gain_lo", "gain_hi", "tail_lo", "tail_hi"]
    full = ladder_report(runs, n_boot=60)["per_budget"].set_index("budget")[cols]
    fewer = runs[(runs["budget"] != "large")
                 & ~((runs["budget"] == "medium") & (runs["seed"] == 2))]
    part = ladder_report(fewer, n_boot=60)["per_budget"].set_index("budget")[cols]
    assert list(part.index) == ["small", "medium"]
    assert part.loc["small"].equals(full.loc["small"])
    assert not part.loc["medium"].equals(full.loc["medium"])  # its own seeds did change


def test_two_budgets_fit_no_law(runs):
    """Through two budgets any power law fits exactly: nothing is fitted or extrapolated, and the
    report says why, while each budget's own answers stay."""
    from analysis.ladder import MIN_LAW_BUDGETS

    assert MIN_LAW_BUDGETS == 3
    rep = ladder_report(runs[runs["budget"] != "large"], n_boot=40)
    assert list(rep["per_budget"]["budget"]) == ["small", "medium"]
    assert all(np.isnan(law["b"]) and len(law["boot"]) == 0 for law in rep["laws"].values())
    assert rep["extrapolation"]["gain"].isna().all()
    assert rep["gain_trend"] == "2 budgets: no law fitted (it needs 3)"
    text = report_markdown(rep)
    assert "Laws in C: not fitted. 2 budgets" in text and "extrapolated gain" not in text
    assert "| small |" in text and "%]" in text  # the relative gain keeps its interval


def test_tiny_extrapolated_gains_are_not_printed_as_zero():
    from analysis.ladder import _small
    assert _small(3.6e-6) == "3.6e-06" and _small(0.0139) == "0.0139" and _small(0.0) == "0.0000"


def test_flat_budget_answers_no_interior_optimum(tmp_path):
    grid = synthetic.write_rho_grid(tmp_path, "flat", budgets=("small",), shape="flat")
    rep = ladder_report(load.load_runs(grid), n_boot=100)
    r = rep["per_budget"].iloc[0]
    assert not r["is_u_shaped"] and np.isnan(r["rho_star"])
    assert "no interior optimum" in report_markdown(rep)


def test_running_budget_is_not_fitted_yet(runs):
    """A budget whose grid has finished two rho values is not yet an answer: its row says "not
    fitted yet", never "no interior optimum"; the finished budgets keep their answers."""
    large = runs[(runs["budget"] == "large") & (runs["seed"] == 0)]
    part = large[large["rho"].isin(sorted(large["rho"].unique())[-2:])]
    rep = ladder_report(pd.concat([runs[runs["budget"] != "large"], part]), n_boot=40)
    text = report_markdown(rep)
    (row,) = [line for line in text.splitlines() if line.startswith("| large |")]
    assert "not fitted yet (needs >= 3 distinct rho values" in row
    assert "no interior optimum" not in row and "(one seed: no interval)" in row
    import matplotlib

    matplotlib.use("Agg")
    from analysis.ladder import plot_ladder

    fig = plot_ladder(pd.concat([runs[runs["budget"] != "large"], part]), rep)
    labels = fig.axes[2].get_legend_handles_labels()[1]
    assert "ladder, one seed" in labels and "ladder [95%]" in labels
    assert any("not fitted" in t.get_text() for t in fig.axes[1].texts)


def test_cli_writes_the_figure(runs, tmp_path, capsys):
    grid = synthetic.write_rho_grid(tmp_path, "fake", budgets=("small", "medium"))
    assert main([str(grid), "--out", str(tmp_path / "fig"), "--n-boot", "50"]) == 0
    assert (tmp_path / "fig" / "ladder.png").exists()
    assert "| medium |" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
