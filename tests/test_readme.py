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
