"""The Ray Tune function trainable: the core trainer, reporting evaluations with checkpoints and
writing the trial's own rows of the study tables (gvae.study.tables) as it goes."""

from __future__ import annotations

import json
import socket
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.result import TIMESTEPS_TOTAL

from gvae.config import TrialConfig
from gvae.divergence import Diverged
from gvae.errors import GvaeError
from gvae.evaluation import Evaluator
from gvae.io import readable_checkpoint
from gvae.study.faults import check_shared
from gvae.study.outcome import (
    DIVERGED_MEMBERS_KEY,
    NOTICE_KEY,
    Outcome,
    Status,
    is_finite_number,
)
from gvae.study.packs import is_pack, members
from gvae.study.results import CURVES, TRIALS, FragmentedTable
from gvae.study.tables import (
    ARRAYS,
    CURVE_KEYS,
    RECORD_FILE,
    SUGGESTION,
    MemberRows,
    Tables,
    load_record,
    member_rows,
    save_record,
)
from gvae.trainer import TrialOutcome, cpu_threads, resolve_device, run_pack, run_trial

# torch's threads as the worker process started: Ray sets them to a trial's CPUs.
WORKER_THREADS = torch.get_num_threads()


class TrialRecord:
    """The rows of one Tune trial (one per pack member) and where they are written."""

    def __init__(self, tables: Tables, rows: list[MemberRows], context: dict[str, Any]) -> None:
        self.tables = tables
        self.store = tables.store()
        self.rows = rows
        self.context = context
        self.started_at = time.time()
        # Training time up to the last report: by earlier runs of the trial before its
        # checkpoint, then this one's. A trial resumed at its end (a killed driver had not
        # recorded it ended) so writes the same time again.
        self.earlier_seconds = self.wall_seconds = 0.0
        self.clock = time.monotonic()
        self.notice: str | None = None  # told with the next report

    def restore(self, directory: Path) -> None:
        record = load_record(str(directory), self.rows)
        self.started_at, self.earlier_seconds = record["started_at"], record["wall_seconds"]
        self.wall_seconds = self.earlier_seconds

    def save(self, directory: Path) -> None:
        save_record(str(directory), self.rows, self.context, self.timing())

    def clock_in(self) -> None:
        self.wall_seconds = self.earlier_seconds + time.monotonic() - self.clock

    def timing(self) -> dict[str, float]:
        return {"wall_seconds": self.wall_seconds, "started_at": self.started_at}

    def write(self) -> None:
        for row in self.rows:
            row.write(self.tables, self.store, self.context, self.timing())

    def trainer_line(self, line: str) -> None:
        """The study's lines replace the trainer's, but for its step falling back to eager
        (gvae.graphs), which is told with the next report."""
        if line.startswith("graph:"):
            self.notice = line

    def note(self, row: MemberRows, metrics: dict[str, Any]) -> None:
        """A member's report: its newest evaluation, or its divergence."""
        if "diverged_at" in metrics:
            row.status, row.error = Status.DIVERGED, metrics["diverged_error"]
            row.diverged_at = metrics["diverged_at"]
            return
        point = {key: value for key, value in metrics.items() if key not in ARRAYS}
        row.curve = [p for p in row.curve if p["iteration"] < point["iteration"]] + [point]
        row.arrays = {key: metrics[key] for key in ARRAYS if key in metrics}  # at the last one

    def end(self, outcomes: list[TrialOutcome]) -> None:
        """The trainer's outcomes: each member's whole curve and last arrays.

        Written once the last report has returned, when Tune has the trial's last result: rows
        that said `finished` before Tune knew it would count a trial done that a study stopped
        meanwhile resumes as unfinished (its own rows then end it without training)."""
        for row, outcome in zip(self.rows, outcomes, strict=True):
            row.curve = outcome.curve
            row.arrays = {key: outcome.final[key] for key in ARRAYS if key in outcome.final}
            if outcome.diverged is None:
                row.status = Status.FINISHED
            elif row.status is not Status.DIVERGED:
                self.note(row, _divergence(outcome.diverged))
        self.write()

    def stop(self, outcome: Outcome) -> None:
        """The trial ends without finishing: its rows and its last report say how."""
        self.clock_in()
        for row in self.rows:
            if not row.status.ended:
                row.status, row.error = outcome.status, outcome.error
                row.diverged_at = outcome.diverged_at
        self.write()
        tune.report({**self.context, **outcome.result()})


def train_trial(
    params: dict[str, Any], evaluator_states: dict[str, dict[str, Any]], tables: Tables
) -> None:
    """Run one trial (or pack, gvae.study.packs) under Ray Tune, resuming from the trial's
    checkpoint after a failure or an interrupted study.

    `evaluator_states`: the evaluator of each dataset of the study, by dataset name."""
    fields = {key: value for key, value in params.items() if key != SUGGESTION}
    configs = [TrialConfig.from_dict(member).validate() for _, member in members("", fields)]
    device = resolve_device(configs[0].device)
    torch.set_num_threads(cpu_threads(configs[0], device, WORKER_THREADS))  # a reused worker too
    evaluator = _cached_evaluator(evaluator_states[configs[0].dataset], device)
    context = _context(device, evaluator)
    record = TrialRecord(tables, member_rows(tune.get_context().get_trial_id(), params), context)
    check_shared(record.store, ray.util.get_node_ip_address())  # before it reads or writes rows
    finished = _finished_result(record)
    if finished is not None:
        tune.report({**finished, **context})
        return
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext() as directory:
        resume_from = Path(directory) if directory else None
        if resume_from is not None and not any(resume_from.iterdir()):
            resume_from = None  # every checkpoint was gone: the driver said so (compat)
        if resume_from is not None and not _readable(resume_from):
            record.notice = f"checkpoint {checkpoint.path} cannot be read; the trial starts over"
            resume_from = None
        if resume_from is not None:
            record.restore(resume_from)
        record.write()
        try:
            _train(configs, is_pack(params), record, resume_from, evaluator)
        except Diverged as error:
            # Not retried: the same config and seed would diverge again at the same iteration.
            record.stop(Outcome(Status.DIVERGED, str(error), error.iteration))
        except Exception as error:
            reason = permanent_failure(error)
            if reason is None:
                raise  # Tune retries it from the last checkpoint, up to max_failures times
            # Tune retries every exception a trial raises; ending the trial with this report is
            # the only way to fail it at once.
            record.stop(Outcome(Status.FAILED, reason))


def _train(
    configs: list[TrialConfig],
    packed: bool,
    record: TrialRecord,
    resume_from: Path | None,
    evaluator: Evaluator,
) -> None:
    def report(rows: list[dict[str, Any]], checkpoint_dir: Path) -> None:
        for row, metrics in zip(record.rows, rows, strict=True):
            record.note(row, metrics)
        record.clock_in()
        record.save(checkpoint_dir)
        record.write()
        result = {**mean_scalars(rows), **record.context}
        if packed:  # each member's own scalars too, for Tune's loggers (TensorBoard, MLflow)
            seeds = (config.seed for config in configs)
            result["members"] = {
                f"seed{seed}": mean_scalars([row]) for seed, row in zip(seeds, rows, strict=True)
            }
            result[DIVERGED_MEMBERS_KEY] = sum("diverged_at" in row for row in rows)
        if record.notice:
            result[NOTICE_KEY], record.notice = record.notice, None
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    if not packed:
        outcome = run_trial(
            configs[0],
            report=lambda metrics, where: report([metrics], where),
            resume_from=resume_from,
            evaluator=evaluator,
            log=record.trainer_line,
        )
        record.end([outcome])
        return
    outcomes = run_pack(
        configs,
        report=report,
        resume_from=resume_from,
        evaluator=evaluator,
        log=record.trainer_line,
    )
    record.end(outcomes)
    if all(outcome.diverged for outcome in outcomes):
        last = max(outcome.diverged.iteration for outcome in outcomes if outcome.diverged)
        record.stop(Outcome(Status.DIVERGED, "every member of the pack diverged", last))


def mean_scalars(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What Tune (its progress, the scheduler, an Optuna searcher) sees of an evaluation: each
    scalar, averaged over the pack's members that give it a finite value."""
    training = [row for row in rows if "iteration" in row]
    if not training:  # every member diverged: the pack's last report says so
        return {}
    iteration = training[0]["iteration"]
    # Tune's loggers step by timesteps_total when a result has it: the trainer's iteration.
    result: dict[str, Any] = {"iteration": iteration, TIMESTEPS_TOTAL: iteration}
    for name in training[0]:
        finite = [row[name] for row in training if is_finite_number(row.get(name))]
        if finite and name != "iteration":
            result[name] = sum(finite) / len(finite)
    return result


def _finished_result(record: TrialRecord) -> dict[str, Any] | None:
    """The last evaluation of a trial whose own rows say that every member finished, else None.

    A driver killed after a trial's last write, before Tune's next snapshot of its state,
    restores the trial from an older checkpoint, or from none if that snapshot named none yet;
    its rows already hold the whole run, so the trial reports that run's last evaluation again,
    without fetching a checkpoint or training. For a new trial, which has no rows, the check
    costs one look for a missing file."""
    trials = FragmentedTable(record.store, TRIALS, record.tables.trials)
    curves = FragmentedTable(record.store, CURVES, record.tables.curves)
    last_points = []
    try:
        for row in record.rows:
            stored = trials.read_trial(row.row_id)
            if not stored or stored[0]["status"] != Status.FINISHED.value:
                return None
            curve = curves.read_trial(row.row_id)
            if not curve:
                return None
            last = max(curve, key=lambda point: point["iteration"])
            last_points.append({k: v for k, v in last.items() if k not in CURVE_KEYS})
    except (OSError, GvaeError):  # unreadable rows: the trial trains from its checkpoint
        return None
    return mean_scalars(last_points)


def _divergence(error: Diverged) -> dict[str, Any]:
    return {"diverged_at": error.iteration, "diverged_error": str(error)}


def _readable(directory: Path) -> bool:
    """Whether a checkpoint's files can be read: one cut short by a crash would fail every retry
    the same way, so the trial starts over instead."""
    try:
        json.loads((directory / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return readable_checkpoint(directory)


def _context(device: torch.device, evaluator: Evaluator) -> dict[str, Any]:
    """What every row and result of the trial carries besides its metrics."""
    return {
        "device_used": str(device),
        "node": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),  # tells apart nodes on one host
        "threads": torch.get_num_threads(),
        "evaluator_accuracy": evaluator.accuracy,
        "real_mode_entropy": evaluator.reference.mode_entropy,
        "real_mean_image_entropy": evaluator.reference.mean_image_entropy,
        **evaluator.real_columns(),  # modes covered, KL to uniform, classifier score
        # What mode_entropy counts on face data (joint attribute values); None for classes.
        "mode_attributes": " x ".join(evaluator.mode_attributes) or None,
    }


# Messages of errors that the same trial on the same node hits again however often it runs.
PERMANENT_MESSAGES = {
    "not enough memory": "a batch or model that cannot be allocated",
    "can't allocate memory": "a batch or model that cannot be allocated",
    "out of memory": "a batch or model that cannot be allocated",
    "Found no NVIDIA driver": "no CUDA driver on the node",
    "no CUDA GPUs are available": "no CUDA device visible to the trial",
    "Torch not compiled with CUDA": "a torch build without CUDA",
    "CUDA driver version is insufficient": "a CUDA driver too old for torch",
}


def permanent_failure(error: BaseException) -> str | None:
    """A one-line reason when retrying cannot fix the error, else None (retry it).

    Out of memory, a missing or unusable CUDA driver and a config the trainer refuses (GvaeError)
    fail the same way on every retry. Everything else (a lost node, a killed worker, storage that
    was briefly unreachable) is worth retrying from the last checkpoint.
    """
    text = str(error).strip().splitlines()
    last = text[-1].strip() if text else type(error).__name__
    if isinstance(error, GvaeError):
        return f"not retried: {last}"
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return f"not retried ({PERMANENT_MESSAGES['out of memory']}): {last}"
    for marker, what in PERMANENT_MESSAGES.items():
        if marker in str(error):
            return f"not retried ({what}): {last}"
    return None


_EVALUATORS: dict[tuple[str, str], Evaluator] = {}


def _cached_evaluator(state: dict[str, Any], device: torch.device) -> Evaluator:
    """One evaluator per worker process and device: Tune reuses a worker for trial after trial,
    and rebuilding the classifier took 45 ms of each 0.35 s trial of a study of tiny trials.
    Measuring does not change an evaluator, so trials can share it."""
    key = (str(state["key"]), str(device))
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator.from_state(state, device=device)
    return _EVALUATORS[key]
