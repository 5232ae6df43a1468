"""The storage side of a sweep without Ray running: checkpoints packed with a manifest, incomplete
ones recognised, and the checkpoints of unfinished trials carried from one run to the next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeps.storage import Storage
from sweeps.trainable import MANIFEST, pack_checkpoint, unpack_checkpoint


def _trial_dir(root: Path, step: int, finished: bool = False) -> Path:
    """An out_dir as run_trial leaves it: config, metrics, an orbax step dir, host tables."""
    d = root / "out"
    (d / "ckpt" / str(step) / "state").mkdir(parents=True)
    (d / "ckpt" / str(step) / "state" / "data").write_bytes(b"x" * 1000)
    (d / "ckpt" / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
    (d / "host_tables").mkdir()
    (d / "host_tables" / f"{step}.npz").write_bytes(b"t" * 10)
    (d / "config.json").write_text('{"a": 1}')
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    if finished:
        (d / "record.json").write_text('{"status": "ok"}')
    return d


def test_pack_then_unpack_restores_every_file_and_detects_a_short_one(tmp_path):
    from ray import tune

    src = _trial_dir(tmp_path, 4)
    dst = tmp_path / "ckpt"
    dst.mkdir()
    pack_checkpoint(src, dst, 4)
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["step"] == 4
    assert set(manifest["files"]) == {"config.json", "metrics.jsonl", "ckpt/4/state/data",
                                      "ckpt/4/_CHECKPOINT_METADATA", "host_tables/4.npz"}
    out = tmp_path / "restored"
    assert unpack_checkpoint(tune.Checkpoint(str(dst)), out)["step"] == 4
    assert (out / "ckpt" / "4" / "state" / "data").read_bytes() == b"x" * 1000

    (dst / "ckpt" / "4" / "state" / "data").write_bytes(b"x" * 10)  # cut short while persisted
    with pytest.raises(RuntimeError, match="incomplete.*ckpt/4/state/data"):
        unpack_checkpoint(tune.Checkpoint(str(dst)), tmp_path / "again")


def _persist(storage_dir: Path, exp: str, tid: str, index: int, src: Path, step) -> Path:
    d = storage_dir / exp / tid / f"checkpoint_{index:06d}"
    d.mkdir(parents=True)
    pack_checkpoint(src, d, step)
    return d


def test_prepare_run_carries_the_newest_complete_checkpoint_of_unfinished_trials(tmp_path):
    root = tmp_path / "storage"
    src = _trial_dir(tmp_path, 2)
    _persist(root, "g", "a", 0, src, 2)
    newest = _persist(root, "g", "a", 1, src, 2)
    (newest / "metrics.jsonl").unlink()  # the newest one of trial a was cut short
    _persist(root, "g", "b", 3, src, 2)  # trial b finished in runs.csv: not pending
    (root / "g" / "c").mkdir()  # trial c never reached a checkpoint
    st = Storage(root)

    resume = st.prepare_run("g", ["a", "c"])
    assert resume == {"a": f"{root}/g.resume/a"}
    assert json.loads((root / "g.resume" / "a" / MANIFEST).read_text())["step"] == 2
    assert not (root / "g").exists()  # the previous experiment is gone

    # the next run (trial a interrupted again before its first checkpoint) keeps the carried one
    (root / "g" / "a").mkdir(parents=True)
    assert st.prepare_run("g", ["a"]) == resume
    # once a trial is no longer pending its carried checkpoint is dropped
    assert st.prepare_run("g", ["c"]) == {}
    assert not (root / "g.resume" / "a").exists()


@pytest.mark.parametrize("uri", [False, True])
def test_prepare_run_keeps_the_tensorboard_event_files_of_every_trial(tmp_path, uri):
    """A continued grid is a fresh Tune experiment: the previous one goes, all but its trials'
    event files, which the next run's files join (one TensorBoard run per trial)."""
    root = tmp_path / "storage"
    src = _trial_dir(tmp_path, 2)
    _persist(root, "g", "a", 0, src, 2)  # unfinished, with events
    (root / "g" / "a" / "events.out.tfevents.1.host").write_bytes(b"ev-a")
    (root / "g" / "a" / "result.json").write_text("{}")
    (root / "g" / "b").mkdir(parents=True)  # finished in runs.csv: its events stay too
    (root / "g" / "b" / "events.out.tfevents.2.host").write_bytes(b"ev-b")
    (root / "g" / "c").mkdir()  # no events: gone
    (root / "g" / "experiment_state-x.json").write_text("{}")
    st = Storage(root.as_uri() if uri else root)

    resume = st.prepare_run("g", ["a"])
    assert set(resume) == {"a"}
    left = sorted(str(p.relative_to(root / "g")) for p in (root / "g").rglob("*"))
    assert left == ["a", "a/events.out.tfevents.1.host", "b", "b/events.out.tfevents.2.host"]
    assert st.latest_checkpoint("g", "a") is None  # nothing of Tune's experiment is left
    st.delete("g")  # --force: everything goes
    assert not (root / "g").exists() and not (root / "g.resume").exists()


def test_storage_takes_paths_and_uris(tmp_path):
    local = Storage(tmp_path / "s")
    assert local.local and local.uri == str(tmp_path / "s")
    uri = Storage(f"file://{tmp_path}/s/")
    assert uri.local and uri.path == f"{tmp_path}/s" and uri.uri == f"file://{tmp_path}/s"
    assert uri._uri("g.resume/a") == f"file://{tmp_path}/s/g.resume/a"


def test_a_diverged_trial_becomes_an_error_row_without_a_retry(tmp_path):
    """The trainable reports TrainingDiverged as its last result instead of raising (a restart
    would diverge again); the driver's writer turns it into an error row."""
    from types import SimpleNamespace

    from sweeps.grid import load_grid
    from sweeps.progress import RowWriter

    g = tmp_path / "g.yaml"
    g.write_text("name: g\nbase: smoke\nrho: [1.0]\n")
    grid = load_grid(g, check_corpus=False)
    writer = RowWriter(grid, tmp_path / "g", {}, "2.x")
    trial = SimpleNamespace(config={"trial": {"trial_id": "rho1.00-s0"}},
                            last_result={"done_record": 0, "error": "TrainingDiverged: loss is nan"})
    writer.on_trial_complete(0, [], trial)
    import csv

    (row,) = list(csv.DictReader((tmp_path / "g" / "runs.csv").open()))
    assert row["status"] == "error" and row["error"] == "TrainingDiverged: loss is nan"
