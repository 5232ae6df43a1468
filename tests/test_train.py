"""Training end to end: the CLI on the built-in corpus and on an unseen directory, bit-identical
reruns, resume from a checkpoint, the NaN guard and bad-input errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engram_jax.config import TrainConfig, preset
from engram_jax.train import TrainingDiverged, run_trial

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "engram_jax.train", "--no-progress", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A corpus the suite has never seen: prose-like text files written here."""
    d = tmp_path_factory.mktemp("unseen")
    import random

    rnd = random.Random(0)
    words = ("memory lookup gate expert router token table hash prime layer residual sparse "
             "dense budget curve loss train model scale").split()
    for i in range(30):
        lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 14))) + "."
                 for _ in range(120)]
        (d / f"doc{i:02d}.txt").write_text("\n".join(lines))
    return d


def test_cli_trains_on_builtin_corpus(tmp_path):
    out = tmp_path / "run"
    cli("--preset", "tiny", "--steps", "150", "--out", str(out), "--set", "eval_every=50",
        "--set", "batch_size=16")
    rows = metrics(out)
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    assert vals[-1] < vals[0] - 1.5, vals
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "ok" and rec["corpus"] == "pystdlib"
    assert rec["params_total"] == preset("tiny").param_counts()["total"]
    assert rec["tokens_seen"] == 150 * 16 * 64 and rec["epochs"] > 0


@pytest.mark.slow
def test_cli_trains_on_unseen_text_directory(tmp_path, text_dir):
    out = tmp_path / "run"
    cli("--preset", "tiny", "--corpus", str(text_dir), "--steps", "80", "--out", str(out),
        "--set", "eval_every=40", "--set", "vocab_size=300")
    vals = [r["val_loss"] for r in metrics(out) if r.get("val_loss") is not None]
    assert vals[-1] < 0.6 * vals[0], vals


def _small(steps=24, **kw):
    return TrainConfig(steps=steps, batch_size=4, eval_every=8, eval_batches=2, log_every=4,
                       warmup_steps=4, **kw)


def test_bitwise_identical_reruns(tmp_path, text_dir):
    cfg = preset("tiny").with_overrides({"vocab_size": 300})
    a = run_trial(cfg, _small(), corpus=str(text_dir), out_dir=tmp_path / "a", progress=False)
    b = run_trial(cfg, _small(), corpus=str(text_dir), out_dir=tmp_path / "b", progress=False)
    strip = lambda rows: [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]  # noqa: E731
    assert strip(metrics(tmp_path / "a")) == strip(metrics(tmp_path / "b"))
    assert a["val_loss"] == b["val_loss"]


def test_resume_matches_uninterrupted_run(tmp_path, text_dir):
    cfg = preset("tiny").with_overrides({"vocab_size": 300})
    full = run_trial(cfg, _small(), corpus=str(text_dir), out_dir=tmp_path / "full", progress=False)

    class Stop(Exception):
        pass

    def stop_at_20(m):
        if m["step"] >= 20:
            raise Stop

    with pytest.raises(Stop):
        run_trial(cfg, _small(), corpus=str(text_dir), out_dir=tmp_path / "cut", report=stop_at_20,
                  progress=False)
    assert not (tmp_path / "cut" / "record.json").exists()
    resumed = run_trial(cfg, _small(), corpus=str(text_dir), out_dir=tmp_path / "cut", progress=False)
    assert resumed["val_loss"] == full["val_loss"]
    steps = [r["step"] for r in metrics(tmp_path / "cut")]
    assert steps == sorted(set(steps)), "metrics rows duplicated after resume"
    # A finished run is returned as is, not retrained.
    again = run_trial(cfg, _small(), corpus=str(text_dir), out_dir=tmp_path / "cut", progress=False)
    assert again["wall_s"] == resumed["wall_s"]


def test_other_config_in_same_dir_is_refused(tmp_path, text_dir):
    cfg = preset("tiny").with_overrides({"vocab_size": 300})
    run_trial(cfg, _small(8), corpus=str(text_dir), out_dir=tmp_path / "r", progress=False)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="different config"):
        run_trial(cfg, _small(9), corpus=str(text_dir), out_dir=tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_nan_guard_stops_with_clear_message(tmp_path, text_dir):
    cfg = preset("tiny").with_overrides({"vocab_size": 300})
    with pytest.raises(TrainingDiverged, match="diverged"):
        run_trial(cfg, _small(40, lr=1e12, grad_clip=0.0), corpus=str(text_dir),
                  out_dir=tmp_path / "nan", progress=False)


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "tiny", "--corpus", "/does/not/exist"], "not found"),
    (["--preset", "tiny", "--set", "moe.nonsense=3"], "unknown config key"),
    (["--preset", "tiny", "--set", "hc_mult=0"], "hc_mult"),
    (["--preset", "tiny", "--set", "lr=-1"], "lr must be > 0"),
])
def test_bad_input_fails_before_work(tmp_path, args, message):
    out = tmp_path / "never"
    r = cli(*args, "--out", str(out), check=False)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])  # the README's bad-input code
    assert message in r.stderr, r.stderr
    assert not out.exists()


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "o"
    r = cli("--preset", "tiny", "--corpus", str(empty), "--out", str(out), check=False)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "empty" in r.stderr.lower()
    assert not out.exists()


def test_out_dir_holding_another_run_is_refused(tmp_path, text_dir):
    out = tmp_path / "other"
    out.mkdir()
    other = json.dumps({"model": {"d_model": 1}, "train": {}, "corpus": "elsewhere"})
    (out / "config.json").write_text(other)
    r = cli("--preset", "tiny", "--corpus", str(text_dir), "--steps", "2", "--out", str(out),
            check=False)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "different config" in r.stderr, r.stderr
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == other
