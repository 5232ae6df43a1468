"""The grid loader's corpus check always runs (sweeps/grid.py ``_check_corpus``)."""

import sys

import pytest

from sweeps.grid import GridError, load_grid


def _grid(tmp_path, corpus):
    p = tmp_path / "g.yaml"
    p.write_text(f"budget: smoke\ncorpus: {corpus}\n")
    return p


def test_missing_corpus_is_refused(tmp_path):
    with pytest.raises(GridError, match="corpus: corpus .*not found"):
        load_grid(_grid(tmp_path, tmp_path / "nope"))


def test_corpus_check_does_not_skip_on_import_error(tmp_path, monkeypatch):
    """If the input pipeline cannot be imported the check fails loudly instead of passing."""
    monkeypatch.setitem(sys.modules, "engram_jax.data", None)  # makes the import raise
    with pytest.raises(ImportError):
        load_grid(_grid(tmp_path, tmp_path / "nope"))


MICRO = """\
name: micro
base: smoke
model: {{seq_len: 32}}
rho: [1.0, 0.6]
seeds: [0]
steps: 4
batch_size: 4
corpus: {corpus}
resources: {{cpu: 1, gpu: 0}}
"""


def test_continuing_a_grid_on_another_corpus_is_refused(tmp_path, capsys):
    """A grid whose finished rows were trained on a corpus with another fingerprint is not
    continued: exit 2 before any work, naming both fingerprints; the same fingerprint continues."""
    import json

    from engram_jax.data import resolve_corpus
    from sweeps.results import LEAD_COLUMNS, build_rows, to_csv
    from sweeps.run import corpus_changed, main
    from sweeps.trainable import spec_to_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"document {i}\n" * 20)
    now = resolve_corpus(str(corpus)).fingerprint
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO.format(corpus=corpus))
    grid = load_grid(path)
    out = tmp_path / "results" / "micro"
    out.mkdir(parents=True)
    (out / "grid.json").write_text(json.dumps([spec_to_config(t) for t in grid.trials]))

    def write_rows(fingerprint):
        rows = build_rows(grid, {}, {}, "x")
        rows[0].update(status="ok", val_loss=1.0, corpus_fingerprint=fingerprint)
        (out / "runs.csv").write_text(to_csv(rows, LEAD_COLUMNS))

    write_rows(now)
    assert corpus_changed(out, grid) == ""
    write_rows("86a1d98c" + "0" * 56)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([str(path), "--results", str(tmp_path / "results"), "--tracking", "none"]) == 2
    err = capsys.readouterr().err
    assert f"fingerprint 86a1d98c{'0' * 56}" in err and f"resolves to fingerprint {now}" in err
    assert "'pysrc' depends on the installed packages" in err and "'pywheels-v1' does not" in err
    assert "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
