"""The few places where gvae relies on Ray behaviour that has no public API, each with its reason.

tests/test_compat.py fails the day the installed Ray stops behaving as these rely on; then the
workaround goes (or changes) with it.
"""

from __future__ import annotations

import os

# Read by Ray when it is imported (ray/_private/ray_constants.py), so it is set here, before this
# module imports Ray, and gvae.commands.study imports this module first. Ray's C++ core installs
# abseil's failure signal handler for SIGTERM in the driver, which prints a stack dump and arms a
# 3-second abort timer before it calls the Python handler: a driver that stops gracefully on
# SIGTERM (Tune saving its state takes longer) is aborted with SIGABRT (ray-project/ray PR 64830).
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

import contextlib
import copy
import fnmatch
import json
import logging
import math
import posixpath
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import pyarrow.fs as pafs
from ray.tune import Callback
from ray.tune.search import SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import optuna_search as ray_optuna

from gvae.study.folder import journal_storage
from gvae.study.outcome import ended_in_tune


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (`ray job stop`, Kubernetes, Slurm) stops the study as Ctrl-C does: Tune saves its
    state, the driver prints how far the study got and exits 130; a second one skips the save.

    `ray.init` (on the main thread, where a driver runs it) installs Ray's own SIGTERM
    handler, which exits the process at once (`sys.exit`) and so skips Tune's last save: the
    driver enters this again as soon as Ray has started, and the previous handler is
    put back when it leaves.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_: int, frame: Any) -> None:
        # What Ctrl-C runs: Tune's handler during its run, else Python's (KeyboardInterrupt),
        # also where SIGINT is ignored (a job a script started in the background).
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            handler = signal.default_int_handler
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_spared_daemons() -> Iterator[None]:
    """Start a local Ray in this block: its daemons and workers hold SIGTERM blocked, as Ray
    itself has them hold SIGINT (its start_ray_process blocks SIGINT before it execs a daemon),
    since a blocked signal stays blocked across fork and exec.

    A SIGTERM to the driver's whole process group or cgroup (`kill -- -PGID`, systemd, Slurm's
    `scancel`) then stops the driver alone, as Ctrl-C does (sigterm_interrupts), and the driver
    stops Ray after Tune's last save. Were the daemons to stop with it, Ray's core would end the
    driver with status 1 as soon as its raylet is gone, often before that save: a driver does not
    outlive its raylet (ray-project/ray PR 20777). The cost: `ray.shutdown` waits its second of
    grace for each blocked daemon before it kills it, about 3 s.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def quiet_tune_output(verbose: bool) -> None:
    """Keep Tune's console output to what a user acts on; gvae.study.progress prints the rest.

    Tune's newer output engine prints its header and a reporter of its own even at verbosity 0;
    `RAY_AIR_NEW_OUTPUT=0` (documented among Tune's environment variables) selects the plain
    engine, which prints nothing at verbosity 0 (ray-project/ray issue 36949 tracks the two
    engines). Tune's INFO lines (state snapshots) are shown with --verbose only.

    Tune logs every trial error with its whole traceback unless `TUNE_PRINT_ALL_TRIAL_ERRORS=0`
    (among its documented environment variables); gvae prints each as one line.

    Tune warns when trials checkpoint faster than it snapshots its state; a checkpoint at every
    evaluation of many short trials is the point here, and the warning itself names
    `TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0` as the way to turn it off.
    """
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("ray.tune").setLevel(logging.INFO if verbose else logging.WARNING)
    # At a stop, Tune's run names its Python API to resume with (`tune.run(..., resume=True)`);
    # gvae prints the command that continues the study instead.
    logging.getLogger("ray.tune.tune").setLevel(logging.INFO if verbose else logging.ERROR)
    # At a stop, the analysis Tune's run returns warns of every trial that had not started
    # ("Failed to fetch metrics"); the tables, not that analysis, are the study's record.
    analysis = logging.getLogger("ray.tune.analysis.experiment_analysis")
    analysis.setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # Each trial error with its traceback; the progress prints it as one line instead.
        os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "0"
        # A study stopped by a trial's error (gvae.study.faults) leaves the failed results of
        # its other trials unread, and Ray logs each with its traceback when the driver ends,
        # naming this switch in the same line.
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"


class OptunaSearch(ray_optuna.OptunaSearch):
    """Ray Tune's OptunaSearch, with two of its behaviours changed.

    - A trial whose objectives are not finite numbers (it diverged or failed: see
      gvae.study.outcome) is told to Optuna as FAIL. Tune's OptunaSearch tells Optuna COMPLETE
      with the NaN, which Optuna refuses ("The value nan is not acceptable"); the searcher logs
      that and leaves the Optuna trial RUNNING for good.
    - Restored from Tune's saved state, it keeps this run's journal: Tune pickles the searcher
      with its Optuna storage, whose journal path is where the study folder was when it was
      saved, and a moved study folder would be written at its old place.
    - A journal kept on the driver's disk for a study on an object store is copied to its
      `mirror` (filesystem, path) each time Tune saves the searcher's state, before that state
      is written: Tune uploads its saved state in the background, and an upload still running
      from the previous save can carry this one's state, so the mirror must already hold every
      ask and tell that state knows. Then a killed study never resumes with a searcher that
      told Optuna of a trial its journal still has running, which would stay running for good.
    - An outcome it was told already, or of a trial suggested after the state it was restored
      from, is ignored: CatchUpSearcher tells a resumed study's searcher every ended trial.
    """

    def __init__(
        self,
        *args: Any,
        journal: str | None = None,
        mirror: tuple[pafs.FileSystem, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if journal is not None:
            kwargs["storage"] = journal_storage(journal)
        super().__init__(*args, **kwargs)
        self.journal, self.mirror = journal, mirror

    def save(self, checkpoint_path: str) -> None:
        if self.journal is not None and self.mirror is not None:
            filesystem, path = self.mirror
            pafs.copy_files(self.journal, path, destination_filesystem=filesystem)
        super().save(checkpoint_path)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return  # told already, or suggested after the state it was restored from
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [(result or {}).get(metric) for metric in metrics]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)

    def restore(self, checkpoint_path: str) -> None:
        journal, mirror = self.journal, self.mirror
        super().restore(checkpoint_path)
        self.journal, self.mirror = journal, mirror
        if journal is not None:
            # The same study, read from this run's journal; its trials rebound to it.
            storage = journal_storage(journal)
            study = optuna.load_study(
                study_name=self._study_name, storage=storage, sampler=self._ot_study.sampler
            )
            self._storage, self._ot_study = storage, study
            self._ot_trials = {
                tune_id: optuna.trial.Trial(study, trial._trial_id)
                for tune_id, trial in self._ot_trials.items()
            }
        known = {trial.number for trial in self._ot_trials.values()}
        _fail_orphans(self._ot_study, known)


class AtResume(Callback):
    """A callback that acts once, at the first step of a resumed study, before any trial starts:
    Tune has restored its trials from its saved state, and calls nothing earlier with them."""

    def __init__(self) -> None:
        self.resumed = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.resumed:
            self.resumed = True
            self.resume(trials)

    def resume(self, trials: list) -> None:
        raise NotImplementedError


class CatchUpSearcher(AtResume):
    """Tell a resumed study's searcher how each trial that Tune's saved state has ended ended.

    Tune saves its trials and its searcher together, then uploads the files to storage in the
    background, one after another; an upload still running when the next save is written can
    carry files of both saves, so a trial ended in one and a searcher that never heard of it in
    the other. Restored from such a pair, the searcher would wait for a trial that never runs
    again: Optuna's trial stays running, and a concurrency limit keeps its slot for good.
    Tune's searchers and gvae's ignore an outcome they already have, so the others pass.
    """

    def __init__(self, search_alg: Any) -> None:
        super().__init__()
        self.search_alg = search_alg

    def resume(self, trials: list) -> None:
        for trial in trials:
            if ended_in_tune(trial):
                error = trial.status == "ERROR"
                result = None if error else trial.last_result
                self.search_alg.on_trial_complete(trial.trial_id, result=result, error=error)


class FallBackToNewestCheckpoint(AtResume):
    """Resume each unfinished trial from its newest checkpoint when the one Tune's saved state
    names is gone, or from the start when none is left.

    Tune keeps a trial's last `num_to_keep` checkpoints and deletes an older one as soon as a
    newer one is registered, while the state naming the newer one reaches storage only with its
    next snapshot, uploaded in the background. A driver killed in between leaves a saved state
    that names a deleted checkpoint, and the resumed trial fails every retry with "Could not
    recover from checkpoint as it does not exist on storage anymore". Ray 2.1 restored such a
    trial from its newest checkpoint (ray-project/ray PR 29099); the storage rewrite of Ray 2.7
    dropped that. At the first step of a resumed study, before any trial starts, the trial's
    newest checkpoint is put in the named one's place, and Tune restores it from there.
    Each older one the state lists that is gone gets an empty folder, which Tune deletes.
    """

    def __init__(self, log: Callable[[str], None], kept: int) -> None:
        super().__init__()
        self.log = log
        self.kept = kept  # the trial's checkpoints Tune keeps (CheckpointConfig.num_to_keep)

    def resume(self, trials: list) -> None:
        for trial in trials:
            named = trial.checkpoint
            if ended_in_tune(trial) or named is None:
                continue
            if not _exists(named.filesystem, named.path):
                self._replace(trial.trial_id, named)
            # Tune deletes each older checkpoint its state lists once the trial registers a newer
            # one, and logs a traceback for one already gone (deleted before the state naming
            # its successor was saved, or by hand): an empty folder stands in for it. The named
            # one, when none was left, is empty too: the trainable takes it for none.
            for path in _kept_before(named.path, self.kept):
                if not _exists(named.filesystem, path):
                    named.filesystem.create_dir(path, recursive=True)

    def _replace(self, trial_id: str, named: Any) -> None:
        """Put the trial's newest checkpoint where the gone `named` one was, if one is left."""
        filesystem = named.filesystem
        newest = _newest_checkpoint(filesystem, posixpath.dirname(named.path))
        if newest is None:  # every one was removed (by hand, by a storage lifecycle rule)
            self.log(
                f"trial {trial_id}: its checkpoint {named.path} is gone, and no other is left; "
                "it starts over"
            )
            return
        # One newer than the named one, Tune does not know: moved, it is not left behind beyond
        # the checkpoints Tune keeps. An older one Tune removes itself: copied.
        move = posixpath.basename(newest) > posixpath.basename(named.path)
        filesystem.create_dir(named.path, recursive=True)
        pafs.copy_files(newest, named.path, filesystem, filesystem)
        if move:
            filesystem.delete_dir(newest)
        self.log(
            f"trial {trial_id}: its checkpoint {named.path} is gone (Tune removed it after "
            f"saving the state the study resumes from); it resumes from its newest, {newest}, "
            f"{'moved' if move else 'copied'} there"
        )


def _exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def _kept_before(named_path: str, kept: int) -> list[str]:
    """The named checkpoint folder and the `kept - 1` before it (checkpoint_000004 and
    checkpoint_000005 for checkpoint_000005 and 2): those Tune's state lists for the trial."""
    parent, name = posixpath.split(named_path)
    prefix, _, index = name.rpartition("_")
    first = max(0, int(index) - kept + 1)
    return [
        posixpath.join(parent, f"{prefix}_{i:0{len(index)}d}") for i in range(first, int(index) + 1)
    ]


def _newest_checkpoint(filesystem: pafs.FileSystem, trial_path: str) -> str | None:
    """The newest of a trial's checkpoint folders (checkpoint_000003 after _000002)."""
    selector = pafs.FileSelector(trial_path, allow_not_found=True)
    folders = [
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    ]
    return max(folders, key=posixpath.basename, default=None)


def _fail_orphans(study: optuna.Study, known: set[int]) -> None:
    """A suggestion Optuna made after Tune's last snapshot of a killed study: Tune never ran
    it and the resumed searcher does not know it, so it would stay RUNNING for good."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        if trial.number not in known:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


# Tune saves a study's state as `experiment_state-<time>.json` in its experiment folder and
# resumes from the newest by name (ray/tune/execution/experiment_state.py). One it cannot read
# makes TuneController log the error and start the experiment over, unless `fail_fast`, which
# would also end the study at its first failed trial: the trials the study recorded would be
# dropped as unknown to the new experiment. So the driver reads the newest state first.
EXPERIMENT_STATE = "experiment_state-*.json"


def experiment_states(filesystem: pafs.FileSystem, experiment_path: str) -> list[str]:
    """The experiment states Tune saved for a study, oldest first (the last is resumed)."""
    selector = pafs.FileSelector(experiment_path, allow_not_found=True)
    infos = filesystem.get_file_info(selector)
    return sorted(i.path for i in infos if fnmatch.fnmatch(i.base_name, EXPERIMENT_STATE))


def readable_experiment_state(filesystem: pafs.FileSystem, path: str) -> bool:
    """Whether Tune can restore a study from the experiment state at `path`."""
    try:
        with filesystem.open_input_stream(path) as stream:
            state = json.loads(stream.readall())
    except ValueError:  # cut short, or not JSON at all
        return False
    return isinstance(state, dict) and {"trial_data", "runner_data"} <= set(state)


# A study folder that moved (copied to another disk, synced down from S3) resumes with
# `tune.run(resume=True, storage_path=<where it is now>)`: Tune moves its restored trials there,
# but its search algorithm's saved state holds the experiment spec of the first run, whose
# storage still names the old place, and every trial it creates after the resume is written
# there. The two generators below put this run's storage into the restored spec.


def _rebase(spec: dict[str, Any], storage_path: str, filesystem: Any) -> None:
    storage = spec.get("storage")
    if storage is None or storage.storage_fs_path == storage_path:
        return
    moved = copy.copy(storage)
    moved.storage_fs_path, moved.storage_filesystem = storage_path, filesystem
    spec["storage"] = moved


class VariantGenerator(BasicVariantGenerator):
    """Tune's grid generator, whose trials after a resume go where the study folder is now."""

    def __init__(self, *args: Any, storage_path: str, filesystem: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target = (storage_path, filesystem)

    def set_state(self, state: dict) -> None:
        target = self.target
        super().set_state(state)
        self.target = target
        for iterator in self._iterators:
            _rebase(iterator.unresolved_spec, *target)


class SuggestionGenerator(SearchGenerator):
    """Tune's wrapper of a searcher, whose trials after a resume go where the study folder is."""

    def __init__(self, searcher: Any, storage_path: str, filesystem: Any) -> None:
        super().__init__(searcher)
        self.target = (storage_path, filesystem)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        _rebase(self._experiment.spec, *self.target)
