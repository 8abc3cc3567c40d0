"""Trackers a study sends its trials to, through Ray Tune's own logger callbacks: MLflow
(`MLflowLoggerCallback`) and Weights & Biases (`WandbLoggerCallback`), each an optional extra.

A Tune trial is one run: its config as parameters, every scalar it reports at the trainer's
iteration (a pack's mean and each member's, under `members/seed<k>/`), and how it ended as the
run's `status` tag (finished, diverged, stopped, failed).
"""

from __future__ import annotations

import os
from typing import Any

from ray.tune import Callback

from gvae.study.outcome import Outcome, Status
from gvae.study.spec import StudySpec


def tracker_callbacks(spec: StudySpec) -> list[Callback]:
    callbacks: list[Callback] = []
    if "mlflow" in spec.tracking:
        options = spec.tracking["mlflow"]
        callbacks.append(
            _mlflow_callback(options.get("tracking_uri"), options.get("experiment", spec.name))
        )
    if "wandb" in spec.tracking:
        from ray.air.integrations.wandb import WandbLoggerCallback

        options = {"project": spec.name, **spec.tracking["wandb"]}
        if options.get("mode") in ("offline", "disabled"):
            # Ray asks for an API key unless wandb's own WANDB_MODE says it needs none.
            os.environ.setdefault("WANDB_MODE", options["mode"])
        callbacks.append(WandbLoggerCallback(**options))
    return callbacks


def _mlflow_callback(tracking_uri: str | None, experiment: str) -> Callback:
    import mlflow
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MLflowTracker(MLflowLoggerCallback):
        """Ray's MLflow callback, which also tags each run with how its trial ended."""

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            super().log_trial_end(trial, failed=failed)
            outcome = Outcome.of_trial(trial).status
            status = Status.FAILED.value if failed else outcome.value
            client = mlflow.MlflowClient(tracking_uri)
            found = client.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id], f"tags.trial_name = '{trial}'")
            for run in runs:
                client.set_tag(run.info.run_id, "status", status)

    return MLflowTracker(tracking_uri=tracking_uri, experiment_name=experiment)
