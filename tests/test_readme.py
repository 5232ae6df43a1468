"""The README's results tables are generated from the committed results and checked against them."""

from pathlib import Path

from analysis import readme

REPO = Path(__file__).resolve().parent.parent


def test_readme_tables_match_the_committed_results():
    """Fails when a committed result or the code that summarises it changed without
    `python -m analysis readme` (make readme) being run."""
    assert readme.main(["--readme", str(REPO / "README.md"), "--results", str(REPO / "results"),
                        "--check"]) == 0


def test_check_fails_on_a_changed_number_and_tolerates_a_last_digit(tmp_path):
    text = (REPO / "README.md").read_text()
    body = readme.render(text, REPO / "results")
    assert readme.same(body, body)
    assert readme.same("loss 2.7775 [0.162, 0.806]", "loss 2.7776 [0.163, 0.806]")
    assert not readme.same("loss 2.7775", "loss 2.7795")
    assert not readme.same("| 1.0 | 42 |", "| 1.0 | 41 |")
    assert not readme.same("rho* = 0.80", "no interior optimum")
    changed = body.replace("| 0.9 | 38 | 97,396 | 2.5815", "| 0.9 | 38 | 97,396 | 2.5915")
    assert changed != body
    readme_path = tmp_path / "README.md"
    readme_path.write_text(changed)
    assert readme.main(["--readme", str(readme_path), "--results", str(REPO / "results"),
                        "--check"]) == 1


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
    monkeypatch.setattr(readme, "LADDER", ["b"])
    monkeypatch.setattr(readme, "_grid", lambda results, name: grids.get(name))
    text = readme.block_lr(None)
    assert "| b | 0.01 | 3.0000 | 2.5000 | 3.5000 ± 0.7071 (2) |" in text
    assert "| b | 0.02 | 2.0000 (best) | 2.4000 (best) | 2.2000 ± 0.2000 (3) |" in text
    grids.pop("lr-b-seeds")
    assert "| b | 0.01 | 3.0000 | 2.5000 | - |" in readme.block_lr(None)
