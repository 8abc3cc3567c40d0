"""What `gvae study run` prints while a study runs: one line per ended trial and a progress line.

On a terminal the progress line is redrawn in place (carriage return, erase line) and trial lines
scroll above it; in a log (stdout not a terminal) the progress line is printed as plain text once
every `log_every` seconds, so a study of N trials prints about N lines. Tune's own tables are
only shown with `--verbose`. Every count is of trials as the tables count them: a pack (one Tune
trial of K seeds, gvae.study.packs) counts K, and its one line advances the counter by K.

    [ 12/400]  12 done  2 running  386 pending  0 failed  0 diverged  1m02s elapsed  ETA 33m40s  best mode_entropy 2.213 (vae seed=3)
    [ 13/400] finished vae seed=4  mode_entropy 2.101  mean_image_entropy 0.734  0.4 s
"""  # noqa: E501

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ray.tune import Callback

from gvae.study.outcome import (
    NOTICE_KEY,
    Outcome,
    Status,
    diverged_members,
    ended_in_tune,
    is_finite_number,
    trial_error,
)
from gvae.study.packs import is_pack, seeds_of

ERASE = "\r\x1b[K"
SHOWN_METRICS = ("mode_entropy", "mean_image_entropy", "frechet_distance")


class ConsoleProgress(Callback):
    """A Tune callback printing a readable account of the study (see the module docstring).

    Tune's own output is off meanwhile (the driver runs Tune's plain output engine at verbosity
    0, which prints nothing).
    """

    def __init__(
        self,
        total: int,  # trials as the tables count them: each pack member once
        objective: tuple[str, str] = ("mode_entropy", "max"),
        params: tuple[str, ...] = ("model", "seed"),
        stream: TextIO | None = None,
        log_every: float = 60.0,
        redraw_every: float = 0.5,
    ) -> None:
        self.total = total
        self.metric, self.mode = objective
        self.params = params
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.log_every = log_every if not self.tty else redraw_every
        self.start = time.monotonic()
        self.last_drawn = 0.0
        self.ended_this_run = 0
        self.last_end = self.start
        self.ended = 0
        self.best: tuple[float, str] | None = None
        self.counts: dict[str, int] = {}
        self.final: dict[str, str] = {}  # trial id -> how it ended, as soon as its hook runs
        self.ended_before: set[str] | None = None  # ended in an earlier run of the study
        self.progress_shown = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["stream"] = None  # streams do not pickle; Tune pickles callbacks with its state
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.stream = sys.stdout
        self.tty = self.stream.isatty()

    # Tune hooks --------------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        self.start = time.monotonic()  # a resumed study's ETA counts this run only
        self.ended_this_run = 0
        self.last_end = self.start
        self.final = {}  # restored trials that ended before show as TERMINATED or ERROR
        self.ended_before: set[str] | None = None
        self.counts = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        if result.get(NOTICE_KEY):
            self._emit(
                f"{self._counter()} note {self._describe(trial)}  {result[NOTICE_KEY]}", True
            )
        self._note_best(result.get(self.metric), trial)

    def _note_best(self, value: Any, trial: Any) -> None:
        if not is_finite_number(value):
            return
        if self.best is None or (
            value > self.best[0] if self.mode == "max" else value < self.best[0]
        ):
            self.best = (float(value), self._describe(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_line(trials, trial, Outcome.of_trial(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_line(trials, trial, Outcome(Status.FAILED, trial_error(trial)))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _first_sentence(trial_error(trial))
        line = f"{self._counter()} retrying {self._describe(trial)}  {error}"
        self._emit(f"{line} (failure {trial.num_failures})", keep=True)
        if self.tty:
            self._emit(self.progress_line(), keep=False)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.ended_before is None:  # trials a resumed study's saved state says have ended
            self.ended_before = {t.trial_id for t in trials if ended_in_tune(t)}
            # A resumed study's restored trials report nothing again: their best results so far
            # are in Tune's per-metric summary of all they reported.
            for trial in trials:
                summary = trial.metric_analysis.get(self.metric) or {}
                self._note_best(summary.get(self.mode), trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last_drawn >= self.log_every:
            self._draw(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._draw(trials)
        if self.tty and self.progress_shown:
            self.stream.write("\n")
            self.stream.flush()

    # Lines -------------------------------------------------------------------------------------

    def _describe(self, trial: Any) -> str:
        config = trial.config
        return " ".join(
            str(config[key]) if key == "model" else f"{key}={_short(config[key])}"
            for key in self.params
            if key in config
        )

    def _trial_line(self, trials: list, trial: Any, outcome: Outcome) -> None:
        status = outcome.status.value
        size = _members(trial)
        self.ended_this_run += size  # the ETA's pace is per member, as `remaining` is
        self.last_end = time.monotonic()
        self.final[trial.trial_id] = status
        # Counted on from the last full count: recounting every trial at every end would cost
        # the driver O(trials^2) over a study.
        if not self.counts:
            self._count(trials)
        else:
            self.ended += size
            for key, count in _ended_rows(status, trial).items():
                self.counts[key] += count
            self.counts["running"] = max(self.counts["running"] - size, 0)
        result = trial.last_result or {}
        metrics = "  ".join(
            f"{name} {result[name]:.3f}"
            for name in SHOWN_METRICS
            if is_finite_number(result.get(name))
        )
        if outcome.status is Status.DIVERGED:
            metrics = f"losses not finite at iteration {outcome.diverged_at}"
        elif outcome.status is Status.FAILED:
            metrics = outcome.error or trial_error(trial)
        elif diverged_members(trial):
            metrics += f"  ({diverged_members(trial)} of {size} members diverged)"
        seconds = result.get("time_total_s")
        took = f"  {seconds:.1f} s" if seconds is not None else ""
        line = f"{self._counter()} {status} {self._describe(trial)}  {metrics}{took}"
        self._emit(line, keep=True)
        if self.tty:  # the progress line again, under the new trial line
            self._emit(self.progress_line(), keep=False)

    def _count(self, trials: list) -> None:
        counts = {"running": 0, "pending": 0, "failed": 0, "diverged": 0, "done": 0}
        known = 0
        before = self.ended_before or set()
        for trial in trials:
            size = _members(trial)
            known += size
            ended = self.final.get(trial.trial_id)
            if ended is None and trial.status == "TERMINATED" and trial.trial_id in before:
                ended = Outcome.of_trial(trial).status.value
            if ended is not None:  # Tune sets the status after calling the hooks
                for key, count in _ended_rows(ended, trial).items():
                    counts[key] += count
            elif trial.status == "RUNNING":
                counts["running"] += size
            elif trial.status == "ERROR":
                counts["failed"] += size
            else:  # pending, or stopped by an interrupt: it resumes with the study
                counts["pending"] += size
        counts["pending"] += max(self.total - known, 0)  # not created by the searcher yet
        self.counts = counts
        self.ended = counts["done"] + counts["failed"] + counts["diverged"]

    def _counter(self) -> str:
        width = len(str(self.total))
        return f"[{self.ended:>{width}}/{self.total}]"

    def progress_line(self) -> str:
        c = self.counts
        elapsed = time.monotonic() - self.start
        remaining = max(self.total - self.ended, 0)
        if self.ended_this_run and remaining:
            # The pace up to the last trial's end, counted down since: no ETA that grows while
            # trials run and none ends.
            since_last = time.monotonic() - self.last_end
            pace = (self.last_end - self.start) / self.ended_this_run
            eta = f"ETA {_duration(max(pace * remaining - since_last, 0.0))}"
        else:
            eta = "ETA --" if remaining else "done"
        best = f"best {self.metric} {self.best[0]:.3f} ({self.best[1]})" if self.best else ""
        return (
            f"{self._counter()} {c.get('done', 0)} done  {c.get('running', 0)} running  "
            f"{c.get('pending', 0)} pending  {c.get('failed', 0)} failed  "
            f"{c.get('diverged', 0)} diverged  {_duration(elapsed)} elapsed  {eta}  {best}"
        ).rstrip()

    def _draw(self, trials: list) -> None:
        self._count(trials)
        self.last_drawn = time.monotonic()
        self._emit(self.progress_line(), keep=not self.tty)
        self.progress_shown = True

    def _emit(self, line: str, keep: bool) -> None:
        if self.tty:
            self.stream.write(ERASE + line + ("\n" if keep else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _ended_rows(status: str, trial: Any) -> dict[str, int]:
    """The rows of an ended trial by how they count: a pack that finished may hold members that
    diverged while the others trained on."""
    size = _members(trial)
    if status not in ("finished", "stopped"):
        return {status: size}
    diverged = min(diverged_members(trial), size)
    return {"done": size - diverged, "diverged": diverged}


def _members(trial: Any) -> int:
    """How many rows of the tables a Tune trial is: a pack's seeds, else 1."""
    return len(seeds_of(trial.config)) if is_pack(trial.config) else 1


def _first_sentence(error: str, limit: int = 160) -> str:
    """A long error's first sentence (Ray's worker-death message runs to a paragraph)."""
    if len(error) <= limit:
        return error
    end = error.find(". ", 0, limit)
    return error[: end + 1] if end > 0 else error[:limit] + "..."


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _short(value: Any) -> str:
    """Searched floats to 4 significant digits (lam=12.96, lr=0.0009062), the rest as they are."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
