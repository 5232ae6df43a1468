"""Ray Tune's TensorBoard, MLflow and W&B logger callbacks, set up for a grid (``tracking.py``
says what each logs and where): one run per trial, named by its trial id, with the trial's
parameters rather than Tune's whole nested config, the trial's metrics rather than Tune's
bookkeeping, and the training step as the x axis (Tune's default is the report count)."""

from __future__ import annotations

from ray.air.constants import TRAINING_ITERATION
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.logger import TBXLoggerCallback

from sweeps.tracking import trial_metrics

# the scalars TensorBoard's HParams dashboard shows beside each trial's parameters
HPARAM_METRICS = ("train_loss", "val_loss", "best_val_loss", "tokens_per_s")


def _tid(trial) -> str:
    return trial.config["trial"]["trial_id"]


class _Steps:
    """The training step of each result (an error result has none: the trial's last one)."""

    def __init__(self):
        self._last: dict[str, int] = {}

    def __call__(self, trial, result: dict) -> int:
        s = result.get("step")
        if isinstance(s, int) and not isinstance(s, bool):
            self._last[_tid(trial)] = s
        return self._last.get(_tid(trial), 0)


class TensorBoardTracking(TBXLoggerCallback):
    """Event files in each trial's directory (TBXLoggerCallback); the parameters on the HParams
    dashboard from the trial's start, its end status (success or failure) when it ends."""

    def __init__(self, params_by_trial: dict[str, dict]):
        super().__init__()
        self._params = params_by_trial
        self._step = _Steps()
        self._failed: set[str] = set()

    def log_trial_start(self, trial):
        super().log_trial_start(trial)
        from tensorboardX.summary import hparams

        exp, start, _ = hparams(self._params.get(_tid(trial), {}),
                                {f"ray/tune/{m}": 0.0 for m in HPARAM_METRICS})
        writer = self._trial_writer[trial].file_writer
        writer.add_summary(exp)
        writer.add_summary(start)

    def log_trial_result(self, iteration, trial, result):
        if result.get("error"):
            self._failed.add(_tid(trial))
        step = self._step(trial, result)
        # TBXLoggerCallback takes the step from training_iteration and does not log that key
        super().log_trial_result(iteration, trial,
                                 {**trial_metrics(result), TRAINING_ITERATION: step})

    def log_trial_end(self, trial, failed: bool = False):
        if trial in self._trial_writer:
            failed = failed or _tid(trial) in self._failed
            self._trial_writer[trial].file_writer.add_summary(_session_end(failed))
        super().log_trial_end(trial, failed=failed)

    def _try_log_hparams(self, trial, result):
        """Tune logs the flattened config here at the trial's end; the parameters were logged at
        its start instead."""


def _session_end(failed: bool):
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    info = SessionEndInfo(status=Status.Value("STATUS_FAILURE" if failed else "STATUS_SUCCESS"))
    content = HParamsPluginData(session_end_info=info, version=0).SerializeToString()
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams",
                                                                  content=content))
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=meta)])


class MLflowTracking(MLflowLoggerCallback):
    """One MLflow run per trial in the grid's experiment; a trial that an earlier run of the grid
    left unfinished logs into the same run again. Ends FINISHED, or FAILED with an ``error`` tag;
    runs still open when the experiment ends (interrupted) are marked KILLED."""

    def __init__(self, params_by_trial: dict[str, dict], *, tracking_uri: str,
                 experiment_name: str):
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment_name,
                         save_artifact=False)
        self._params = params_by_trial
        self._step = _Steps()
        self._errors: dict[str, str] = {}
        self._open: dict[str, str] = {}  # trial id -> run id of runs not ended yet

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _unfinished_run(self, tid: str) -> str | None:
        runs = self._client().search_runs(
            [self.mlflow_util.experiment_id], filter_string=f"tags.trial_id = '{tid}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if runs and runs[0].info.status != "FINISHED":
            return runs[0].info.run_id
        return None

    def log_trial_start(self, trial):
        if trial in self._trial_runs:  # restarted by Tune: same run
            return
        tid = _tid(trial)
        p = self._params.get(tid, {})
        run_id = self._unfinished_run(tid)
        if run_id is not None:
            self._client().update_run(run_id, status="RUNNING")
        else:
            tags = {**self.tags, "trial_name": tid, "trial_id": tid,
                    **{k: str(p[k]) for k in ("grid", "config_hash") if k in p}}
            run_id = self.mlflow_util.start_run(tags=tags, run_name=tid).info.run_id
            self.mlflow_util.log_params(run_id=run_id, params_to_log=p)
        self._trial_runs[trial] = run_id
        self._open[tid] = run_id

    def log_trial_result(self, iteration, trial, result):
        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        if result.get("error"):
            self._errors[_tid(trial)] = str(result["error"])
        metrics = trial_metrics(result)
        if metrics:
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics,
                                         step=self._step(trial, result))

    def log_trial_end(self, trial, failed: bool = False):
        if trial not in self._trial_runs:
            return
        error = self._errors.pop(_tid(trial), None)
        if error:
            self._client().set_tag(self._trial_runs[trial], "error", error[:5000])
        super().log_trial_end(trial, failed=failed or error is not None)
        self._open.pop(_tid(trial), None)

    def on_experiment_end(self, trials, **info):
        for run_id in self._open.values():
            self._client().set_terminated(run_id, status="KILLED")
        self._open.clear()


class WandbTracking(WandbLoggerCallback):
    """One W&B run per trial (WandbLoggerCallback: a logging actor per trial on the driver's
    node), its config the trial's parameters, its step the training step."""

    def __init__(self, params_by_trial: dict[str, dict], *, project: str, group: str,
                 **init_kwargs):
        super().__init__(project=project, group=group, **init_kwargs)
        self._params = params_by_trial
        self._step = _Steps()

    def log_trial_start(self, trial):
        # The callback passes its extra keyword arguments on to wandb.init, after its own.
        base = self.kwargs
        p = self._params.get(_tid(trial), {})
        self.kwargs = {**base, "config": p, "tags": [str(p.get("grid", ""))]}
        try:
            super().log_trial_start(trial)
        finally:
            self.kwargs = base

    def log_trial_result(self, iteration, trial, result):
        step = self._step(trial, result)
        # the logging actor passes training_iteration to wandb.log as its step
        super().log_trial_result(iteration, trial,
                                 {**trial_metrics(result), TRAINING_ITERATION: step})
