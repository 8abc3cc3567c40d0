"""How many checkpoints a study keeps (two per running trial, one per ended trial), and which one
a restarted trial resumes from.

Tune forces a snapshot of its whole experiment state whenever a trial has saved `num_to_keep`
checkpoints since the last snapshot (so that the snapshot never points at a checkpoint it deleted).
A snapshot holds every trial, so with `num_to_keep=1` each evaluation of each trial rewrote a state
that grows with the study: quadratic driver time. With two kept, a trial forces a snapshot only
when it checkpoints twice within one snapshot period (10 s or more), and a study of short trials
is snapshotted on Tune's own clock.

The price: after a killed driver, Tune's last snapshot may point at a trial's checkpoint before
its newest. Training is deterministic, so the newest complete checkpoint of the trial's folder is
the same run further on: a trial resumes from it (`newest_checkpoint`), and one that had finished
is not trained again. Ended trials are trimmed to that newest checkpoint when the driver's run
ends, after Tune's final snapshot.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pyarrow.fs as pafs
from ray import tune
from ray.tune import Callback

from gvae.io import CHECKPOINT_FILE

KEPT_WHILE_RUNNING = 2


class KeepLastCheckpoint(Callback):
    """When a driver's run of a study ends, delete every checkpoint of an ended trial but its
    newest.

    Ended means Tune reported the trial complete or failed for good. Status alone would not do:
    an interrupted run marks its running trials TERMINATED, yet the saved state resumes them from
    the checkpoint it points at, which must stay."""

    def __init__(self) -> None:
        self.ended: set[str] = set()
        self.looked_at_restored = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.looked_at_restored:  # trials a resumed study's saved state says have ended
            self.ended.update(t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR"))
            self.looked_at_restored = True

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)  # called once retries are spent; resume leaves it failed

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            if trial.trial_id in self.ended and trial.checkpoint is not None:
                with contextlib.suppress(OSError):  # disk space only: never fail a study for it
                    delete_older_checkpoints(trial.checkpoint.filesystem, trial.checkpoint.path)


def complete_checkpoints(filesystem: pafs.FileSystem, any_checkpoint: str) -> list[str]:
    """The `checkpoint_*` folders of a trial that hold a checkpoint file, oldest first.

    Files appear whole (S3 objects; Tune's local filesystem here writes each file whole), so a
    folder with the file is a checkpoint a trial can resume from."""
    folder = any_checkpoint.rstrip("/").rpartition("/")[0]
    selector = pafs.FileSelector(folder, allow_not_found=True)
    candidates = sorted(
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )
    files = filesystem.get_file_info([f"{path}/{CHECKPOINT_FILE}" for path in candidates])
    return [path for path, info in zip(candidates, files, strict=True) if info.size]


def newest_checkpoint(checkpoint: tune.Checkpoint) -> tune.Checkpoint:
    """The trial's newest complete checkpoint, which may be newer than the one Tune restored."""
    try:
        found = complete_checkpoints(checkpoint.filesystem, checkpoint.path)
    except OSError:  # storage briefly unreachable: Tune's own choice still resumes the trial
        return checkpoint
    if not found or found[-1].rstrip("/") == checkpoint.path.rstrip("/"):
        return checkpoint
    return tune.Checkpoint(found[-1], filesystem=checkpoint.filesystem)


def delete_older_checkpoints(filesystem: pafs.FileSystem, any_checkpoint: str) -> list[str]:
    """Delete a trial's `checkpoint_*` folders but its newest complete one; return the deleted."""
    complete = complete_checkpoints(filesystem, any_checkpoint)
    if not complete:
        return []
    folder = any_checkpoint.rstrip("/").rpartition("/")[0]
    selector = pafs.FileSelector(folder, allow_not_found=True)
    deleted = []
    for info in filesystem.get_file_info(selector):
        if (
            info.type == pafs.FileType.Directory
            and info.base_name.startswith("checkpoint_")
            and info.path != complete[-1]
        ):
            filesystem.delete_dir(info.path)
            deleted.append(info.path)
    return deleted
