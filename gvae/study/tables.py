"""The study's two tables: their columns, the rows of one trial, and what the driver adds.

One record of each trial: the trial writes its own rows (gvae.study.trainable) at each report,
built from what its checkpoint holds, into its fragment of each table (gvae.study.results): its
row of `trials.parquet` and its curve in `curves.parquet`. A trial resumed from an older
checkpoint rewrites the same rows, so the tables follow the checkpoint Tune resumes from and never
disagree with Tune's state. The driver (`StudyTables`, a Tune callback) writes only what no trial
can: a failure after the last retry, a stop by the scheduler, the retries of a trial, and at the
start of a resumed run what Tune's saved state says of trials whose rows a killed driver left
behind. When every trial has ended, it compacts each table into one file.

The columns are declared here, so every fragment, written by whichever process, has the same
schema, and `pandas.read_parquet` of a table's folder sees every column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.tune import Callback
from ray.tune.result import EXPR_ERROR_FILE, EXPR_ERROR_PICKLE_FILE

from gvae.config import TrialConfig
from gvae.errors import GvaeError
from gvae.io import join
from gvae.study.folder import EXPERIMENT
from gvae.study.outcome import (
    ENDED,
    Outcome,
    Status,
    ended_in_tune,
    is_finite_number,
    trial_error,
)
from gvae.study.packs import PACK, PACK_SEEDS, PACKED_SUGGESTION, is_pack, members, seeds_of
from gvae.study.results import (
    CURVES,
    TRIALS,
    FragmentedTable,
    ResultsStore,
    UnreadableTable,
    readable_parquet,
)
from gvae.study.spec import EVALUATION_METRICS, StudySpec

SUGGESTION = "suggestion"  # the config key (and column) naming a seed replicate's suggestion
# The losses each model reports (its train_step's keys), the mean of each per evaluation.
MODEL_LOSSES = {
    "gan": ("d_loss", "g_loss"),
    "wgan": ("critic_loss", "g_loss"),
    "vae": ("recon_loss", "kl_loss"),
    "vaegan": ("d_loss", "recon_loss", "kl_loss", "gan_loss"),
    "cvaegan": ("d_loss", "recon_loss", "kl_loss", "gan_loss"),
}
# Curve scalars with a `final_<name>` column in the trials table.
SUMMARY_METRICS = ("mode_entropy", "mean_image_entropy", *EVALUATION_METRICS, "constraint_active")
CONTEXT_COLUMNS = {
    "device_used": pa.string(),
    "node": pa.string(),
    "node_id": pa.string(),  # tells apart nodes on one host
    "threads": pa.int64(),
    "evaluator_accuracy": pa.float64(),
    "real_mode_entropy": pa.float64(),
    "real_mean_image_entropy": pa.float64(),
    "real_modes_covered": pa.float64(),
    "real_kl_to_uniform": pa.float64(),
    "real_classifier_score": pa.float64(),
    "mode_attributes": pa.string(),  # what mode_entropy counts on faces; None for classes
}
PROVENANCE = ("gvae_version", "torch_version", "ray_version", "optuna_version", "python_version")
ARRAYS = {  # the last evaluation's per-image arrays, as `final_<name>`
    "image_entropies": pa.list_(pa.float64()),
    "sample_labels": pa.list_(pa.int64()),
    "samples_png": pa.string(),
}
HISTOGRAM = pa.list_(pa.float64())
CURVE_KEYS = ("study", "trial_id", "model")  # what a curve row holds besides its evaluation


def _config_columns() -> list[tuple[str, pa.DataType]]:
    types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
    return [
        (field.name, types[str(field.type).split(" ")[0]])
        for field in dataclasses.fields(TrialConfig)
    ]


def study_losses(models: tuple[str, ...] | list[str]) -> list[str]:
    return list(dict.fromkeys(loss for model in models for loss in MODEL_LOSSES[model]))


def trials_schema(spec: StudySpec) -> pa.Schema:
    losses = study_losses(spec.models)
    columns = [
        ("study", pa.string()),
        ("trial_id", pa.string()),
        *_config_columns(),
        ("status", pa.string()),
        ("error", pa.string()),
        ("diverged_at", pa.int64()),
        ("retries", pa.int64()),
        ("iterations_done", pa.int64()),
        ("wall_seconds", pa.float64()),
        ("started_at", pa.float64()),
        (SUGGESTION, pa.string()),
        *CONTEXT_COLUMNS.items(),
        *[(f"final_{name}", pa.float64()) for name in SUMMARY_METRICS],
        ("best_mode_entropy", pa.float64()),
        ("best_mean_image_entropy", pa.float64()),
        ("final_class_histogram", HISTOGRAM),
        *[(f"final_{loss}", pa.float64()) for loss in losses],
        *[(f"final_{name}", kind) for name, kind in ARRAYS.items()],
        *[(name, pa.string()) for name in (*PROVENANCE, "git_commit")],
    ]
    if spec.pack > 1:
        columns += [(PACK, pa.string()), (PACK_SEEDS, pa.list_(pa.int64()))]
    return pa.schema(columns)


def curves_schema(spec: StudySpec) -> pa.Schema:
    scalars = ("mode_entropy", "mean_image_entropy")
    timing = ("iterations_per_second", "eval_seconds")
    return pa.schema(
        [
            ("study", pa.string()),
            ("trial_id", pa.string()),
            ("model", pa.string()),
            ("iteration", pa.int64()),
            *[(name, pa.float64()) for name in scalars],
            ("class_histogram", HISTOGRAM),
            *[(name, pa.float64()) for name in (*SUMMARY_METRICS[2:], *timing)],
            *[(loss, pa.float64()) for loss in study_losses(spec.models)],
        ]
    )


@dataclass(frozen=True)
class Tables:
    """Where a study's tables are and what their columns are; handed to every trial."""

    uri: str
    study: str
    provenance: dict[str, Any]
    trials: pa.Schema
    curves: pa.Schema

    @classmethod
    def of(cls, spec: StudySpec, uri: str, provenance: dict[str, Any]) -> Tables:
        return cls(uri, spec.name, provenance, trials_schema(spec), curves_schema(spec))

    def store(self) -> ResultsStore:
        return ResultsStore(self.uri)


@dataclass
class MemberRows:
    """The rows of one trial, or of one member of a pack, as its checkpoint has them."""

    row_id: str
    fields: dict[str, Any]  # the resolved config, its suggestion and pack
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    status: Status = Status.RUNNING
    error: str | None = None
    diverged_at: int | None = None
    arrays: dict[str, Any] = dataclasses.field(default_factory=dict)  # of the last evaluation

    def trial_row(self, tables: Tables, context: dict[str, Any], timing: dict[str, float]) -> dict:
        row = {"study": tables.study, "trial_id": self.row_id, **self.fields}
        done = self.curve[-1]["iteration"] if self.curve else 0
        if self.diverged_at is not None:
            done = self.diverged_at - 1
        row.update(status=self.status.value, error=self.error, diverged_at=self.diverged_at)
        row.update(retries=0, iterations_done=done, **timing, **context, **tables.provenance)
        row.update({f"final_{name}": value for name, value in self.arrays.items()})
        if self.curve:
            last = self.curve[-1]
            row.update({f"final_{name}": last.get(name) for name in SUMMARY_METRICS})
            row["final_class_histogram"] = last["class_histogram"]
            row["best_mode_entropy"] = max(point["mode_entropy"] for point in self.curve)
            row["best_mean_image_entropy"] = min(p["mean_image_entropy"] for p in self.curve)
            losses = {k: v for k, v in last.items() if k.endswith("_loss")}
            row.update({f"final_{k}": v for k, v in losses.items() if is_finite_number(v)})
        return row

    def curve_rows(self, tables: Tables) -> list[dict[str, Any]]:
        head = dict(zip(CURVE_KEYS, (tables.study, self.row_id, self.fields["model"]), strict=True))
        return [{**head, **point} for point in self.curve]

    def write(self, tables: Tables, store: ResultsStore, context: dict, timing: dict) -> None:
        """Replace this trial's rows in both tables (the curve first: a reader of the trials
        table never sees an evaluation the curves lack)."""
        write_fragment(store, CURVES, tables.curves, self.row_id, self.curve_rows(tables))
        row = self.trial_row(tables, context, timing)
        write_fragment(store, TRIALS, tables.trials, self.row_id, [row])


def write_fragment(
    store: ResultsStore, table: str, schema: pa.Schema, row_id: str, rows: list[dict]
) -> None:
    """One trial's fragment of `table`, replaced whole (no rows: removed)."""
    FragmentedTable(store, table, schema).write_trial(row_id, rows)


def member_rows(trial_id: str, params: dict[str, Any]) -> list[MemberRows]:
    """A Tune trial's rows: its own, or one per member of a pack, with their fields."""
    pack: dict[str, Any] = {}
    if is_pack(params):
        pack = {PACK: trial_id, PACK_SEEDS: seeds_of(params)}
        if params.get(SUGGESTION) == PACKED_SUGGESTION:  # the replicates of one suggestion
            pack[SUGGESTION] = trial_id
    rows = []
    for row_id, fields in members(trial_id, params):
        fields = {**fields, **pack}
        extra = {key: fields.pop(key) for key in (SUGGESTION, PACK, PACK_SEEDS) if key in fields}
        config = TrialConfig.from_dict(fields).resolved().to_dict()
        rows.append(MemberRows(row_id, {**config, SUGGESTION: None, **extra}))
    return rows


# Each checkpoint holds the trial's rows as of that checkpoint (with the last evaluation's arrays
# in its last one), so a trial resumed from it writes the rows it had then, and the driver can
# rebuild rows that were lost or corrupted from the trial's newest checkpoint.
RECORD_FILE = "record.json"


def save_record(
    directory: str, rows: list[MemberRows], context: dict[str, Any], timing: dict[str, float]
) -> None:
    members = [
        {
            "curve": r.curve,
            "status": r.status.value,
            "error": r.error,
            "diverged_at": r.diverged_at,
            "arrays": r.arrays,
        }
        for r in rows
    ]
    record = {**timing, "context": context, "members": members}
    Path(directory, RECORD_FILE).write_text(json.dumps(record))


def load_record(directory: str, rows: list[MemberRows]) -> dict[str, Any]:
    """Fill `rows` from the record in a checkpoint folder; return its timing and context."""
    record = json.loads(Path(directory, RECORD_FILE).read_text())
    for row, member in zip(rows, record["members"], strict=True):
        row.curve, row.arrays = member["curve"], member["arrays"]
        row.status, row.error = Status(member["status"]), member["error"]
        row.diverged_at = member["diverged_at"]
    return record


class StudyTables(Callback):
    """The driver's part of the tables (see the module docstring)."""

    def __init__(self, tables: Tables, total: int, resumed: bool = False) -> None:
        self.tables = tables
        self.total = total  # Tune trials the study runs in all
        self.resumed = resumed  # Tune is to continue its saved state
        self.store = tables.store()
        self.reconciled = False

    def prepare(self, log: Callable[[str], None] = print) -> None:
        """Before any trial starts: finish an interrupted compaction, turn a compacted table back
        into a folder of fragments that trials can write, and learn which rows are stored (a
        fragment that cannot be read is removed, to be rebuilt)."""
        for name, schema in ((TRIALS, self.tables.trials), (CURVES, self.tables.curves)):
            FragmentedTable(self.store, name, schema).open_for_writing()
        try:
            curves = self.store.read_table(CURVES, ["trial_id"])
            stored = self.store.read_table(TRIALS, ["trial_id", "status"])
        except UnreadableTable:  # a fragment cut short (a crash, a full disk, a bad copy)
            for name in (TRIALS, CURVES):
                for path in unreadable_fragments(self.store, name):
                    log(f"{path} cannot be read; its rows are rebuilt from the trial's checkpoint")
                    self.store.fs.delete_file(path)
            curves = self.store.read_table(CURVES, ["trial_id"])
            stored = self.store.read_table(TRIALS, ["trial_id", "status"])
        columns = stored.to_pydict()
        self.stored = dict(zip(columns["trial_id"], columns["status"], strict=True))
        self.with_curve = set(curves.column("trial_id").to_pylist())

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.reconciled:
            self.reconciled = True
            self.reconcile(trials)

    def reconcile(self, trials: list) -> None:
        """Make the rows agree with Tune's saved state (what a resumed run starts from): drop
        rows of trials Tune does not know (started after its last snapshot: the searcher
        suggests them again under new ids), rebuild lost rows from each trial's newest
        checkpoint, and mark the trials Tune saw end after their own last write."""
        known = {m.row_id for trial in trials for m in member_rows(trial.trial_id, trial.config)}
        ended = sum(status in ENDED for status in self.stored.values())
        if self.resumed and ended and not known & set(self.stored):
            # Tune could not restore its saved state (a damaged searcher state, say) and began
            # the study over: dropping the rows it does not know would drop every result.
            experiment = join(self.tables.uri, EXPERIMENT)
            raise GvaeError(
                f"study: Tune could not restore {self.tables.study} from its saved state in "
                f"{experiment} (its error is above) and would start it over; the {ended} ended "
                "trials recorded are kept: restore that folder from a copy, or start the study "
                "afresh under another name"
            )
        for row_id in set(self.stored) - known:
            for name, schema in ((TRIALS, self.tables.trials), (CURVES, self.tables.curves)):
                FragmentedTable(self.store, name, schema).write_trial(row_id, [])
        for trial in trials:
            rows = member_rows(trial.trial_id, trial.config)
            # A trial with a checkpoint has evaluated: rows without a curve lost it.
            if any(not self._complete(row.row_id) for row in rows) and trial.checkpoint:
                self._rebuild(trial, rows)
            if any(self.stored.get(row.row_id) not in ENDED for row in rows):
                if trial.status == "ERROR":
                    self.on_trial_error(iteration=0, trials=trials, trial=trial)
                elif trial.status == "TERMINATED":
                    self._amend(trial, Outcome.of_trial(trial))

    def _complete(self, row_id: str) -> bool:
        return row_id in self.stored and row_id in self.with_curve

    def _rebuild(self, trial: Any, rows: list[MemberRows]) -> None:
        try:
            with trial.checkpoint.as_directory() as directory:
                record = load_record(directory, rows)
        except (OSError, ValueError, KeyError):  # gone or cut short: a trial that runs again
            return  # writes its rows itself, from wherever it resumes
        timing = {key: record[key] for key in ("wall_seconds", "started_at")}
        for row in rows:
            if row.row_id in self.stored:  # its curve alone was lost: the row stays as it is
                curve = row.curve_rows(self.tables)
                write_fragment(self.store, CURVES, self.tables.curves, row.row_id, curve)
            else:
                row.write(self.tables, self.store, record["context"], timing)
                self.stored[row.row_id] = row.status.value
            self.with_curve.add(row.row_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        outcome = Outcome.of_trial(trial)
        if outcome.status is not Status.FINISHED or trial.num_failures:
            self._amend(trial, outcome)  # else the trial's own last write says it all
        if outcome.status is Status.FINISHED and trial.num_failures:
            _remove_error_files(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._amend(trial, Outcome(Status.FAILED, trial_error(trial)))

    def _amend(self, trial: Any, outcome: Outcome) -> None:
        """Give each row of the trial still marked running the outcome, and record the trial's
        retries; rows that need neither are left as the trial wrote them."""
        table = FragmentedTable(self.store, TRIALS, self.tables.trials)
        for member in member_rows(trial.trial_id, trial.config):
            stored = table.read_trial(member.row_id)
            row = stored[0] if stored else member.trial_row(self.tables, {}, {})
            before = dict(row)
            if row["status"] not in ENDED:
                row.update(status=outcome.status.value, error=outcome.error)
                row["diverged_at"] = outcome.diverged_at
            row["retries"] = trial.num_failures
            if row != before:
                table.write_trial(member.row_id, [row])
            self.stored[member.row_id] = row["status"]

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Compact once the study is complete: every trial it will run has ended."""
        ended = all(ended_in_tune(trial) for trial in trials)
        if ended and len(trials) >= self.total:
            compact(self.store, self.tables)


def _remove_error_files(trial: Any) -> None:
    """Tune's files of a finished trial's failed attempts, in its folder on the driver and in
    storage: they would tell whoever opens the folder that it failed (`retries` counts them)."""
    storage = trial.storage
    for name in (EXPR_ERROR_FILE, EXPR_ERROR_PICKLE_FILE):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(trial.local_path, name))
        with contextlib.suppress(OSError):
            storage.storage_filesystem.delete_file(f"{storage.trial_fs_path}/{name}")


def unreadable_fragments(store: ResultsStore, table: str) -> list[str]:
    """The fragments of a table's folder that are no Parquet file."""
    return [path for path in store.fragment_paths(table) if not readable_parquet(store, path)]


def compact(store: ResultsStore, tables: Tables) -> None:
    FragmentedTable(store, TRIALS, tables.trials).compact()
    FragmentedTable(store, CURVES, tables.curves).compact()
