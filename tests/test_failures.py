"""Final errors are final: the classifier of a trial's errors, and a real out-of-memory trial on
Ray Tune (a batch far larger than the machine, on the CPU) that fails once, not 1 + max-failures
times, named in runs.csv and in the grid's summary."""

from __future__ import annotations

import csv
import errno

from sweeps.failures import error_kind, final_error
from tests.test_sweeps import MICRO, corpus, ray_env  # noqa: F401  (fixtures)


class JaxRuntimeError(RuntimeError):
    """Stands in for jax.errors.JaxRuntimeError (same name, same message format)."""


class TrainingDiverged(RuntimeError):
    pass


class ActorDiedError(Exception):
    pass


ActorDiedError.__module__ = "ray.exceptions"


def test_out_of_memory_is_final_and_named():
    xla = JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 68719476736 bytes.\n"
                          "BFC allocator stats: ...")
    reason = final_error(xla, batch_size=4096)
    assert reason.startswith("out of memory: JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory "
                             "allocating 68719476736 bytes. (batch_size 4096); not retried")
    assert "BFC" not in reason and error_kind(reason) == "out of memory"
    assert error_kind(final_error(MemoryError("Unable to allocate 64.0 GiB"))) == "out of memory"
    gpu = JaxRuntimeError("INTERNAL: Failed to launch: CUDA_ERROR_OUT_OF_MEMORY: out of memory")
    assert error_kind(final_error(gpu)) == "out of memory"


def test_deterministic_errors_are_final_transient_ones_are_not():
    diverged = final_error(TrainingDiverged("loss is nan at step 3: training diverged"))
    assert diverged == "TrainingDiverged: loss is nan at step 3: training diverged"
    for exc in (ValueError("bad shape"), TypeError("dot_general requires ..."),
                KeyError("engram"), FileNotFoundError("corpus '/x' not found"),
                PermissionError("denied"), RuntimeError("checkpoint is incomplete"),
                JaxRuntimeError("INVALID_ARGUMENT: Executable expected shape f32[4]")):
        reason = final_error(exc)
        assert reason is not None and reason.startswith(type(exc).__name__ + ": "), exc
        assert reason.endswith("not retried (deterministic)")
    assert final_error(ValueError("x" * 5000)).count("x") < 400  # a long message is cut
    for exc in (ConnectionResetError("peer"), TimeoutError("slow storage"),
                OSError(errno.EIO, "I/O error writing the checkpoint"),
                JaxRuntimeError("UNAVAILABLE: connection to the coordinator lost"),
                JaxRuntimeError("DEADLINE_EXCEEDED: barrier timed out"), ActorDiedError("gone")):
        assert final_error(exc) is None, exc


def test_summary_names_the_kind_of_a_failure():
    from sweeps.results import summary_table

    rows = [{"trial_id": "a", "status": "error", "error": "out of memory: JaxRuntimeError: ..."},
            {"trial_id": "b", "status": "error", "error": "TrainingDiverged: loss is nan"},
            {"trial_id": "c", "status": "ok", "error": ""},
            {"trial_id": "d", "status": "incomplete", "error": "not finished (interrupted)"}]
    table = summary_table(rows)
    assert "| error (out of memory) |" in table and "| error (TrainingDiverged) |" in table
    assert "| ok |" in table and "| incomplete |" in table


OOM = MICRO.replace("rho: [1.0, 0.6]", "rho: [1.0]").replace("batch_size: 4", "batch_size: 1048576")


def test_out_of_memory_trial_fails_once_with_its_reason(corpus, tmp_path, ray_env, capsys,  # noqa: F811
                                                        monkeypatch):
    """One evaluation batch of 2^20 sequences needs a 64 GiB logits buffer: XLA's CPU client
    cannot allocate it and raises RESOURCE_EXHAUSTED. The trial ends at once (Tune would
    otherwise start it 1 + max-failures = 4 times), and its tracked run ends as failed."""
    from sweeps.run import main
    from tests.test_tracking import tensorboard_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    grid = tmp_path / "oom.yaml"
    grid.write_text(OOM.format(corpus=corpus).replace("name: micro", "name: oom"))
    results = tmp_path / "results"
    rc = main([str(grid), "--results", str(results), "--num-cpus", "2", "--max-failures", "3",
               "--tracking", "tensorboard,mlflow"])
    log = capsys.readouterr()
    assert rc == 1, log
    assert log.out.count("[rho1.00-s0] started") == 1, log.out  # one attempt
    assert "started again" not in log.out and "Tune restarts it" not in log.out
    with (results / "oom" / "runs.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "error"
    assert row["error"].startswith("out of memory: JaxRuntimeError: RESOURCE_EXHAUSTED"), row
    assert "(batch_size 1048576); not retried" in row["error"]
    assert "| rho1.00-s0 | 1.00 | 0 | - | - | - | error (out of memory) |" in log.out
    assert "not finished: rho1.00-s0 (error: out of memory" in log.err
    readme = (results / "oom" / "README.md").read_text()
    assert "error (out of memory)" in readme and "- `rho1.00-s0` error: out of memory" in readme

    from mlflow.tracking import MlflowClient
    from tensorboard.plugins.hparams import api_pb2

    client = MlflowClient(tracking_uri=(results / "oom" / "mlflow").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("oom").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"] == row["error"]
    _, hparams, status = tensorboard_run(results / "oom" / "ray" / "oom" / "rho1.00-s0")
    assert status == api_pb2.STATUS_FAILURE and hparams["batch_size"] == 1048576
