"""How a trial ended: one `Status` and one `Outcome` record, written and read here alone.

A trial (gvae.study.trainable) that ends without finishing, because it diverged or hit an error
retrying cannot fix, reports its outcome once, with every objective as NaN: Tune's metric check
passes, ASHA skips the value, and Optuna records a NaN objective as a FAIL trial, so no wrapper
of the searcher or the scheduler is needed and no value is made up.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from gvae.study.spec import METRICS

OUTCOME_KEY = "outcome"  # the result key of a trial's last report when it did not finish
# The result key of what a trial tells the study besides its metrics (a checkpoint it could not
# read), printed as a line of its own.
NOTICE_KEY = "notice"
# The result key of how many members of a pack have diverged so far; the rest train on.
DIVERGED_MEMBERS_KEY = "diverged_members"


class Status(str, Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"  # after its retries, or at once for an error retrying cannot fix
    DIVERGED = "diverged"  # a loss turned NaN or infinite
    STOPPED = "stopped"  # ended early by the scheduler

    @property
    def ended(self) -> bool:
        return self is not Status.RUNNING


ENDED = tuple(status.value for status in Status if status.ended)


def ended_in_tune(trial: Any) -> bool:
    """Whether Tune will not run the trial again: it terminated, or failed its last retry."""
    return trial.status in ("TERMINATED", "ERROR")


@dataclass(frozen=True)
class Outcome:
    status: Status
    error: str | None = None
    diverged_at: int | None = None

    def result(self) -> dict[str, Any]:
        """What the trial reports to Tune: the outcome and every objective as NaN."""
        record = {**asdict(self), "status": self.status.value}
        return {OUTCOME_KEY: record, **dict.fromkeys(METRICS, math.nan)}

    @classmethod
    def of_trial(cls, trial: Any) -> Outcome:
        """How a Tune trial ended, from its last result: the outcome it reported, else finished
        when it reached its iterations, else stopped by the scheduler."""
        result = trial.last_result or {}
        record = result.get(OUTCOME_KEY)
        if record:
            return cls(Status(record["status"]), record.get("error"), record.get("diverged_at"))
        done = result.get("iteration") == trial.config.get("iterations")
        return cls(Status.FINISHED if done else Status.STOPPED)


def diverged_members(trial: Any) -> int:
    """How many members of a pack trial diverged while the others trained on (0 for a trial
    that is no pack)."""
    return int((trial.last_result or {}).get(DIVERGED_MEMBERS_KEY, 0))


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def trial_error(trial: Any) -> str:
    """The exception and message of a Tune trial's latest error."""
    return error_line(trial_error_text(trial))


def trial_error_text(trial: Any) -> str:
    """A Tune trial's errors so far, read from its error file on the driver, which Tune writes
    before it calls the callbacks: `get_error` reads the copy in storage, which arrives later
    (and said nothing at a trial's first retry)."""
    path = trial.error_file
    if path and os.path.isfile(path):
        return Path(path).read_text()
    return str(trial.get_error() or "")


def error_line(error: Any) -> str:
    """The exception and its message: the last non-empty line of a traceback."""
    lines = [line for line in str(error or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "error"
