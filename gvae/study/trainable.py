"""The Ray Tune function trainable: the core trainer, reporting evaluations with checkpoints."""

from __future__ import annotations

import json
import math
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from ray import tune

from gvae.config import TrialConfig
from gvae.divergence import Diverged
from gvae.errors import GvaeError
from gvae.evaluator import Evaluator
from gvae.study.checkpoints import newest_checkpoint
from gvae.study.packs import is_pack, members
from gvae.study.replicates import SUGGESTION
from gvae.trainer import resolve_device, run_pack, run_trial


def train_trial(params: dict[str, Any], evaluator_states: dict[str, dict[str, Any]]) -> None:
    """Run one trial (or pack, gvae.study.packs) under Ray Tune, resuming from the trial's
    checkpoint after a failure.

    `evaluator_states`: the evaluator of each dataset of the study, by dataset name."""
    params = {key: value for key, value in params.items() if key != SUGGESTION}
    configs = [TrialConfig.from_dict(fields).validate() for _, fields in members("", params)]
    device = resolve_device(configs[0].device)
    evaluator = _cached_evaluator(evaluator_states[configs[0].dataset], device)
    context = _context(device, evaluator)
    train = (
        _lone_trainer(configs[0], context)
        if not is_pack(params)
        else _pack_trainer(configs, context)
    )

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        checkpoint = _catch_up(checkpoint, context)
    try:
        if checkpoint is None:
            train(None, evaluator)
        else:
            with checkpoint.as_directory() as directory:
                train(Path(directory), evaluator)
    except Diverged as error:
        # Not retried: the same config and seed would diverge again at the same iteration.
        tune.report({**context, **_divergence(error)})
    except Exception as error:
        reason = permanent_failure(error)
        if reason is None:
            raise  # Tune retries it from the last checkpoint, up to max_failures times
        # Tune retries every exception a trial raises; ending the trial with this report is the
        # only way to fail it at once. The recorder marks it failed, the searcher as FAIL.
        tune.report({**context, "failed_error": reason})


def _context(device: torch.device, evaluator: Evaluator) -> dict[str, Any]:
    """What every result of the trial carries besides its metrics."""
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


Train = Callable[[Path | None, Evaluator], None]  # (checkpoint to resume from, evaluator)


def _report(result: dict[str, Any], context: dict[str, Any], checkpoint_dir: Path) -> None:
    (checkpoint_dir / RESULT_FILE).write_text(json.dumps(result, default=str))
    tune.report({**result, **context}, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))


def _lone_trainer(config: TrialConfig, context: dict[str, Any]) -> Train:
    def report(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        _report(move_arrays_into_checkpoint(metrics, checkpoint_dir), context, checkpoint_dir)

    def train(resume_from: Path | None, evaluator: Evaluator) -> None:
        run_trial(config, report=report, resume_from=resume_from, evaluator=evaluator, log=_quiet)

    return train


def _pack_trainer(configs: list[TrialConfig], context: dict[str, Any]) -> Train:
    """A pack reports its members' metrics as a list under MEMBERS, with their means (what
    Tune's progress shows); a member that diverged reports that instead."""
    reported = {"iteration": 0}

    def report(rows: list[dict[str, Any]], checkpoint_dir: Path) -> None:
        arrays = [{key: row[key] for key in ARRAY_KEYS if key in row} for row in rows]
        if any(arrays):
            (checkpoint_dir / ARRAYS_FILE).write_text(json.dumps({MEMBERS: arrays}))
        scalars = [{k: v for k, v in row.items() if k not in ARRAY_KEYS} for row in rows]
        reported["iteration"] = max(row.get("iteration", 0) for row in scalars)
        _report(pack_result(scalars), context, checkpoint_dir)

    def train(resume_from: Path | None, evaluator: Evaluator) -> None:
        outcomes = run_pack(
            configs, report=report, resume_from=resume_from, evaluator=evaluator, log=_quiet
        )
        if any(o.diverged and o.diverged.iteration > reported["iteration"] for o in outcomes):
            # Members diverged after the last report, so the pack ended without telling.
            rows = [_divergence(o.diverged) if o.diverged else {} for o in outcomes]
            tune.report({**pack_result(rows), **context})

    return train


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _divergence(error: Diverged) -> dict[str, Any]:
    return {"diverged_at": error.iteration, "diverged_error": str(error)}


MEMBERS = "members"  # a pack's result: one metrics dict per member ({} when it has no news)


def pack_result(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A pack's result: its members' rows; the mean of each metric over the members that give
    it a finite value (what Tune's progress and an Optuna searcher see, as the mean over seed
    replicates); and a divergence once every member diverged."""
    training = [row for row in rows if "iteration" in row]
    result: dict[str, Any] = {MEMBERS: rows}
    if training:
        result["iteration"] = training[0]["iteration"]
        for name in training[0]:
            finite = [row[name] for row in training if _is_finite_number(row.get(name))]
            if finite and name != "iteration":
                result[name] = sum(finite) / len(finite)
    elif all("diverged_at" in row for row in rows):
        result["diverged_at"] = max(row["diverged_at"] for row in rows)
        result["diverged_error"] = "every member of the pack diverged"
    return result


def _catch_up(checkpoint: tune.Checkpoint, context: dict[str, Any]) -> tune.Checkpoint:
    """The checkpoint to resume from: the trial's newest, which a killed driver's last snapshot
    (Tune's `checkpoint`) may predate by one evaluation. That evaluation is reported again, with
    its checkpoint, so the tables and Tune's own record catch up (the recorder keeps one row per
    iteration, so a repeat of one it saw replaces it)."""
    newest = newest_checkpoint(checkpoint)
    if newest.path == checkpoint.path:
        return checkpoint
    with tempfile.TemporaryDirectory(prefix="gvae-catch-up-") as directory:
        newest.to_directory(directory)
        saved = Path(directory) / RESULT_FILE
        if not saved.exists():  # a checkpoint from before results were saved with them
            return newest
        result = json.loads(saved.read_text())
        tune.report({**result, **context}, checkpoint=tune.Checkpoint.from_directory(directory))
    return newest


# Each checkpoint holds the scalars of the evaluation it was saved with, to report it again.
RESULT_FILE = "result.json"

# The final evaluation's per-image arrays (10,000 entropies, the sample grid) travel in the
# checkpoint, not in the result: Tune keeps each trial's last result and its checkpoint's result in
# every snapshot of its experiment state, which it writes after each trial checkpoint, so arrays in
# results would make each snapshot, and the driver's time per event, grow with the study.
ARRAY_KEYS = ("image_entropies", "sample_labels", "samples_png")
ARRAYS_FILE = "final_arrays.json"


def move_arrays_into_checkpoint(metrics: dict[str, Any], checkpoint_dir: Path) -> dict[str, Any]:
    """The metrics without their arrays, which are written to the checkpoint's ARRAYS_FILE."""
    arrays = {key: metrics[key] for key in ARRAY_KEYS if key in metrics}
    if arrays:
        (checkpoint_dir / ARRAYS_FILE).write_text(json.dumps(arrays))
    return {key: value for key, value in metrics.items() if key not in arrays}


def read_checkpoint_arrays(checkpoint: tune.Checkpoint) -> dict[str, Any]:
    """The arrays a trial put in this checkpoint ({} when it holds none)."""
    path = f"{checkpoint.path}/{ARRAYS_FILE}"
    if checkpoint.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return {}
    with checkpoint.filesystem.open_input_stream(path) as stream:
        return json.loads(stream.readall())


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


def _quiet(_line: str) -> None:
    """Tune's progress table replaces the trainer's per-evaluation lines."""
