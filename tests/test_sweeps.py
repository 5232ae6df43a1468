"""Grid validation, a real two-trial Ray Tune run on CPU, refusing to overwrite, and kill-and-resume.

The Ray runs use a tiny model (the smoke base at seq_len 32), 4 steps, one CPU per trial, one trial
at a time, on a small corpus of text files written to a temporary directory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.grid import GridError, load_grid

REPO = Path(__file__).resolve().parent.parent
GRIDS = sorted((REPO / "sweeps" / "grids").glob("*.yaml"))

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
train: {{eval_every: 2, eval_batches: 1, log_every: 1, warmup_steps: 1}}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~150 kB of pseudo-code: enough text for a 512-token BPE."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz_"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    for i in range(12):
        lines = ["    ".join(rng.choice(words) for _ in range(8)) for _ in range(150)]
        (d / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture
def ray_env(tmp_path_factory, monkeypatch):
    """Hermetic data cache for the trials (inherited by Ray workers)."""
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path_factory.getbasetemp() / "engram-cache"))
    yield
    import ray

    ray.shutdown()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# validation: every error before any trial, nothing under results/ touched


INVALID = {
    "unknown-key": ("budget: smoke\nlearning_rate: 0.1\n", r"unknown key\(s\) \['learning_rate'\]; allowed keys: name"),
    "rho-range": ("budget: smoke\nrho: [1.0, 1.5]\n", r"rho 1.5 is outside \[0, 1\]"),
    "infeasible": ("budget: smoke\nrho: [0.8]\nengram: {d_head: 64, heads_per_ngram: 4}\n",
                   r"infeasible allocation at rho=0.8: active parameters grow"),
    "rounding": ("budget: smoke\nrho: [0.99]\n", r"infeasible allocation at rho=0.99: .*rounds to all"),
    "unknown-budget": ("budget: huge\n", r"unknown budget 'huge'; known budgets: smoke"),
    "unknown-preset": ("base: nope\nrho: [1.0]\n", r"unknown base preset 'nope'"),
    "missing-corpus": ("budget: smoke\ncorpus: /nonexistent/corpus/dir\n", r"corpus: corpus '/nonexistent/corpus/dir' not found"),
    "malformed-yaml": ("budget: smoke\nrho: [1.0, 0.8\n", r"malformed YAML"),
    "bad-train-key": ("budget: smoke\ntrain: {lr: 0.1, lrr: 2}\n", r"unknown train key\(s\) \['lrr'\]"),
    "bad-resources": ("budget: smoke\nresources: {cpu: 1, npu: 1}\n", r"unknown resources key\(s\) \['npu'\]"),
    "gpu-and-tpu": ("budget: smoke\nresources: {cpu: 1, gpu: 1, tpu: 4}\n", r"not combined with gpu"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_grid_fails_before_any_trial_and_touches_nothing(case, tmp_path, capsys):
    from sweeps.run import main

    text, match = INVALID[case]
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\n" + text)
    with pytest.raises(GridError, match=match):
        load_grid(grid)
    results = tmp_path / "results"
    (results / "g").mkdir(parents=True)
    (results / "g" / "runs.csv").write_text("grid,trial_id,status\ng,rho1.00-s0,ok\n")
    (results / "keep.txt").write_text("untouched")
    before = _snapshot(results)
    assert main([str(grid), "--results", str(results)]) == 2
    assert "error:" in capsys.readouterr().err
    assert _snapshot(results) == before


def test_unusable_compile_cache_fails_before_any_trial_and_touches_nothing(tmp_path, capsys):
    from sweeps.run import main

    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\nbudget: smoke\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "keep.txt").write_text("untouched")
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("x")
    before = _snapshot(results)
    assert main([str(grid), "--results", str(results), "--compile-cache", str(not_a_dir)]) == 2
    err = capsys.readouterr().err
    assert "error: --compile-cache" in err and "not a directory" in err
    assert _snapshot(results) == before and not_a_dir.read_text() == "x"


def test_shipped_grids_load_with_stable_readable_ids():
    names = {p.stem for p in GRIDS}
    assert {"smoke", "cpu-small", "gpu-s", "gpu-m", "memory-smoke"} <= names
    for p in GRIDS:
        g = load_grid(p, check_corpus=False)
        assert g.name == p.stem and len(set(g.trial_ids)) == len(g.trials)
    smoke = load_grid(REPO / "sweeps" / "grids" / "smoke.yaml", check_corpus=False)
    assert smoke.trial_ids == [f"rho{r:.2f}-s0" for r in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)]
    mem = load_grid(REPO / "sweeps" / "grids" / "memory-smoke.yaml", check_corpus=False)
    slots = [t.model.param_counts()["engram_tables"] for t in mem.trials]
    assert slots == sorted(slots) and len(set(slots)) == len(slots)
    assert len({t.model.param_counts()["active"] for t in mem.trials}) == 1  # fixed backbone


def test_token_budget_and_train_sweeps_expand(tmp_path):
    g = tmp_path / "t.yaml"
    g.write_text("base: smoke\nrho: [0.8]\ntokens: 10000\nbatch_size: 4\nseeds: [0, 1]\n"
                 "sweep: {train.lr: [0.001, 0.003]}\n")
    grid = load_grid(g, check_corpus=False)
    assert grid.trial_ids == ["lr0.001-s0", "lr0.003-s0", "lr0.001-s1", "lr0.003-s1"]  # seed-major
    assert {t.train.steps for t in grid.trials} == {math.ceil(10000 / (4 * 64))}
    assert [t.train.lr for t in grid.trials] == [0.001, 0.003, 0.001, 0.003]
    assert all(t.model.moe.n_routed == 34 and t.meta["rho"] == 0.8 for t in grid.trials)


def test_local_ray_instance_binds_its_node_to_loopback_without_dashboard(monkeypatch, capsys):
    from sweeps.run import local_init_kwargs

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    kw = local_init_kwargs(2)
    assert kw["address"] == "local"  # never joins a cluster found in /tmp/ray
    assert kw["_node_ip_address"] == "127.0.0.1" and kw["include_dashboard"] is False
    assert kw["num_cpus"] == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    local_init_kwargs(None)
    assert "RAY_AUTH_MODE=disabled" in capsys.readouterr().err


def test_driver_validation_imports_neither_jax_nor_ray():
    code = (
        "import sys; from sweeps.grid import load_grid; import sweeps.run; "
        "g = load_grid('sweeps/grids/smoke.yaml'); "
        "assert 'jax' not in sys.modules and 'ray' not in sys.modules, "
        "[m for m in ('jax', 'ray') if m in sys.modules]"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# real Ray Tune runs


def test_micro_grid_runs_on_ray_and_refuses_to_overwrite(corpus, tmp_path, ray_env, capsys):
    from sweeps.run import main

    grid = tmp_path / "micro.yaml"
    grid.write_text(MICRO.format(corpus=corpus))
    results = tmp_path / "results"
    cache = tmp_path / "xla"
    rc = main([str(grid), "--results", str(results), "--max-concurrent", "1", "--num-cpus", "2",
               "--compile-cache", str(cache)])
    out = results / "micro"
    log = capsys.readouterr()
    assert rc == 0, log
    # The trials compiled through the cache given on the command line.
    assert any(p.name.startswith("jit_train_step") for p in cache.iterdir())
    assert "local Ray instance: node 127.0.0.1, no dashboard, token authentication on" in log.out
    rows = _rows(out / "runs.csv")
    assert [r["trial_id"] for r in rows] == ["rho1.00-s0", "rho0.60-s0"]
    assert all(r["status"] == "ok" and float(r["val_loss"]) > 0 for r in rows)
    assert rows[1]["n_routed"] == "26" and int(rows[1]["engram_slots"]) > 0
    for col in ("rho_actual", "config_hash", "params_active", "flops_per_token", "tokens_per_s",
                "epochs", "git_commit", "ray_version", "corpus_fingerprint", "host_cpu"):
        assert rows[0][col] != "", col
    for r in rows:
        curve = _rows(out / "curves" / f"{r['trial_id']}.csv")
        assert list(curve[0]) == ["step", "tokens", "train_loss", "val_loss", "lr"]
        assert curve[-1]["step"] == "4"
    readme = (out / "README.md").read_text()
    assert "sweeps.run" in readme and "ray 2." in readme and "device kind: cpu" in readme
    assert f"- host CPU: {rows[0]['host_cpu']}" in readme
    assert (out / ".gitignore").read_text().count("ray/") == 1
    # Everything a trial left lives in Tune's storage (default: <grid>/ray): the last checkpoint
    # of a finished trial holds its record; no trial wrote into the results directory.
    assert not (out / "trials").exists()
    for r in rows:
        (ckpt,) = (out / "ray" / "micro" / r["trial_id"]).glob("checkpoint_*")
        assert json.loads((ckpt / "record.json").read_text())["val_loss"] == float(r["val_loss"])
        # default tracking: TensorBoard event files beside them (tests/test_tracking.py reads them)
        assert list((out / "ray" / "micro" / r["trial_id"]).glob("events.out.tfevents.*"))
    assert "tracking: TensorBoard: tensorboard --logdir" in log.out

    before = _snapshot(out)
    assert main([str(grid), "--results", str(results)]) == 3
    assert "--force" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(corpus, tmp_path, ray_env):
    grid = tmp_path / "micro.yaml"
    grid.write_text(MICRO.format(corpus=corpus))
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "sweeps.run", str(grid), "--results", str(results),
           "--max-concurrent", "1", "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = results / "micro" / "runs.csv"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if runs.exists() and any(r["status"] == "ok" for r in _rows(runs)):
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # Ctrl-C while the second trial runs (or starts)
        log1, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rows = _rows(runs)
    by_id = {r["trial_id"]: r["status"] for r in rows}
    assert by_id["rho1.00-s0"] == "ok", log1
    first_row = rows[0]
    if by_id["rho0.60-s0"] != "ok":  # interrupted in time (not if trial 2 was already done)
        assert proc.returncode == 1, log1

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "(resuming: 1 finished, 1 to run)" in second.stdout
    print("--- interrupted run ---\n" + log1 + "\n--- resumed run ---\n" + second.stdout + second.stderr)
    rows = _rows(results / "micro" / "runs.csv")
    assert sorted(r["trial_id"] for r in rows) == ["rho0.60-s0", "rho1.00-s0"]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0] == first_row  # the finished trial was not trained again
    assert "[rho1.00-s0] step 1 " not in second.stdout
    for tid in ("rho1.00-s0", "rho0.60-s0"):
        assert (results / "micro" / "curves" / f"{tid}.csv").exists()
    # Both trials keep their TensorBoard event files across the continuation, the finished one's
    # from the first run; the resumed one's events of both runs lie in one directory.
    from tests.test_tracking import tensorboard_run

    for tid in ("rho1.00-s0", "rho0.60-s0"):
        scalars, _, _ = tensorboard_run(results / "micro" / "ray" / "micro" / tid)
        assert max(step for step, _ in scalars["ray/tune/train_loss"]) == 4, tid


@pytest.mark.slow
def test_hard_killed_grid_continues_on_a_fresh_checkout(corpus, tmp_path, ray_env):
    """SIGKILL the driver's whole process group once the first trial's row is in runs.csv, keep
    only what a commit holds (runs.csv, curves/, README.md, grid.json), rerun: only the missing
    trial trains and the finished row is written back unchanged."""
    grid = tmp_path / "micro.yaml"
    grid.write_text(MICRO.format(corpus=corpus))
    results = tmp_path / "results"
    out = results / "micro"
    cmd = [sys.executable, "-m", "sweeps.run", str(grid), "--results", str(results),
           "--max-concurrent", "1", "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "runs.csv").exists() and any(r["status"] == "ok" for r in _rows(out / "runs.csv")):
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: what is on disk is all there is
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rows = _rows(out / "runs.csv")
    done = {r["trial_id"]: r for r in rows if r["status"] == "ok"}
    assert "rho1.00-s0" in done, rows
    if len(done) == 2:
        pytest.fail("both trials finished before the kill; the test needs a slower second trial")
    first_curve = (out / "curves" / "rho1.00-s0.csv").read_bytes()
    import shutil

    for name in ("trials", "ray"):  # a fresh clone holds only the committed files (and storage)
        shutil.rmtree(out / name, ignore_errors=True)

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "(resuming: 1 finished, 1 to run)" in second.stdout
    after = {r["trial_id"]: r for r in _rows(out / "runs.csv")}
    assert after["rho1.00-s0"] == done["rho1.00-s0"]  # same config hash, same values, as written
    assert after["rho0.60-s0"]["status"] == "ok" and float(after["rho0.60-s0"]["val_loss"]) > 0
    assert "[rho1.00-s0] step 1 " not in second.stdout  # the finished trial did not train again
    assert (out / "curves" / "rho1.00-s0.csv").read_bytes() == first_curve
    assert (out / "curves" / "rho0.60-s0.csv").exists()
    # The README's summary shows the kept row's numbers too (it is read back as text).
    kept = float(done["rho1.00-s0"]["val_loss"])
    assert f"| rho1.00-s0 | 1.00 | 0 | {kept:.4f} |" in (out / "README.md").read_text()


@pytest.mark.parametrize("text", ["2.0e6", "2e6", "2000000", "2.0e+6"])
def test_token_budget_in_exponent_notation(tmp_path, text):
    g = tmp_path / "t.yaml"
    g.write_text(f"base: smoke\nrho: [1.0]\ntokens: {text}\nbatch_size: 4\n")
    grid = load_grid(g, check_corpus=False)
    assert grid.trials[0].train.steps == math.ceil(2e6 / (4 * 64))
    g.write_text("base: smoke\nrho: [1.0]\ntokens: lots\n")
    with pytest.raises(GridError, match="tokens must be a positive number, got 'lots'"):
        load_grid(g, check_corpus=False)


def test_a_grid_may_gain_trials_but_not_change_or_drop_finished_ones(tmp_path, corpus):
    """Continuing a run: new points or seeds are allowed; a changed or dropped trial is refused."""
    from sweeps.results import LEAD_COLUMNS, build_rows, to_csv
    from sweeps.run import _incompatible, main
    from sweeps.trainable import spec_to_config

    def grid_file(text):
        p = tmp_path / "micro.yaml"
        p.write_text(text)
        return p, load_grid(p)

    out = tmp_path / "results" / "micro"
    out.mkdir(parents=True)
    path, g = grid_file(MICRO.format(corpus=corpus))
    (out / "grid.json").write_text(json.dumps([spec_to_config(t) for t in g.trials]))
    rows = build_rows(g, {}, {}, "x")
    rows[0].update(status="ok", val_loss=1.0)  # rho1.00-s0 finished
    (out / "runs.csv").write_text(to_csv(rows, LEAD_COLUMNS))

    _, more = grid_file(MICRO.format(corpus=corpus).replace("seeds: [0]", "seeds: [0, 1]"))
    assert _incompatible(out, more, [spec_to_config(t) for t in more.trials]) == ""
    _, changed = grid_file(MICRO.format(corpus=corpus).replace("steps: 4", "steps: 5"))
    assert "changed" in _incompatible(out, changed, [spec_to_config(t) for t in changed.trials])
    path, dropped = grid_file(MICRO.format(corpus=corpus).replace("rho: [1.0, 0.6]", "rho: [0.6]"))
    why = _incompatible(out, dropped, [spec_to_config(t) for t in dropped.trials])
    assert "rho1.00-s0 no longer in the grid" in why
    before = _snapshot(out)
    assert main([str(path), "--results", str(tmp_path / "results")]) == 3
    assert _snapshot(out) == before


def test_corpus_environment_variables_expand_or_fail_naming_the_variable(tmp_path, monkeypatch, corpus):
    """The GPU ladder names its corpus as $ENGRAM_WEB_CORPUS: expanded when set; unset, the grid
    stops at load naming the variable (and loads as written when its corpus is not checked)."""
    g = tmp_path / "web.yaml"
    g.write_text("base: smoke\nrho: [1.0]\ncorpus: $ENGRAM_TEST_CORPUS/sub\n")
    monkeypatch.delenv("ENGRAM_TEST_CORPUS", raising=False)
    with pytest.raises(GridError, match="ENGRAM_TEST_CORPUS is not set"):
        load_grid(g)
    assert load_grid(g, check_corpus=False).corpus == "$ENGRAM_TEST_CORPUS/sub"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "sub").symlink_to(corpus)
    monkeypatch.setenv("ENGRAM_TEST_CORPUS", str(tmp_path / "c"))
    loaded = load_grid(g)
    assert loaded.corpus == f"{tmp_path}/c/sub" and loaded.trials[0].corpus == loaded.corpus
