"""The README's results tables are generated from the committed results and checked against them."""

from pathlib import Path

import numpy as np
import pytest

from analysis import load, readme

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rendered() -> tuple[str, str]:
    """The README as committed and as rendered afresh from results/ (one render for the module:
    the ladder's fits take about a minute on the slowest machine)."""
    text = (REPO / "README.md").read_text()
    with np.errstate(all="ignore"):
        return text, readme.render(text, REPO / "results")


def test_readme_tables_match_the_committed_results(rendered):
    """Fails when a committed result or the code that summarises it changed without
    `python -m analysis readme` (make readme) being run."""
    text, new = rendered
    assert readme.stale_blocks(text, new) == []


def test_check_fails_on_a_changed_number_and_tolerates_a_last_digit(rendered, tmp_path):
    text, body = rendered
    assert readme.same(body, body)
    assert readme.same("loss 2.7775 [0.162, 0.806]", "loss 2.7776 [0.163, 0.806]")
    assert not readme.same("loss 2.7775", "loss 2.7795")
    assert not readme.same("| 1.0 | 42 |", "| 1.0 | 41 |")
    assert not readme.same("rho* = 0.80", "no interior optimum")
    changed = body.replace("| 0.9 | 38 | 97,396 | 2.5815", "| 0.9 | 38 | 97,396 | 2.5915")
    assert changed != body
    assert readme.stale_blocks(changed, body) == ["cpu-small"]


def test_check_command_exits_1_on_a_stale_block_and_0_when_current(tmp_path, capsys):
    """`python -m analysis readme --check` end to end, on a README holding only the (cheap)
    learning-rate block."""
    from analysis.__main__ import main as cli

    body = readme.BLOCKS["lr"](REPO / "results")
    good = tmp_path / "README.md"
    good.write_text(f"# x\n<!-- generated:lr -->\n{body}\n<!-- end:lr -->\n")
    assert cli(["readme", "--readme", str(good), "--results", str(REPO / "results"), "--check"]) == 0
    stale = tmp_path / "STALE.md"
    stale.write_text(good.read_text().replace("3.0092 (best)", "3.0192 (best)"))
    assert cli(["readme", "--readme", str(stale), "--results", str(REPO / "results"), "--check"]) == 1
    assert "out of date in block(s) lr" in capsys.readouterr().err
    assert cli(["readme", "--readme", str(stale), "--results", str(REPO / "results")]) == 0
    assert stale.read_text() == good.read_text()


_real_load_runs = load.load_runs
PERTURBED_BLOCKS = ("cpu-small", "memory", "overencoding", "ablations", "lr")


def _perturbed_runs(path, *args, **kwargs):
    """A grid's runs with every loss moved by a few parts in 1e10 (the rounding a mean or a
    loss carries from another CPU's arithmetic), deterministically per row."""
    d = _real_load_runs(path, *args, **kwargs)
    sign = np.where(np.arange(len(d)) % 2, 1.0, -1.0)
    return d.assign(val_loss=d["val_loss"] * (1 + 3e-10 * sign))


def test_check_passes_on_fits_perturbed_as_another_machine_would(rendered, monkeypatch):
    """Another CPU's BLAS and optimizer rounding, simulated: losses nudged by parts in 1e10 and
    every power-law optimisation (main fits, bootstrap replicates, retries) started 0.1% away
    from where it starts here. The regenerated README must still pass the check. (The
    U-curve fits have no optimizer start: they are exact least squares and enumerations.)"""
    import analysis.powerlaw as powerlaw

    real_minimize = powerlaw.minimize

    def nudged(fun, x0, *args, **kwargs):
        return real_minimize(fun, np.asarray(x0, float) * (1 + 1e-3), *args, **kwargs)

    from analysis import paper

    fits = []
    real_fit = paper.fit_power_law

    def recorded(x, y, **kwargs):
        fits.append(((np.asarray(x, float), np.asarray(y, float)), kwargs, real_fit(x, y, **kwargs)))
        return fits[-1][2]

    monkeypatch.setattr(paper, "fit_power_law", recorded)
    monkeypatch.setattr(powerlaw, "minimize", nudged)
    monkeypatch.setattr(load, "load_runs", _perturbed_runs)
    # The blocks whose numbers come from iterative fits or from the (perturbed) losses alone;
    # the ladder's blocks add exact least squares over the same losses and a minute of CPU.
    text = "\n".join(m.group(0) for m in readme._BLOCK.finditer(rendered[0])
                     if m.group("name") in PERTURBED_BLOCKS)
    assert len(readme.stale_blocks(text, text)) == 0 and text.count("<!-- end:") == len(PERTURBED_BLOCKS)
    with np.errstate(all="ignore"):
        new = readme.render(text, REPO / "results")
    assert readme.stale_blocks(text, new) == []

    # The perturbation is as strong as a real change of machine: it moves a bootstrap interval
    # of the Engram-vs-OverEncoding fits by more than the 0.001 the three-decimal table printed
    # before (the table another CPU failed to reproduce, 0.463 there against 0.471).
    monkeypatch.setattr(powerlaw, "minimize", real_minimize)
    moved = 0.0
    for (x, y), kwargs, f in fits:
        ref = real_fit(x, y / (1 + 3e-10 * np.where(np.arange(len(y)) % 2, 1.0, -1.0)), **kwargs)
        moved = max(moved, *(abs(a - b) for k in ("E_ci", "alpha_ci") for a, b in zip(f[k], ref[k])))
    assert moved > 0.002, moved


@pytest.mark.slow
def test_check_fails_when_a_committed_result_changes(rendered, monkeypatch):
    """One seed of one table size of the Engram memory grid 0.02 nats worse (a real change of a
    committed result): the block that summarises it no longer passes."""
    def changed(path, *args, **kwargs):
        d = _real_load_runs(path, *args, **kwargs)
        if Path(path).parent.name == "memory-engram-cpu-1e12":
            d = d.copy()
            d.loc[d.index[0], "val_loss"] += 0.02
        return d

    monkeypatch.setattr(load, "load_runs", changed)
    text, _ = rendered
    with np.errstate(all="ignore"):
        new = readme.render(text, REPO / "results")
    assert "overencoding" in readme.stale_blocks(text, new)


def test_lr_block_pools_the_seeds_of_a_rate_across_grids(monkeypatch):
    """The seeds column of the learning-rate table: rho = 1.0 rows of the rate sweep, its extra
    seeds and the allocation grid, one row per (rate, seed), a mean only from two seeds up."""
    import pandas as pd

    from analysis import readme

    def rows(*r):
        return pd.DataFrame(r, columns=["lr", "seed", "rho", "val_loss", "status"])

    grids = {
        "lr-b": rows((0.01, 0, 1.0, 3.0, "ok"), (0.02, 0, 1.0, 2.0, "ok")),
        "lr-b-rho0.7": rows((0.01, 0, 0.7, 2.5, "ok"), (0.02, 0, 0.7, 2.4, "ok")),
        "lr-b-seeds": rows((0.01, 1, 1.0, 4.0, "ok"), (0.01, 2, 1.0, 9.0, "failed")),
        # the allocation grid at the chosen rate: seed 0 repeats lr-b's trial (not counted twice)
        "b": rows((0.02, 0, 1.0, 2.0, "ok"), (0.02, 1, 1.0, 2.2, "ok"), (0.02, 2, 1.0, 2.4, "ok"),
                  (0.02, 0, 0.8, 1.0, "ok")),
    }
    monkeypatch.setattr(readme, "LR_CHECKS", [("b", "b", "lr-b", "lr-b-rho0.7"),
                                              ("only low", None, None, "lr-c-rho0.3")])
    monkeypatch.setattr(readme, "_grid", lambda results, name: grids.get(name))
    text = readme.block_lr(None)
    assert "| b | 0.01 | 3.0000 | 2.5000 (0.7) | 3.5000 ± 0.7071 (2) |" in text
    assert "| b | 0.02 | 2.0000 (best) | 2.4000 (0.7) (best) | 2.2000 ± 0.2000 (3) |" in text
    assert "only low" not in text  # no grid of it has finished
    grids["lr-c-rho0.3"] = rows((0.01, 0, 0.3, 1.5, "ok"), (0.02, 0, 0.3, 1.7, "ok"))
    grids.pop("lr-b-seeds")
    text = readme.block_lr(None)
    assert "| b | 0.01 | 3.0000 | 2.5000 (0.7) | - |" in text
    assert "| only low | 0.01 | - | 1.5000 (0.3) (best) | - |" in text
