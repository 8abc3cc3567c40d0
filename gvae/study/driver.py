"""Run a study with Ray Tune: start or join Ray, build the Tuner (or restore it), record results.

Layout of a study folder `<storage>/<name>/`: `study.yaml` (the spec that ran), `trials.parquet`,
`curves.parquet`, and `tune/`, Ray Tune's experiment folder (checkpoints, searcher state), which is
what makes `gvae study resume` possible.
"""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune
from ray.tune.error import TuneError
from sqlalchemy.engine import make_url

from gvae.data import Dataset, load_dataset
from gvae.errors import GvaeError
from gvae.evaluation import load_or_train_evaluator
from gvae.io import atomic_local_filesystem, check_reachable, join
from gvae.provenance import provenance
from gvae.study import compat
from gvae.study.faults import StopWhenStorageFails, resume_command, storage_errors
from gvae.study.folder import (
    EXPERIMENT,
    JOURNAL,
    SPEC_FILE,
    check_same_study,
    cut_torn_tail,
    load_saved_spec,
    note_other_versions,
    write_spec,
)
from gvae.study.lease import StudyLease
from gvae.study.outcome import ENDED
from gvae.study.packs import SEEDS
from gvae.study.progress import ConsoleProgress
from gvae.study.ray_start import RayStart
from gvae.study.resources import RESOURCE_WAIT_SECONDS, check_devices, check_resources
from gvae.study.results import TRIALS, ResultsStore, study_uri
from gvae.study.search import Journal, scheduler, tune_search
from gvae.study.spec import StudySpec
from gvae.study.tables import StudyTables, Tables
from gvae.study.tracking import tracker_callbacks
from gvae.study.trainable import train_trial

# Tune keeps two checkpoints per trial: with one, each evaluation of each trial forces a snapshot
# of Tune's whole experiment state, which grows with the study (quadratic driver time).
CHECKPOINTS_KEPT = 2


@dataclass
class StudyRun:
    spec: StudySpec
    store: ResultsStore
    resumed: bool
    done: int  # trials that ended: finished, diverged, stopped or failed
    failed: int

    @property
    def interrupted(self) -> bool:
        return self.done < self.spec.trial_count


def run_study(
    spec: StudySpec,
    raw_spec: dict[str, Any],
    address: str | None = None,
    storage: str | None = None,
    log: Callable[[str], None] = print,
    resource_wait: float = RESOURCE_WAIT_SECONDS,
    force: bool = False,
    verbose: bool = False,
    ray_start: RayStart | None = None,
) -> StudyRun:
    """Run (or continue) a study; returns where its tables are and how far it got.

    Prints one line per ended trial and a progress line (gvae.study.progress); `verbose` shows
    Tune's own status tables and trial results instead. `ray_start`: a Ray already starting
    (RayStart.begin), else Ray is started or joined when the study needs it.
    """
    storage = storage or spec.storage
    uri = study_uri(storage, spec.name)
    store = ResultsStore(uri)
    address = address or os.environ.get("RAY_ADDRESS")
    check_devices(spec, local=not address)
    resume = resume_command(spec.name, storage, address)
    lease = StudyLease(uri, spec.name, log=log)
    with storage_errors(uri, resume):
        check_reachable(uri)
        check_same_study(store, raw_spec)
        _has_saved_state(store)  # a damaged one is refused before Ray starts (and read
        # again once leased: a driver taken over with --force may save a newer one meanwhile)
        lease.acquire(force=force)
    try:
        with storage_errors(uri, resume):
            ray_start = ray_start or RayStart(address)
            return _run_leased(spec, raw_spec, store, ray_start, log, resource_wait, verbose)
    finally:
        with contextlib.suppress(OSError):  # a full or unreachable storage: the lease lapses
            lease.release()
            if store.local and not store.exists(SPEC_FILE):  # stopped before the study began
                os.rmdir(store.root)  # the folder the lease made, when nothing else is in it


def _run_leased(
    spec: StudySpec,
    raw_spec: dict[str, Any],
    store: ResultsStore,
    ray_start: RayStart,
    log: Callable[[str], None],
    resource_wait: float,
    verbose: bool,
) -> StudyRun:
    data_root = Path(spec.fixed.get("data_root", "data")).expanduser().resolve()
    # Tune runs every trial in a folder of its own, where a relative data_root finds nothing:
    # trials get the folder the driver found the data in.
    spec = replace(spec, fixed={**spec.fixed, "data_root": str(data_root)})
    _leave_job_working_dir()
    compat.quiet_tune_output(verbose)
    # Missing data is bad input, told before Ray starts; the evaluators (trained here the first
    # time) load while Ray starts on this thread, where it installs its signal handlers.
    datasets = {name: load_dataset(name, data_root) for name in spec.datasets}
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="gvae-evaluators"))
        loading = pool.submit(_evaluator_states, datasets, log)
        ray_start.wait(log)
        # From here on, as soon as Ray has replaced it, SIGTERM stops the study as Ctrl-C does.
        stack.enter_context(compat.sigterm_interrupts())
        evaluator_states = loading.result()
        image_sizes = {name: math.prod(data.image_shape) for name, data in datasets.items()}
        check_resources(spec, resource_wait if ray_start.address else 0.0, log)
        resumed = _has_saved_state(store)
        if resumed:
            where = store.location(EXPERIMENT)
            log(f"resuming study {spec.name} from {where}: finished trials are kept")
            note_other_versions(store, log)
        else:
            write_spec(store, raw_spec)
        layout = Tables.of(spec, store.uri, provenance())
        tables = StudyTables(layout, spec.tune_trial_count, resumed)
        tables.prepare()
        with _optuna_journal(spec, store, log) as journal:
            experiments = (f"{store.root}", _tune_filesystem(store))  # where Tune's trials go
            search = tune_search(spec, image_sizes, journal, experiments)
            _fit(spec, store, tables, evaluator_states, search, resumed, verbose, log)
    statuses = store.read_table(TRIALS, ["status"]).column("status").to_pylist()
    done = sum(status in ENDED for status in statuses)
    return StudyRun(spec, store, resumed, done, statuses.count("failed"))


def _evaluator_states(
    datasets: dict[str, Dataset], log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Each dataset's evaluator's state, trained here once if it is not cached (trials only
    load it)."""
    return {name: load_or_train_evaluator(d, log=log).state() for name, d in datasets.items()}


def _has_saved_state(store: ResultsStore) -> bool:
    """Whether Tune saved an experiment state for the study, which `tune.run(resume=True)`
    continues; one it could not read is refused (compat.EXPERIMENT_STATE says why)."""
    states = compat.experiment_states(store.fs, store.path(EXPERIMENT))
    if not states or compat.readable_experiment_state(store.fs, states[-1]):
        return bool(states)
    newest = join(store.uri, EXPERIMENT, posixpath.basename(states[-1]))
    fix = "restore it from a copy of the study folder"
    if len(states) > 1:
        earlier = posixpath.basename(states[-2])
        fix = f"remove it to resume from an earlier run's state, {earlier} (trials begun since "
        fix += "then run again)"
    raise GvaeError(
        f"study: Tune's saved state {newest} is damaged and cannot be read; {fix}, or start the "
        "study afresh under another name"
    )


def _tune_filesystem(store: ResultsStore) -> pafs.FileSystem:
    """Tune's storage: the S3 filesystem with the URI's options (endpoint_override, ...), or on
    local disks one that writes Tune's saved state whole, so a full disk cannot cut it short."""
    return store.fs if "://" in store.uri else atomic_local_filesystem(store.path(EXPERIMENT))


def _fit(
    spec: StudySpec,
    store: ResultsStore,
    tables: StudyTables,
    evaluator_states: dict[str, dict[str, Any]],
    search: dict[str, Any],
    resumed: bool,
    verbose: bool,
    log: Callable[[str], None],
) -> None:
    """Run Tune over the study, a new experiment or the saved one continued (`resumed`), with
    this run's callbacks, searcher and scheduler (Tune restores their saved state into them),
    raising the error that stopped it as it was (Tune wraps it in TuneError)."""
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, evaluator_states=evaluator_states, tables=tables.tables),
        {"cpu": spec.cpus, "gpu": spec.gpus},
    )
    # The guard first: it stops the study before a trial is recorded failed for a full disk.
    callbacks = [StopWhenStorageFails(store.uri), tables, *tracker_callbacks(spec)]
    if resumed:  # before the tables, which rebuild lost rows from the checkpoints
        callbacks.insert(1, compat.FallBackToNewestCheckpoint(log, CHECKPOINTS_KEPT))
        callbacks.append(compat.CatchUpSearcher(search["search_alg"]))
    try:
        tune.run(
            trainable,
            name=EXPERIMENT,
            storage_path=store.root,
            storage_filesystem=_tune_filesystem(store),
            resume=True if resumed else None,
            callbacks=callbacks if verbose else [*callbacks, _progress(spec)],
            max_failures=spec.max_failures,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            verbose=1 if verbose else 0,
            reuse_actors=True,  # no new worker process (and torch import) per trial
            raise_on_failed_trial=False,  # failures are in the tables and the exit status
            scheduler=scheduler(spec),
            **search,
        )
    except TuneError as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, GvaeError | OSError):
            cause = cause.__cause__ or cause.__context__
        raise (cause or error) from None


@contextlib.contextmanager
def _optuna_journal(
    spec: StudySpec, store: ResultsStore, log: Callable[[str], None]
) -> Iterator[Journal | None]:
    """Where an Optuna search keeps its study: a database (`search.optuna.storage`), else a
    journal file in the study folder on a local disk. On S3, which cannot append to a file, the
    driver keeps the journal on its own disk, fetched from the study folder before the run and
    copied back at each of Tune's snapshots and at the end."""
    if spec.search_type != "optuna":
        yield None
        return
    if spec.optuna_storage:
        url = make_url(spec.optuna_storage).render_as_string(hide_password=True)
        log(f"optuna: watch the search live with `optuna-dashboard {url}`")
        yield None
        return
    if store.local:
        log(f"optuna: watch the search live with `optuna-dashboard {store.path(JOURNAL)}`")
        cut_torn_tail(store.path(JOURNAL), log)
        yield Journal(store.path(JOURNAL))
        return
    with tempfile.TemporaryDirectory(prefix="gvae-optuna-") as folder:
        local = f"{folder}/{JOURNAL}"
        if store.exists(JOURNAL):
            pafs.copy_files(store.path(JOURNAL), local, source_filesystem=store.fs)
            cut_torn_tail(local, log)
        log(
            f"optuna: watch the search live with `optuna-dashboard {local}`; it is copied to "
            f"{store.location(JOURNAL)} at each snapshot of the study's state"
        )
        try:
            yield Journal(local, mirror=(store.fs, store.path(JOURNAL)))
        finally:
            pafs.copy_files(local, store.path(JOURNAL), destination_filesystem=store.fs)


def repair_study(storage: str, name: str, log: Callable[[str], None] = print) -> None:
    """Rebuild a study's tables from its trials' newest checkpoints and Tune's saved state, under
    the study's lease (no driver runs it meanwhile); what a resume also does before training."""
    spec, _ = load_saved_spec(storage, name)
    store = ResultsStore(study_uri(storage, name))
    if not _has_saved_state(store):
        raise GvaeError(f"study: {name} has no Tune state under {store.uri}; nothing to repair")
    lease = StudyLease(store.uri, name, log=log)
    lease.acquire()
    try:
        tables = StudyTables(Tables.of(spec, store.uri, provenance()), spec.tune_trial_count)
        tables.prepare(log)
        experiment = f"{store.root}/{EXPERIMENT}"
        filesystem = _tune_filesystem(store)
        trials = tune.ExperimentAnalysis(experiment, storage_filesystem=filesystem).trials
        tables.reconcile(trials)
        tables.on_experiment_end(trials)
    finally:
        lease.release()


def _leave_job_working_dir() -> None:
    """Under `ray job submit --working-dir`, step out of the unpacked working dir.

    Ray may delete that folder while the job's driver still runs (seen right after ray.init), and
    Tune's final ExperimentAnalysis then fails in os.getcwd() (ray-project/ray issue 52343).
    Every path the driver needs is absolute by now.
    """
    if "working_dir_files" in os.getcwd():
        os.chdir(os.path.expanduser("~"))


def _progress(spec: StudySpec) -> ConsoleProgress:
    if spec.search_type == "grid":
        datasets = ("dataset",) if len(spec.datasets) > 1 else ()
        objective, params = ("mode_entropy", "max"), ("model", *datasets, *spec.grid)
    else:
        first = spec.objectives[0]
        seeds = ("seed",) if spec.replicates > 1 else ()  # the searcher gives each replicate one
        objective, params = (first.metric, first.mode), ("model", *spec.space, *seeds)
    if spec.pack > 1:  # Tune's trials are packs, which show their seeds
        params = tuple(SEEDS if key == "seed" else key for key in params)
    # Counted as the tables count trials: a pack's members each once.
    return ConsoleProgress(spec.trial_count, objective=objective, params=params)
