"""bench/prepare.py and bench/bpe_sample.py: their parts on tiny inputs, and (slow) the whole
preparation benchmark at a few megabytes."""

from __future__ import annotations

import argparse
import csv
import os
import re

import pytest

from bench import bpe_sample
from bench import prepare as bench_prepare


def _corpus(root, n=12):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        words = " ".join(f"w{(i * 7 + j) % 97}x{j % 13}" for j in range(300))
        (root / f"f{i:02d}.txt").write_text(f"file {i}\n{words}\n")
    return root


def test_tree_rss_counts_this_process():
    assert bench_prepare._tree_rss(os.getpid()) > 10 * 2**20


def test_build_corpus_copies_up_to_the_size(tmp_path):
    src = _corpus(tmp_path / "src")
    total = bench_prepare.build_corpus(tmp_path / "big", 60_000 / 1e9, str(src))
    assert total >= 60_000
    copies = sorted(p.name for p in (tmp_path / "big").iterdir())
    assert copies[0] == "copy000" and len(copies) >= 2


def test_write_replaces_rows_of_the_same_measurement(tmp_path):
    args = argparse.Namespace(gigabytes=0.1, source="pysrc", vocab=2048, workers=[1, 2])
    row = bench_prepare._row("prepare", 100.0, 2, 2048, 10.0,
                             {"n_train_tokens": 900, "n_val_tokens": 100}, 2**28)
    assert row["tokens_per_s"] == 100 and row["mb_per_s"] == 10.0 and row["peak_rss_mb"] == 256
    bench_prepare.write([row], tmp_path, args)
    bench_prepare.write([{**row, "seconds": 5.0}, {**row, "workers": 1}], tmp_path, args)
    rows = list(csv.DictReader((tmp_path / "prepare.csv").open()))
    assert [(r["workers"], r["seconds"]) for r in rows] == [("2", "5.0"), ("1", "10.0")]
    assert "| prepare | 100.0 | 2 |" in (tmp_path / "README.md").read_text()


def test_bpe_sample_bench_on_a_tiny_corpus(tmp_path):
    src = _corpus(tmp_path / "src", 30)
    rows = bpe_sample.measure(str(src), 280, [0.5, 1.0, 4.0], rule_chars=8000)
    assert [r["multiplier"] for r in rows] == [0.5, 1.0, 4.0]
    assert rows[0]["sample_chars"] < rows[1]["sample_chars"] < rows[2]["sample_chars"]
    assert rows[1]["tokens_vs_1x"] == 1.0 and all(r["val_tokens"] > 0 for r in rows)
    bpe_sample.write(rows, tmp_path / "out")
    assert len(list(csv.DictReader((tmp_path / "out" / "bpe_sample.csv").open()))) == 3


@pytest.mark.slow
def test_prepare_bench_end_to_end(tmp_path):
    src = _corpus(tmp_path / "src", 40)
    assert bench_prepare.main(["--gigabytes", "0.0004", "--unit-mb", "0.05", "--source", str(src),
                               "--vocab", "300", "--out", str(tmp_path / "out")]) == 0
    rows = {(r["measurement"], r["workers"]): r
            for r in csv.DictReader((tmp_path / "out" / "prepare.csv").open())}
    assert {m for m, _ in rows} >= {"prepare", "ceiling", "memory-quarter", "resume", "noop",
                                    "trial-startup", "trial-startup-pystdlib"}
    assert re.search(r"2-process speedup \d+\.\d\dx", rows[("ceiling", "2")]["note"])
    assert float(rows[("prepare", "2")]["peak_rss_mb"]) > 0
    assert re.fullmatch(r"scan [\d.]+ s, BPE [\d.]+ s, tokenize [\d.]+ s",
                        rows[("prepare", "2")]["note"])
    assert "second run on the finished entry" == rows[("noop", "2")]["note"]


def test_build_corpus_copies_are_all_read_by_the_path_corpus(tmp_path, monkeypatch):
    """A source whose files sit in folders a path corpus skips (pysrc's keys site-packages/...)
    is copied under renamed folders, so every copied byte is part of the measured corpus."""
    import types

    import engram_jax.data as data
    from engram_jax.data import resolve_corpus

    src = _corpus(tmp_path / "src")
    files = [types.SimpleNamespace(key=f"site-packages/pkg/{p.name}", path=p, size=p.stat().st_size,
                                   kind="text") for p in sorted(src.iterdir())]
    monkeypatch.setattr(data, "resolve_corpus", lambda spec: types.SimpleNamespace(files=files))
    total = bench_prepare.build_corpus(tmp_path / "big", 30_000 / 1e9, "pysrc")
    monkeypatch.undo()
    copied = [p for p in (tmp_path / "big").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in copied) == total >= 30_000
    assert not any("site-packages" in p.parts for p in copied)
    assert sum(f.size for f in resolve_corpus(str(tmp_path / "big")).files) == total


def test_ceiling_only_merges_one_row(tmp_path):
    src = _corpus(tmp_path / "src", 30)
    out = tmp_path / "out"
    assert bench_prepare.main(["--only", "ceiling", "--gigabytes", "0.0004", "--source", str(src),
                               "--vocab", "300", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "prepare.csv").open()))
    assert [r["measurement"] for r in rows] == ["ceiling"]
    assert re.search(r"2-process speedup \d+\.\d\dx", rows[0]["note"])
