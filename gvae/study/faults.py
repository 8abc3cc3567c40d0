"""Storage faults as one line with the fix.

A full disk stops the study (exit status 2) with the path and the command that continues it once
there is room; an S3 bucket that is wrong or refuses the credentials stops it before training; a
store that stops answering is retried for minutes (gvae.io.RetryingS3FileSystem), then stops the
study with the command that continues it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

from gvae.errors import GvaeError
from gvae.io import S3_ATTEMPTS, StorageFull, first_line, is_full, unreachable
from gvae.study.folder import SPEC_FILE
from gvae.study.outcome import error_line, trial_error_text
from gvae.study.results import ResultsStore

NOT_SHARED = "is not shared with the node"  # marks the error of check_shared


def resume_command(name: str, storage: str, address: str | None) -> str:
    """The gvae command that continues this study from wherever it is run."""
    command = f"gvae study resume {name}"
    if storage != "results":
        command += f" --storage {storage if '://' in storage else Path(storage).resolve()}"
    return command + (f" --address {address}" if address else "")


def check_shared(store: ResultsStore, node: str) -> None:
    """On a Ray node where the study folder, a local path, is missing, raise the error that
    stops the study (StopWhenStorageFails): the node does not mount the driver's folder, and the
    trial's rows and checkpoints would go to the node's own disk, where nobody reads them."""
    if store.local and not store.exists(SPEC_FILE):  # the driver wrote it before Tune began
        raise GvaeError(
            f"storage: {store.uri} {NOT_SHARED} at {node}, where a trial ran; a study on a Ray "
            "cluster needs storage every node reaches: pass --storage s3://BUCKET/PATH, or a "
            "folder every node mounts"
        )


class StopWhenStorageFails(Callback):
    """Stop the study when a trial failed because the storage is full, did not answer, or is a
    local folder the trial's node does not share.

    Retrying cannot help until there is room, or until the store is back (its every request has
    been retried for minutes already: gvae.io.S3_ATTEMPTS), and a trial that used up its retries
    would be recorded as failed and never resumed; stopping at the first such error keeps it
    unfinished, so `gvae study resume` continues it from its last checkpoint.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def _check(self, trial: Any) -> None:
        error = trial_error_text(trial)
        not_shared = next((line for line in error.splitlines() if NOT_SHARED in line), None)
        if not_shared is not None:  # check_shared's message, after the exception's name
            raise GvaeError(not_shared[not_shared.index("storage: ") :])
        if "No space left on device" in error:
            raise StorageFull(self.uri)
        if "://" in self.uri and unreachable(error):
            raise ConnectionError(f"a trial's storage request failed: {error_line(error)}")


@contextlib.contextmanager
def storage_errors(uri: str, resume: str) -> Iterator[None]:
    """Storage failures as one line: a full disk says how to continue, others what to check."""
    try:
        yield
    except OSError as error:
        if is_full(error):
            where = error.location if isinstance(error, StorageFull) else uri
            raise GvaeError(
                f"storage: no space left on device writing {where}; free space there, then "
                f"`{resume}` continues the study"
            ) from None
        if "://" not in uri:
            raise
        first = first_line(error)
        if unreachable(str(error)):
            raise GvaeError(
                f"storage: {uri} did not answer through {S3_ATTEMPTS} attempts of a request "
                f"({first}); nothing is lost: once it answers, `{resume}` continues the study"
            ) from None
        raise GvaeError(
            f"storage: cannot use {uri}: {first}; check the bucket name, the credentials "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and endpoint_override (docs/cluster.md)"
        ) from None
