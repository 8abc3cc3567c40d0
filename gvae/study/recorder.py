"""A Ray Tune callback on the driver that keeps the study's Parquet tables up to date.

Design (see gvae.study.results for the files): every Tune event rewrites only the rows of the trial
it concerns, the trial's row in `trials.parquet/part-<id>.parquet` and, after a result, its curve in
`curves.parquet/part-<id>.parquet`. So the cost of an event is that of one trial's rows whatever the
size of the study, and on S3 an event uploads those rows, never a whole table. When every trial has
ended, the folders are compacted into one file each.

The writes run on a thread of their own (gvae.study.writer), so Tune's loop goes on starting trials
meanwhile. Crash safety: Tune snapshots its experiment state (which trials ended, the checkpoint
each resumes from) only after the recorder has flushed its writes (`get_state`), so the tables are
never behind that snapshot. A killed driver loses only writes of events after the snapshot, and a
resumed study runs those trials again from the snapshot's checkpoints, which reports those events
again.

Rows are keyed by trial id (trials) and by (trial id, iteration) (curves): a trial's fragment holds
all its rows, so results that a trial re-reports after restarting from a checkpoint, or after the
study is resumed, replace the earlier rows instead of duplicating them.

Memory: only trials that have not ended are kept whole; an ended trial keeps its status (for the
pruning on resume) and is read back from its fragment in the rare case Tune reports on it again.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pyarrow as pa
from ray.tune import Callback

from gvae.config import TrialConfig
from gvae.study.packs import PACK, PACK_SEEDS, PACKED_SUGGESTION, is_pack, members, seeds_of
from gvae.study.replicates import SUGGESTION
from gvae.study.results import CURVES, TRIALS, FragmentedTable, ResultsStore
from gvae.study.spec import EVALUATION_METRICS
from gvae.study.trainable import MEMBERS, read_checkpoint_arrays
from gvae.study.writer import BackgroundWriter

CURVE_KEYS = ("iteration", "mode_entropy", "mean_image_entropy", "class_histogram")
# Scalar metrics of an evaluation besides the two entropies: Fréchet distance, mode counts,
# classifier score, k-NN fidelity/diversity and the cvaegan hinge's activity. Curve columns whose
# last value is also `final_<name>` in the trials table.
CURVE_EXTRA_KEYS = (*EVALUATION_METRICS, "constraint_active")
# Curve columns about speed only (no final_ summary).
CURVE_TIMING_KEYS = ("iterations_per_second", "eval_seconds")
CONTEXT_KEYS = (
    "device_used",
    "node",
    "node_id",
    "threads",
    "evaluator_accuracy",
    "real_mode_entropy",
    "real_mean_image_entropy",
    "mode_attributes",
    "real_modes_covered",
    "real_kl_to_uniform",
    "real_classifier_score",
)
ENDED = ("finished", "failed", "diverged", "stopped")
# The curves table of a study none of whose trials reached an evaluation: readable, no rows.
EMPTY_CURVES = pa.schema(
    [("study", pa.string()), ("trial_id", pa.string()), ("model", pa.string())]
    + [("iteration", pa.int64())]
).empty_table()


class ParquetRecorder(Callback):
    def __init__(self, store: ResultsStore, study: str, provenance: dict[str, Any]) -> None:
        self.store = store
        self.study = study
        self.provenance = provenance
        self.setup()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; the rows are reloaded from the tables
        # when a study resumes, so a stale copy never overwrites newer rows.
        return {"uri": self.store.uri, "study": self.study, "provenance": self.provenance}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(ResultsStore(state["uri"]), state["study"], state["provenance"])

    # Ray Tune hooks -----------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        if hasattr(self, "writer"):
            self.writer.flush()
        self.writer = BackgroundWriter()
        self.trials_table = FragmentedTable(self.store, TRIALS)
        self.curves_table = FragmentedTable(self.store, CURVES)
        self.trials_table.open()
        self.curves_table.open()
        known = self.trials_table.read(["trial_id", "status"])
        self.status: dict[str, str] = {} if known is None else _status_by_trial(known)
        self.trials: dict[str, dict[str, Any]] = {}  # rows of trials not yet ended
        self.curves: dict[str, dict[int, dict[str, Any]]] = {}  # their curves, by iteration
        self._pruned = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._pruned:
            self._prune_lost_trials({row_id for trial in trials for row_id, _ in _rows_of(trial)})
            self._pruned = True

    def _prune_lost_trials(self, known: set[str]) -> None:
        """Drop unfinished rows of trials that a resumed Tune no longer knows.

        A driver killed between starting a trial and Tune's next snapshot of its state leaves a
        'running' row that Tune never resumes: the searcher suggests that point again under a
        new trial id, so keeping the row would count the trial twice.
        """
        for trial_id, status in list(self.status.items()):
            if trial_id not in known and status not in ENDED:
                self._submit(self.trials_table, trial_id, [])
                self._submit(self.curves_table, trial_id, [])
                del self.status[trial_id]
                self.trials.pop(trial_id, None)
                self.curves.pop(trial_id, None)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for row_id, params in _rows_of(trial):
            self._row(row_id, params)["status"] = "running"
            self._write(row_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        for (row_id, params), member_result in zip(
            _rows_of(trial), _member_results(trial, result), strict=True
        ):
            if member_result:  # {}: a pack's member with nothing new
                self._record_result(row_id, params, member_result)

    def _record_result(self, row_id: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        row = self._row(row_id, params)
        row["wall_seconds"] = result.get("time_total_s")
        row.update({key: result[key] for key in CONTEXT_KEYS if key in result})
        if "failed_error" in result:  # an error retrying cannot fix (gvae.study.trainable)
            row["status"], row["error"] = "failed", result["failed_error"]
            self._write(row_id)
            return
        if "diverged_at" in result:
            row["diverged_at"] = result["diverged_at"]
            row["iterations_done"] = result["diverged_at"] - 1
            row["error"] = result["diverged_error"]
            self._write(row_id)
            return
        self._add_curve_row(row_id, params, result)
        row["iterations_done"] = result["iteration"]
        self._write(row_id, curve=True)

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info):
        """The final evaluation's per-image arrays, which come in its checkpoint."""
        arrays = read_checkpoint_arrays(checkpoint)
        if not arrays:
            return
        per_member = arrays.get(MEMBERS, [arrays])  # a pack's, or a lone trial's
        for (row_id, params), member_arrays in zip(_rows_of(trial), per_member, strict=True):
            if member_arrays:
                row = self._row(row_id, params)
                row.update({f"final_{key}": value for key, value in member_arrays.items()})
                self._write(row_id)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for row_id, params in _rows_of(trial):
            self._row(row_id, params)["retries"] = trial.num_failures
            self._write(row_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for row_id, params in _rows_of(trial):
            row = self._row(row_id, params)
            if row["status"] == "failed":
                pass  # ended by the trainable after an error retrying cannot fix
            elif row.get("diverged_at") is not None:
                row["status"] = "diverged"
            elif row.get("iterations_done") == params["iterations"]:
                row["status"] = "finished"
            else:
                row["status"] = "stopped"  # ended early by the scheduler
            self._write(row_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for row_id, params in _rows_of(trial):
            row = self._row(row_id, params)
            row["status"] = "failed"
            row["retries"] = trial.num_failures
            row["error"] = _error_line(trial.get_error())
            self._write(row_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Compact the tables into one file each once no trial can report again."""
        self.flush()
        if all(status in ENDED for status in self.status.values()):
            self.compact()

    def get_state(self) -> None:
        """Called as Tune snapshots its experiment state: the snapshot must not get ahead of
        the tables (see the module docstring). The rows themselves live in the tables."""
        self.flush()

    def flush(self) -> None:
        """Wait until every event so far is in the tables."""
        self.writer.flush()

    def compact(self) -> None:
        self.flush()
        self.trials_table.compact()
        self.curves_table.compact()
        if not self.store.exists(CURVES):  # every trial ended before its first evaluation
            self.store.put(CURVES, EMPTY_CURVES)

    # Rows ------------------------------------------------------------------------------------

    def _row(self, trial_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """The row of a trial, or of a pack's member (gvae.study.packs), by its row id."""
        if trial_id in self.trials:
            return self.trials[trial_id]
        stored = []
        if trial_id in self.status:
            self.flush()  # its newest rows may still be on their way to the table
            stored = self.trials_table.read_trial(trial_id)
        if stored:  # a trial recorded by an earlier run of this study, or ended before
            row = {k: v for k, v in stored[0].items() if not _is_summary(k)}
            points = self.curves_table.read_trial(trial_id)
            self.curves[trial_id] = {point["iteration"]: point for point in points}
        else:
            row = {
                "study": self.study,
                "trial_id": trial_id,
                **_trial_config(params),
                "status": "pending",
                "error": None,
                "diverged_at": None,
                "retries": 0,
                "iterations_done": 0,
                # When the trial was first started: the order in which a searcher suggested
                # trials (Tune's ids are random under a searcher).
                "started_at": time.time(),
                **self.provenance,
            }
            self.curves[trial_id] = {}
        self.trials[trial_id] = row
        return row

    def _add_curve_row(self, row_id: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        keys = (*CURVE_KEYS, *CURVE_EXTRA_KEYS, *CURVE_TIMING_KEYS)
        row = {"study": self.study, "trial_id": row_id, "model": params["model"]}
        row.update({key: result.get(key) for key in keys})
        row.update({key: value for key, value in result.items() if key.endswith("_loss")})
        self.curves[row_id][result["iteration"]] = row

    def _write(self, trial_id: str, curve: bool = False) -> None:
        """Send this trial's rows to the writer; forget an ended trial's rows (the writer has
        them, and `_row` reads them back after a flush)."""
        row = self.trials[trial_id]
        points = [self.curves[trial_id][key] for key in sorted(self.curves[trial_id])]
        if curve:
            self._submit(self.curves_table, trial_id, points)
        self._submit(self.trials_table, trial_id, [_with_summary(row, points)])
        self.status[trial_id] = row["status"]
        if row["status"] in ENDED:
            del self.trials[trial_id]
            del self.curves[trial_id]

    def _submit(self, table: FragmentedTable, trial_id: str, rows: list[dict[str, Any]]) -> None:
        """Rewrite one trial's fragment of `table` (no rows: remove it) on the writer's thread.
        The rows are copies the hooks no longer change: `_with_summary` copies the trial row,
        and a curve row is replaced, never changed, when its iteration is reported again."""
        self.writer.submit((table.name, trial_id), lambda: table.write_trial(trial_id, rows))


def _status_by_trial(table: Any) -> dict[str, str]:
    columns = table.to_pydict()
    return dict(zip(columns["trial_id"], columns["status"], strict=True))


SUMMARY_METRICS = ("mode_entropy", "mean_image_entropy", *CURVE_EXTRA_KEYS)


def _is_summary(key: str) -> bool:
    """Columns `_with_summary` derives from the curve (recomputed, never carried over)."""
    if key.startswith("best_"):
        return True
    derived = (*SUMMARY_METRICS, "class_histogram")
    return key.startswith("final_") and (key[6:] in derived or key.endswith("_loss"))


def _trial_config(params: dict[str, Any]) -> dict[str, Any]:
    """The resolved trial fields, the suggestion a seed replicate belongs to and the pack a
    member belongs to (else None)."""
    pack = {key: params[key] for key in (PACK, PACK_SEEDS) if key in params}
    fields = {key: value for key, value in params.items() if key not in (SUGGESTION, *pack)}
    return {
        **TrialConfig.from_dict(fields).resolved().to_dict(),
        SUGGESTION: params.get(SUGGESTION),
        **pack,
    }


def _rows_of(trial: Any) -> list[tuple[str, dict[str, Any]]]:
    """(row id, fields) of each row a trial fills: its own, or one per member of a pack."""
    rows = members(trial.trial_id, trial.config)
    if is_pack(trial.config):
        pack = {PACK: trial.trial_id, PACK_SEEDS: seeds_of(trial.config)}
        if trial.config.get(SUGGESTION) == PACKED_SUGGESTION:  # the replicates of a suggestion
            pack[SUGGESTION] = trial.trial_id
        return [(row_id, {**fields, **pack}) for row_id, fields in rows]
    return rows


def _member_results(trial: Any, result: dict[str, Any]) -> list[dict[str, Any]]:
    """A result per row of the trial: a pack's member rows, each with the pack's context (the
    device, node, timing) and its own metrics; {} for a member with nothing new."""
    if not is_pack(trial.config) or MEMBERS not in result:
        return [result] * len(_rows_of(trial))  # a lone trial, or a failure of the whole pack
    shared = {key: result[key] for key in (*CONTEXT_KEYS, "time_total_s") if key in result}
    return [{**shared, **member} if member else {} for member in result[MEMBERS]]


def _with_summary(row: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial row with final and best metrics taken from its curve (in iteration order)."""
    summary = dict(row)
    for metric in ("mode_entropy", "mean_image_entropy"):
        summary.setdefault(f"final_{metric}", None)
        summary.setdefault(f"best_{metric}", None)
    if points:
        last = points[-1]
        for metric in SUMMARY_METRICS:
            summary[f"final_{metric}"] = last.get(metric)
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
