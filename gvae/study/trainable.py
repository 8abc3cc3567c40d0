"""The Ray Tune function trainable: the core trainer, reporting evaluations with checkpoints."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from gvae.config import TrialConfig
from gvae.errors import GvaeError
from gvae.evaluator import Evaluator
from gvae.study.replicates import SUGGESTION
from gvae.trainer import Diverged, resolve_device, run_trial


def train_trial(params: dict[str, Any], evaluator_state: dict[str, Any]) -> None:
    """Run one trial under Ray Tune, resuming from the trial's checkpoint after a failure."""
    params = {key: value for key, value in params.items() if key != SUGGESTION}
    config = TrialConfig.from_dict(params).validate()
    device = resolve_device(config.device)
    evaluator = Evaluator.from_state(evaluator_state, device=device)
    context = {
        "device_used": str(device),
        "node": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),  # tells apart nodes on one host
        "threads": torch.get_num_threads(),
        "evaluator_accuracy": evaluator.accuracy,
        "real_mode_entropy": evaluator.reference.mode_entropy,
        "real_mean_image_entropy": evaluator.reference.mean_image_entropy,
        # What mode_entropy counts on face data (joint attribute values); None for classes.
        "mode_attributes": " x ".join(evaluator.mode_attributes) or None,
    }

    def report(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        tune.report(
            {**metrics, **context}, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir)
        )

    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is None:
            run_trial(config, report=report, evaluator=evaluator, log=_quiet)
        else:
            with checkpoint.as_directory() as directory:
                run_trial(
                    config,
                    report=report,
                    resume_from=Path(directory),
                    evaluator=evaluator,
                    log=_quiet,
                )
    except Diverged as error:
        # Not retried: the same config and seed would diverge again at the same iteration.
        tune.report({**context, "diverged_at": error.iteration, "diverged_error": str(error)})
    except Exception as error:
        reason = permanent_failure(error)
        if reason is None:
            raise  # Tune retries it from the last checkpoint, up to max_failures times
        # Tune retries every exception a trial raises; ending the trial with this report is the
        # only way to fail it at once. The recorder marks it failed, the searcher as FAIL.
        tune.report({**context, "failed_error": reason})


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


def _quiet(_line: str) -> None:
    """Tune's progress table replaces the trainer's per-evaluation lines."""
