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
