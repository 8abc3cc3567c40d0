"""Trackers a study sends its trials to, through Ray Tune's logger callbacks: MLflow (a
LoggerCallback on MLflow's client, which a resumed study continues) and Weights & Biases (Ray's
`WandbLoggerCallback`), each an optional extra.

A Tune trial is one run: its config as parameters, every scalar it reports at the trainer's
iteration (a pack's mean and each member's, under `members/seed<k>/`), and how it ended as the
run's `status` tag (finished, diverged, stopped, failed).
"""

from __future__ import annotations

import os
import time
from typing import Any

from ray.tune import Callback
from ray.tune.logger import LoggerCallback
from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION
from ray.tune.utils import flatten_dict

from gvae.study.outcome import Outcome, Status
from gvae.study.spec import StudySpec


def tracker_callbacks(spec: StudySpec) -> list[Callback]:
    callbacks: list[Callback] = []
    if "mlflow" in spec.tracking:
        options = spec.tracking["mlflow"]
        experiment = options.get("experiment", spec.name)
        callbacks.append(MLflowTracker(options.get("tracking_uri"), experiment))
    if "wandb" in spec.tracking:
        from ray.air.integrations.wandb import WandbLoggerCallback

        options = {"project": spec.name, **spec.tracking["wandb"]}
        if options.get("mode") in ("offline", "disabled"):
            # Ray asks for an API key unless wandb's own WANDB_MODE says it needs none.
            os.environ.setdefault("WANDB_MODE", options["mode"])
        callbacks.append(WandbLoggerCallback(**options))
    return callbacks


class MLflowTracker(LoggerCallback):
    """One MLflow run per Tune trial, through MLflow's client: its config as parameters, each
    result's numbers at the trainer's iteration, and how it ended as its `status` tag. A trial
    that a resumed study restores goes on in the run it began in, found by its `trial_name` tag:
    Ray's MLflowLoggerCallback keeps its trial-to-run map in memory only, so it starts a second
    run for every trial that continues after a resume."""

    def __init__(self, tracking_uri: str | None, experiment: str) -> None:
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.runs: dict[str, str] = {}  # trial id -> run id, in this run of the study

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks; a client may not pickle
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "runs": {}}

    def setup(self, *args: Any, **kwargs: Any) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(self.experiment)
        )

    def log_trial_start(self, trial: Any) -> None:
        if trial.trial_id in self.runs:
            return
        name = str(trial)
        earlier = self.client.search_runs([self.experiment_id], f"tags.trial_name = '{name}'")
        if earlier:
            run_id = earlier[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {"trial_name": name}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
            run_id = run.info.run_id
            self._log(run_id, params=flatten_dict(trial.config))
        self.runs[trial.trial_id] = run_id

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        self.log_trial_start(trial)
        step = result.get(TIMESTEPS_TOTAL) or result[TRAINING_ITERATION]
        numbers = {k: float(v) for k, v in flatten_dict(result).items() if _is_number(v)}
        self._log(self.runs[trial.trial_id], metrics=numbers, step=step)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self.log_trial_start(trial)
        run_id = self.runs.pop(trial.trial_id)
        status = Status.FAILED if failed else Outcome.of_trial(trial).status
        self.client.set_tag(run_id, "status", status.value)
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def _log(
        self, run_id: str, params: dict | None = None, metrics: dict | None = None, step: int = 0
    ) -> None:
        """In batches as MLflow takes them: 100 parameters, 1,000 metrics a call."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        named = [Param(key, str(value)) for key, value in (params or {}).items()]
        measured = [Metric(key, value, now, step) for key, value in (metrics or {}).items()]
        for start in range(0, len(named), 100):
            self.client.log_batch(run_id, params=named[start : start + 100])
        for start in range(0, len(measured), 1000):
            self.client.log_batch(run_id, metrics=measured[start : start + 1000])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
