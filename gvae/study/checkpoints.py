"""How many checkpoints a study keeps: two per running trial, one per ended trial.

Tune forces a snapshot of its whole experiment state whenever a trial has saved `num_to_keep`
checkpoints since the last snapshot (so that the snapshot never points at a checkpoint it deleted).
A snapshot holds every trial, so with `num_to_keep=1` each evaluation of each trial rewrote a state
that grows with the study: quadratic driver time. With two kept, a trial forces a snapshot only
when it checkpoints twice within one snapshot period (10 s or more), and a study of short trials
is snapshotted on Tune's own clock. Ended trials are trimmed to their last checkpoint when the
study ends, after Tune's final snapshot, which no longer lists them as running.
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs
from ray.tune import Callback

KEPT_WHILE_RUNNING = 2
ENDED_STATUSES = ("TERMINATED", "ERROR")


class KeepLastCheckpoint(Callback):
    """At the end of a study (or of a driver's run of it), delete every checkpoint of an ended
    trial but its last."""

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            if trial.status in ENDED_STATUSES and trial.checkpoint is not None:
                delete_older_checkpoints(trial.checkpoint.filesystem, trial.checkpoint.path)


def delete_older_checkpoints(filesystem: pafs.FileSystem, latest: str) -> list[str]:
    """Delete the `checkpoint_*` folders beside `latest` except it; return what was deleted."""
    folder, _, name = latest.rstrip("/").rpartition("/")
    siblings = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    deleted = []
    for info in siblings:
        if (
            info.type == pafs.FileType.Directory
            and info.base_name.startswith("checkpoint_")
            and info.base_name != name
        ):
            filesystem.delete_dir(info.path)
            deleted.append(info.path)
    return deleted
