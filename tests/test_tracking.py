"""Experiment tracking (``--tracking``): the settings checked before any work, and a real micro
grid on Ray Tune tracked by TensorBoard, MLflow and W&B (offline) at once, each read back with
its own reader: TensorBoard's event accumulator, an MlflowClient on the local file store, and
W&B's own record format (protobuf records in LevelDB-log blocks)."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps import tracking
from sweeps.grid import load_grid
from tests.test_sweeps import MICRO, _snapshot, corpus, ray_env  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent


def test_parse_and_params():
    assert tracking.parse(None) == ("tensorboard",)
    assert tracking.parse("none") == () and tracking.parse("") == ()
    assert tracking.parse("MLflow, tensorboard,mlflow") == ("mlflow", "tensorboard")
    with pytest.raises(tracking.TrackingError, match="expected none or one or more of"):
        tracking.parse("neptune")
    grid = load_grid(REPO / "sweeps" / "grids" / "smoke.yaml", check_corpus=False)
    t = grid.trials[1]
    p = tracking.params(t)
    assert p["trial_id"] == t.trial_id and p["rho"] == 0.9 and p["seed"] == 0
    assert p["budget"] == "smoke" and p["config_hash"] == t.model.hash()
    assert p["batch_size"] == t.train.batch_size and "sweep_key" not in p  # no empty values
    result = {"step": 3, "train_loss": 4.5, "val_loss": float("nan"), "lr": 1e-3, "done": False,
              "training_iteration": 3, "time_total_s": 1.0, "record_json": "{}", "error": "x",
              "done_record": 1, "config": {"trial": {}}, "pid": 7}
    assert tracking.trial_metrics(result) == {"step": 3, "train_loss": 4.5, "lr": 1e-3}


def test_missing_package_or_unconfigured_wandb_fails_before_any_work(tmp_path, monkeypatch,
                                                                      capsys):
    from sweeps.run import main

    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\nbudget: smoke\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "keep.txt").write_text("untouched")
    before = _snapshot(results)

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else object())
    assert main([str(grid), "--results", str(results), "--tracking", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "error: --tracking wandb needs the wandb package, which is not installed" in err
    monkeypatch.undo()

    for k in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no stored key
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    assert main([str(grid), "--results", str(results), "--tracking", "tensorboard,wandb"]) == 2
    err = capsys.readouterr().err
    assert "error: --tracking wandb: W&B is not configured: set WANDB_API_KEY" in err
    assert "WANDB_MODE=offline" in err
    assert main([str(grid), "--results", str(results), "--tracking", "comet"]) == 2
    assert "expected none or one or more of tensorboard, mlflow, wandb" in capsys.readouterr().err
    assert _snapshot(results) == before
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracking.check(("wandb",))  # offline needs no key


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_sweep_passes_tracking_on(tmp_path):
    def sweep(*args):
        r = subprocess.run(["make", "-n", "sweep", f"VENV={tmp_path / 'venv'}", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return next(ln for ln in r.stdout.splitlines() if "-m sweeps.run" in ln)

    assert "--tracking" not in sweep()  # sweeps.run's default: tensorboard
    assert sweep("TRACKING=mlflow").endswith("--tracking mlflow")
    assert sweep("TRACKING=tensorboard,wandb").endswith("--tracking tensorboard,wandb")


# ---------------------------------------------------------------------------------------------
# readers


def tensorboard_run(run_dir: Path):
    """TensorBoard's own reader over a trial's event files: (scalars, hparams, end status)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    hparams, status = {}, None
    for tag, content in ea.PluginTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                hparams[k] = getattr(v, v.WhichOneof("kind"))
        if data.HasField("session_end_info"):
            status = data.session_end_info.status
    return scalars, hparams, status


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``): W&B's protobuf ``Record``s, in the
    LevelDB log layout it writes them in (a 7-byte ``:W&B`` header, 32 KiB blocks, each record
    chunk behind a 7-byte crc/length/type header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            out.append(payload)
        elif kind == 2:  # first
            buf = payload
        elif kind == 3:  # middle
            buf += payload
        elif kind == 4:  # last
            out.append(buf + payload)
    return [pb.Record.FromString(p) for p in out]


def wandb_run(run_dir: Path):
    """(run record, config, {step: {key: value}}) of an offline W&B run directory."""
    (path,) = run_dir.glob("run-*.wandb")
    run, config, history = None, {}, {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = history.setdefault(r.history.step.num, {})
            row.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                        for i in r.history.item})
    return run, config, history


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Same steps, values equal to float32 precision."""
    return ([s for s, _ in got] == [s for s, _ in want]
            and [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6))


def _curve(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# a real grid


TRACKED = MICRO.replace("rho: [1.0, 0.6]", "rho: [0.6]")


@pytest.mark.slow
def test_micro_grid_tracked_by_tensorboard_mlflow_and_wandb(corpus, tmp_path, ray_env,  # noqa: F811
                                                           monkeypatch, capsys):
    from sweeps.run import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    grid = tmp_path / "micro.yaml"
    grid.write_text(TRACKED.format(corpus=corpus))
    results = tmp_path / "results"
    rc = main([str(grid), "--results", str(results), "--num-cpus", "2",
               "--tracking", "tensorboard,mlflow,wandb"])
    log = capsys.readouterr()
    assert rc == 0, log
    out = results / "micro"
    tid = "rho0.60-s0"
    (row,) = list(csv.DictReader((out / "runs.csv").open()))
    curve = _curve(out / "curves" / f"{tid}.csv")
    train = [(int(r["step"]), float(r["train_loss"])) for r in curve if r["train_loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in curve
           if r["val_loss"] and r["step"] != "0"]
    assert [s for s, _ in train] == [1, 2, 3, 4] and [s for s, _ in val] == [2, 4]
    assert f"tracking: TensorBoard: tensorboard --logdir {out / 'ray'}/micro" in log.out

    # TensorBoard: the trial's event files under the storage, one run per trial
    scalars, hparams, status = tensorboard_run(out / "ray" / "micro" / tid)
    tb_train = scalars["ray/tune/train_loss"]
    assert [s for s, _ in tb_train] == [1, 2, 3, 4, 4]  # the final record repeats the last step
    assert _same(tb_train[:4], train) and _same(scalars["ray/tune/val_loss"][:2], val)
    assert scalars["ray/tune/best_val_loss"][-1][1] == pytest.approx(float(row["best_val_loss"]))
    assert {"ray/tune/lr", "ray/tune/tokens_per_s", "ray/tune/grad_norm"} <= set(scalars)
    assert not any("training_iteration" in t or "time_" in t for t in scalars)
    assert hparams["trial_id"] == tid and hparams["rho"] == 0.6 and hparams["seed"] == 0
    assert hparams["config_hash"] == row["config_hash"] and "budget" not in hparams  # no budget
    assert hparams["batch_size"] == 4 and hparams["corpus"] == str(corpus)
    from tensorboard.plugins.hparams import api_pb2

    assert status == api_pb2.STATUS_SUCCESS

    # MLflow: the local file store under the grid's directory
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlflow").as_uri())
    exp = client.get_experiment_by_name("micro")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == tid and run.info.status == "FINISHED"
    assert run.data.tags["trial_id"] == tid and run.data.tags["config_hash"] == row["config_hash"]
    p = run.data.params
    assert (p["rho"], p["seed"], p["steps"]) == ("0.6", "0", "4")
    assert p["config_hash"] == row["config_hash"]
    hist = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert _same(sorted(hist)[:4], train)
    assert _same(sorted((m.step, m.value) for m in client.get_metric_history(
        run.info.run_id, "val_loss"))[:2], val)
    assert run.data.metrics["val_loss"] == pytest.approx(float(row["val_loss"]))
    assert "training_iteration" not in run.data.metrics and "done_record" not in run.data.metrics

    # W&B (offline): the run's own record file under <grid>/wandb
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    wb_run, config, history = wandb_run(run_dir)
    assert wb_run.display_name == tid and wb_run.run_group == "micro"
    assert wb_run.project == "engram-suite"
    assert config["rho"] == 0.6 and config["seed"] == 0
    assert config["config_hash"] == row["config_hash"]
    assert _same([(s, history[s]["train_loss"]) for s in (1, 2, 3, 4)], train)
    assert _same([(s, history[s]["val_loss"]) for s in (2, 4)], val)
    assert (out / ".gitignore").read_text().splitlines()[1:] == ["ray/", "mlflow/", "wandb/"]


class _Trial:
    """What the callbacks read of a Tune trial."""

    def __init__(self, tid: str):
        self.config = {"trial": {"trial_id": tid}}

    def __str__(self):
        return self.config["trial"]["trial_id"]


def test_mlflow_run_of_a_trial_continues_across_runs_of_the_grid(tmp_path, monkeypatch):
    """An interrupted run is marked KILLED; the next run of the grid logs into it again (one run
    per trial) and ends it FINISHED; a final error ends a run FAILED with its reason."""
    from mlflow.tracking import MlflowClient

    from sweeps.trackers import MLflowTracking

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlflow").as_uri()
    params = {"a": {"trial_id": "a", "rho": 0.8, "seed": 0}, "b": {"trial_id": "b", "rho": 0.6}}

    def callback():
        cb = MLflowTracking(params, tracking_uri=uri, experiment_name="g")
        cb.setup()
        return cb

    first, a, b = callback(), _Trial("a"), _Trial("b")
    for trial in (a, b):
        first.log_trial_start(trial)
    first.log_trial_result(1, a, {"step": 1, "train_loss": 5.0, "training_iteration": 1})
    first.log_trial_result(1, b, {"step": 1, "train_loss": 6.0})
    first.log_trial_result(2, b, {"done_record": 0, "error": "out of memory: JaxRuntimeError: x"})
    first.log_trial_end(b)
    first.on_experiment_end([a, b])  # interrupted while a trains

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("g").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp])}
    assert runs["a"].info.status == "KILLED"
    assert runs["b"].info.status == "FAILED"
    assert runs["b"].data.tags["error"] == "out of memory: JaxRuntimeError: x"

    second, a2 = callback(), _Trial("a")  # the grid continued: a fresh Tune trial for a
    second.log_trial_start(a2)
    second.log_trial_result(1, a2, {"step": 2, "train_loss": 4.0, "val_loss": 4.5})
    second.log_trial_end(a2)
    (run,) = client.search_runs([exp], filter_string="tags.trial_id = 'a'")
    assert run.info.run_id == runs["a"].info.run_id and run.info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(history) == [(1, 5.0), (2, 4.0)]
    assert run.data.params == {"trial_id": "a", "rho": "0.8", "seed": "0"}
    assert "training_iteration" not in run.data.metrics
