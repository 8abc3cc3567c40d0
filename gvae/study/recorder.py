"""A Ray Tune callback on the driver that keeps the study's Parquet tables up to date.

Rows are keyed by trial id (trials) and by (trial id, iteration) (curves): results that a trial
re-reports after restarting from a checkpoint, or after the study is resumed, replace the earlier
rows instead of duplicating them.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback

from gvae.config import TrialConfig
from gvae.study.replicates import SUGGESTION
from gvae.study.results import CURVES, TRIALS, ResultsStore

CURVE_KEYS = ("iteration", "mode_entropy", "mean_image_entropy", "class_histogram")
CURVE_EXTRA_KEYS = ("frechet_distance", "iterations_per_second", "eval_seconds")
ARRAY_KEYS = ("image_entropies", "sample_labels", "samples_png")
CONTEXT_KEYS = (
    "device_used",
    "node",
    "node_id",
    "threads",
    "evaluator_accuracy",
    "real_mode_entropy",
    "real_mean_image_entropy",
    "mode_attributes",
)


class ParquetRecorder(Callback):
    def __init__(self, store: ResultsStore, study: str, provenance: dict[str, Any]) -> None:
        self.store = store
        self.study = study
        self.provenance = provenance
        self.setup()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; the rows are reloaded from the tables
        # in `setup` when a study resumes, so a stale copy never overwrites newer rows.
        return {"uri": self.store.uri, "study": self.study, "provenance": self.provenance}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(ResultsStore(state["uri"]), state["study"], state["provenance"])

    # Ray Tune hooks -----------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        self.trials = {row["trial_id"]: row for row in self.store.read_rows(TRIALS)}
        self.curves = {
            (row["trial_id"], row["iteration"]): row for row in self.store.read_rows(CURVES)
        }
        self._pruned = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._pruned:
            self._prune_lost_trials({trial.trial_id for trial in trials})
            self._pruned = True

    def _prune_lost_trials(self, known: set[str]) -> None:
        """Drop unfinished rows of trials that a resumed Tune no longer knows.

        A driver killed between starting a trial and Tune's next snapshot of its state leaves a
        'running' row that Tune never resumes: the searcher suggests that point again under a
        new trial id, so keeping the row would count the trial twice.
        """
        lost = {
            trial_id
            for trial_id, row in self.trials.items()
            if trial_id not in known and row["status"] in ("running", "pending")
        }
        if lost:
            self.trials = {k: v for k, v in self.trials.items() if k not in lost}
            self.curves = {k: v for k, v in self.curves.items() if k[0] not in lost}
            self.flush()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_row(trial)["status"] = "running"
        self.flush()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        row = self._trial_row(trial)
        row["wall_seconds"] = result.get("time_total_s")
        row.update({key: result[key] for key in CONTEXT_KEYS if key in result})
        if "failed_error" in result:  # an error retrying cannot fix (gvae.study.trainable)
            row["status"], row["error"] = "failed", result["failed_error"]
            self.flush()
            return
        if "diverged_at" in result:
            row["diverged_at"] = result["diverged_at"]
            row["iterations_done"] = result["diverged_at"] - 1
            row["error"] = result["diverged_error"]
            self.flush()
            return
        self._add_curve_row(trial, result)
        row["iterations_done"] = result["iteration"]
        for key, value in result.items():
            if key in ARRAY_KEYS:
                row[f"final_{key}"] = value
        self.flush()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_row(trial)["retries"] = trial.num_failures

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._trial_row(trial)
        if row["status"] == "failed":
            pass  # ended by the trainable after an error retrying cannot fix
        elif row.get("diverged_at") is not None:
            row["status"] = "diverged"
        elif row.get("iterations_done") == trial.config["iterations"]:
            row["status"] = "finished"
        else:
            row["status"] = "stopped"  # ended early by the scheduler
        self.flush()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._trial_row(trial)
        row["status"] = "failed"
        row["retries"] = trial.num_failures
        row["error"] = _error_line(trial.get_error())
        self.flush()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.flush()

    # Tables ----------------------------------------------------------------------------------

    def _trial_row(self, trial: Any) -> dict[str, Any]:
        if trial.trial_id not in self.trials:
            self.trials[trial.trial_id] = {
                "study": self.study,
                "trial_id": trial.trial_id,
                **_trial_config(trial.config),
                "status": "pending",
                "error": None,
                "diverged_at": None,
                "retries": 0,
                "iterations_done": 0,
                **self.provenance,
            }
        return self.trials[trial.trial_id]

    def _add_curve_row(self, trial: Any, result: dict[str, Any]) -> None:
        keys = (*CURVE_KEYS, *CURVE_EXTRA_KEYS)
        row = {"study": self.study, "trial_id": trial.trial_id, "model": trial.config["model"]}
        row.update({key: result.get(key) for key in keys})
        row.update({key: value for key, value in result.items() if key.endswith("_loss")})
        self.curves[(trial.trial_id, result["iteration"])] = row

    def flush(self) -> None:
        """Rewrite both tables after every event: a result a trial reported before its last
        checkpoint is never reported again, so it must be on disk before the driver can die."""
        ordered = [self.curves[key] for key in sorted(self.curves)]  # by trial, then iteration
        self.store.write(CURVES, ordered)
        by_trial: dict[str, list[dict[str, Any]]] = {}
        for point in ordered:
            by_trial.setdefault(point["trial_id"], []).append(point)
        rows = [_with_summary(r, by_trial.get(r["trial_id"], [])) for r in self.trials.values()]
        self.store.write(TRIALS, rows)


def _trial_config(params: dict[str, Any]) -> dict[str, Any]:
    """The resolved trial fields, and the suggestion a seed replicate belongs to (else None)."""
    fields = {key: value for key, value in params.items() if key != SUGGESTION}
    return {
        **TrialConfig.from_dict(fields).resolved().to_dict(),
        SUGGESTION: params.get(SUGGESTION),
    }


def _with_summary(row: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial row with final and best metrics taken from its curve (in iteration order)."""
    summary = dict(row)
    for metric in ("mode_entropy", "mean_image_entropy"):
        summary.setdefault(f"final_{metric}", None)
        summary.setdefault(f"best_{metric}", None)
    if points:
        last = points[-1]
        summary["final_mode_entropy"] = last["mode_entropy"]
        summary["final_mean_image_entropy"] = last["mean_image_entropy"]
        summary["final_class_histogram"] = last["class_histogram"]
        summary["best_mode_entropy"] = max(p["mode_entropy"] for p in points)
        summary["best_mean_image_entropy"] = min(p["mean_image_entropy"] for p in points)
        for key, value in last.items():
            if key.endswith("_loss") and value is not None and math.isfinite(value):
                summary[f"final_{key}"] = value
    return summary


def _error_line(error: Any) -> str | None:
    """The last non-empty line of a traceback: the exception and its message."""
    if not error:
        return None
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else str(error)
