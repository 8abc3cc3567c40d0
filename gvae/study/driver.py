"""Run a study with Ray Tune: start or join Ray, build the Tuner (or restore it), record results.

Layout of a study folder `<storage>/<name>/`: `study.yaml` (the spec that ran), `trials.parquet`,
`curves.parquet`, and `tune/`, Ray Tune's experiment folder (checkpoints, searcher state), which is
what makes `gvae study resume` possible.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import yaml
from ray import tune
from ray.tune.error import TuneError
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from gvae.config import TrialConfig
from gvae.data import load_dataset
from gvae.errors import GvaeError
from gvae.evaluator import load_or_train_evaluator
from gvae.io import atomic_local_filesystem
from gvae.study.checkpoints import KEPT_WHILE_RUNNING, KeepLastCheckpoint
from gvae.study.faults import StopWhenStorageFull, hide_tune_hints, resume_command, storage_errors
from gvae.study.lease import StudyLease
from gvae.study.packs import PACKED_SUGGESTION, SEEDS, pack_points, replicate_seeds
from gvae.study.progress import ConsoleProgress
from gvae.study.ray_start import RayStart
from gvae.study.recorder import ParquetRecorder
from gvae.study.replicates import SUGGESTION, SeedReplicates
from gvae.study.resources import RESOURCE_WAIT_SECONDS, check_devices, check_resources
from gvae.study.results import TRIALS, ResultsStore, study_uri
from gvae.study.searcher import DivergenceTolerantASHA, make_tolerant, tolerant_search
from gvae.study.spec import Range, StudySpec, parse_study, read_yaml
from gvae.study.trainable import train_trial

EXPERIMENT = "tune"
# Tune warns when trials checkpoint faster than it snapshots; frequent small checkpoints are the
# point here (every evaluation), so the warning is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune's default loggers write every result (the final per-image arrays included) to JSON, CSV and
# TensorBoard files per trial: the Parquet tables hold all of it, so they are only cost here.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
SPEC_FILE = "study.yaml"
# Trial statuses that mean the trial has ended (the rest: pending, running).
ENDED = ("finished", "diverged", "stopped", "failed")


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
        _check_same_study(store, raw_spec)
        lease.acquire(force=force)
    try:
        with storage_errors(uri, resume):
            return _run_leased(
                spec, raw_spec, store, ray_start or RayStart(address), log, resource_wait, verbose
            )
    finally:
        with contextlib.suppress(OSError):  # a full or unreachable storage: the lease lapses
            lease.release()


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
    datasets = {name: load_dataset(name, data_root) for name in spec.datasets}
    # Each dataset's evaluator, trained here once if it is not cached (trials only load it).
    evaluator_states = {
        name: load_or_train_evaluator(dataset, log=log).state()
        for name, dataset in datasets.items()
    }
    image_sizes = {name: math.prod(dataset.image_shape) for name, dataset in datasets.items()}
    # Tune runs every trial in a folder of its own, where a relative data_root finds nothing:
    # trials get the folder the driver found the data in.
    spec = replace(spec, fixed={**spec.fixed, "data_root": str(data_root)})

    _leave_job_working_dir()
    _quiet_tune_logs(verbose)
    ray_start.wait(log)
    check_resources(spec, resource_wait if ray_start.address else 0.0, log)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, evaluator_states=evaluator_states),
        {"cpu": spec.cpus, "gpu": spec.gpus},
    )
    experiment = f"{store.root}/{EXPERIMENT}"
    filesystem = _tune_filesystem(store)
    resumed = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    if resumed:
        where = store.location(EXPERIMENT)
        log(f"resuming study {spec.name} from {where}: finished trials are kept")
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, storage_filesystem=filesystem
        )
        _tolerate_missing_objectives(tuner)
        _set_output(tuner, spec, verbose)
    else:
        _write_spec(store, raw_spec)
        recorder = ParquetRecorder(store, spec.name, provenance())
        tuner = _new_tuner(spec, trainable, store, recorder, verbose, image_sizes)
    hide_tune_hints()
    _fit(tuner)
    trials = store.read(TRIALS)
    statuses = trials["status"] if not trials.empty else []
    done = sum(status in ENDED for status in statuses)
    failed = sum(status == "failed" for status in statuses)
    return StudyRun(spec, store, resumed, done, failed)


def _tune_filesystem(store: ResultsStore) -> pafs.FileSystem:
    """Tune's storage: the S3 filesystem with the URI's options (endpoint_override, ...), or on
    local disks one that writes files whole, so a full disk cannot cut Tune's state short."""
    return store.fs if "://" in store.uri else atomic_local_filesystem()


def _fit(tuner: tune.Tuner) -> None:
    """tuner.fit(), raising the error that stopped it as it was (Tune wraps it in TuneError)."""
    try:
        tuner.fit()
    except TuneError as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, GvaeError | OSError):
            cause = cause.__cause__ or cause.__context__
        raise (cause or error) from None


def _tolerate_missing_objectives(tuner: tune.Tuner) -> None:
    """A study begun before diverged trials were tolerated pickled a bare OptunaSearch and ASHA,
    which stop the study at its first diverged trial: give the restored run the wrappers."""
    internal = getattr(tuner, "_local_tuner", None)  # None under Ray Client: tuner is remote
    if internal is None:
        return
    make_tolerant(internal._tune_config)


def load_saved_spec(storage: str, name: str) -> tuple[StudySpec, dict[str, Any]]:
    """The spec a study ran with, for `gvae study resume NAME`."""
    store = ResultsStore(study_uri(storage, name))
    if not _exists(store, SPEC_FILE):
        raise GvaeError(
            f"study: no study named {name!r} under {storage}; run `gvae study run FILE` first "
            "or pass --storage"
        )
    with store.fs.open_input_stream(f"{store.root}/{SPEC_FILE}") as stream:
        raw = read_yaml(stream.readall().decode())
    return parse_study(raw), raw


def provenance() -> dict[str, Any]:
    """Versions and commit recorded with every trial, so a result can be traced to its code."""
    versions = {f"{name}_version": _version(name) for name in ("gvae", "torch", "ray", "optuna")}
    return {**versions, "python_version": platform.python_version(), "git_commit": _git_commit()}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _exists(store: ResultsStore, name: str) -> bool:
    return store.fs.get_file_info(f"{store.root}/{name}").type == pafs.FileType.File


def _check_same_study(store: ResultsStore, raw_spec: dict[str, Any]) -> None:
    """Refuse to mix two different studies under one name."""
    if not _exists(store, SPEC_FILE):
        return
    with store.fs.open_input_stream(f"{store.root}/{SPEC_FILE}") as stream:
        saved = read_yaml(stream.readall().decode())
    if saved != raw_spec:
        raise GvaeError(
            f"name: a different study named {raw_spec['name']!r} already ran in {store.uri}; "
            "rename this study or remove that folder"
        )


def _write_spec(store: ResultsStore, raw_spec: dict[str, Any]) -> None:
    store.fs.create_dir(store.root, recursive=True)
    with store.fs.open_output_stream(f"{store.root}/{SPEC_FILE}") as stream:
        stream.write(yaml.safe_dump(raw_spec, sort_keys=False).encode())


def _quiet_tune_logs(verbose: bool) -> None:
    """Keep Tune's log lines to what a user acts on.

    Its result analysis warns about every trial when it finds no result.json or progress.csv,
    which are turned off on purpose (see TUNE_DISABLE_AUTO_CALLBACK_LOGGERS above); its INFO
    lines (state snapshots) are shown only with --verbose.
    """
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # Tune's newer output engine always prints its header and adds a reporter of its own;
        # the plain one prints nothing at verbosity 0, leaving the console to ConsoleProgress.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


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
    return ConsoleProgress(spec.tune_trial_count, objective=objective, params=params)


def _callbacks(spec: StudySpec, recorder: ParquetRecorder, verbose: bool) -> list[Any]:
    kept = [recorder, KeepLastCheckpoint()]
    return kept if verbose else [*kept, _progress(spec)]


def _set_output(tuner: tune.Tuner, spec: StudySpec, verbose: bool) -> None:
    """Apply this run's --verbose to a restored Tuner (its run config was saved by the first)."""
    local = getattr(tuner, "_local_tuner", None)  # None under Ray Client, which prints its own
    if local is None:
        return
    run_config = local.get_run_config()
    recorders = [c for c in run_config.callbacks or [] if isinstance(c, ParquetRecorder)]
    others = [
        c
        for c in run_config.callbacks or []
        if not isinstance(c, ParquetRecorder | ConsoleProgress | KeepLastCheckpoint)
    ]
    ours = _callbacks(spec, recorders[0], verbose) if recorders else []
    run_config.callbacks = [*ours, *others]
    run_config.verbose = 1 if verbose else 0


def tune_points(spec: StudySpec, image_sizes: dict[str, int]) -> list[dict[str, Any]]:
    """The grid's points as Tune trials, longest first: a pack of seeds each under
    `resources.pack` (gvae.study.packs), else one trial each."""
    points = longest_first(spec, image_sizes)
    return pack_points(points, spec.pack) if spec.pack > 1 else points


def longest_first(spec: StudySpec, image_sizes: dict[str, int]) -> list[dict[str, Any]]:
    """The grid's trials, the longest expected first, so no long trial starts last (the tail).

    Expected length: iterations x batch size x train steps per iteration (WGAN's n_critic critic
    steps plus one) x the nets one step trains x the values in an image of the trial's dataset
    (`image_sizes`, by name: the nets' outer layers grow with it); only the order matters.
    """

    def cost(fields: dict[str, Any]) -> float:
        config = TrialConfig.from_dict({**spec.base_config(), **fields}).resolved()
        steps = config.n_critic + 1 if config.model == "wgan" else 1
        nets = NETS_PER_STEP.get(config.model, 1)
        size = image_sizes[config.dataset]
        return config.iterations * config.batch_size * steps * nets * size

    return sorted(spec.grid_trials(), key=cost, reverse=True)  # stable: file order on ties


# Nets trained per step, a rough relative cost of one iteration (WGAN's steps counted apart).
NETS_PER_STEP = {"gan": 2, "wgan": 2, "vae": 2, "vaegan": 3, "cvaegan": 3}


def _new_tuner(
    spec: StudySpec,
    trainable: Any,
    store: ResultsStore,
    recorder: ParquetRecorder,
    verbose: bool,
    image_sizes: dict[str, int],
) -> tune.Tuner:
    param_space: dict[str, Any] = dict(spec.base_config())
    tune_config: dict[str, Any] = {
        "max_concurrent_trials": spec.concurrency or None,
        "scheduler": _scheduler(spec),
        "reuse_actors": True,  # no new worker process (and torch import) per trial
    }
    if spec.search_type == "grid":
        # Every grid point, in the order they start: Tune's own grid order is by key name.
        points = tune_points(spec, image_sizes)
        # Points may only set keys the space has; every point sets them all, so nothing is drawn.
        param_space["model"] = tune.choice(list(spec.models))
        param_space["dataset"] = tune.choice(list(spec.datasets))
        param_space.update({key: tune.choice(values) for key, values in spec.grid.items()})
        if spec.pack > 1:
            del param_space["seed"]
            param_space[SEEDS] = tune.choice([point[SEEDS] for point in points])
        # The generator limits concurrency itself: Tune ignores max_concurrent_trials beside it.
        tune_config["search_alg"] = BasicVariantGenerator(
            points_to_evaluate=points, max_concurrent=spec.concurrency
        )
        tune_config["max_concurrent_trials"] = None
        tune_config["num_samples"] = len(points)
    else:
        param_space["model"] = (
            tune.choice(list(spec.models)) if len(spec.models) > 1 else spec.models[0]
        )
        param_space.update({key: _domain(value) for key, value in spec.space.items()})
        if spec.pack > 1:  # one trial per suggestion, training its replicates as one pack
            param_space[SEEDS] = replicate_seeds(spec.fixed.get("seed", 0), spec.replicates)
            param_space[SUGGESTION] = PACKED_SUGGESTION
        # Diverged trials tolerated outermost, so the replicates and Optuna inside see them as
        # failed; the concurrency limit sits inside too (see tolerant_search).
        tune_config["search_alg"] = tolerant_search(_optuna_search(spec), spec.concurrency or None)
        tune_config["max_concurrent_trials"] = None
        tune_config["num_samples"] = spec.tune_trial_count
    run_config = tune.RunConfig(
        name=EXPERIMENT,
        storage_path=store.root,
        storage_filesystem=_tune_filesystem(store),
        # The guard first: it stops the study before the recorder marks a trial failed.
        callbacks=[StopWhenStorageFull(store.uri), *_callbacks(spec, recorder, verbose)],
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Two while a trial runs (one would force a snapshot of the whole study per checkpoint);
        # KeepLastCheckpoint leaves ended trials their last (gvae.study.checkpoints).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=KEPT_WHILE_RUNNING),
        verbose=1 if verbose else 0,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(**tune_config),
        run_config=run_config,
    )


def _optuna_search(spec: StudySpec) -> Searcher:
    """Optuna over the study's space; with replicates, each suggestion runs on several seeds."""
    search: Searcher = OptunaSearch(
        metric=[o.metric for o in spec.objectives],
        mode=[o.mode for o in spec.objectives],
        seed=0,
    )
    if spec.replicates > 1 and spec.pack == 1:
        search = SeedReplicates(search, spec.replicates, base_seed=spec.fixed.get("seed", 0))
    return search


def _domain(value: Range | list[Any]) -> Any:
    if isinstance(value, list):
        return tune.choice(value)
    if value.integer:
        sampler = tune.lograndint if value.log else tune.randint
        return sampler(int(value.low), int(value.high) + 1)
    return (tune.loguniform if value.log else tune.uniform)(value.low, value.high)


def _scheduler(spec: StudySpec) -> ASHAScheduler | None:
    if spec.scheduler is None:
        return None
    return DivergenceTolerantASHA(
        metric=spec.scheduler.metric,
        mode=spec.scheduler.mode,
        time_attr="training_iteration",  # counts evaluations
        max_t=spec.iterations // spec.eval_every + 1,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def summary_lines(store: ResultsStore, spec: StudySpec) -> list[str]:
    """A short end-of-study summary: counts by status, the best trials, the failures."""
    trials = store.read(TRIALS)
    if trials.empty:
        return ["no trials recorded yet"]
    counts = trials["status"].value_counts().to_dict()
    lines = [f"study {spec.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    done = trials[trials["status"] == "finished"]
    for dataset, group in done.groupby("dataset"):  # mode entropies compare within a dataset
        best = group.sort_values("final_mode_entropy", ascending=False).head(5)
        modes = len(best.iloc[0]["final_class_histogram"])  # 10 digits, or 8 face modes
        where = f" on {dataset}" if len(spec.datasets) > 1 else ""
        lines.append(
            f"best by final mode_entropy{where} (ln {modes} = {math.log(modes):.3f} is the "
            "ceiling):"
        )
        for _, row in best.iterrows():
            lines.append(
                f"  {row['trial_id']}  {row['model']:8s} seed={row['seed']}  "
                f"mode_entropy {row['final_mode_entropy']:.3f}  "
                f"mean_image_entropy {row['final_mean_image_entropy']:.3f}"
            )
    for _, row in trials[trials["status"].isin(["failed", "diverged"])].iterrows():
        reason = row["error"] if row["status"] == "failed" else f"at it {row['diverged_at']:.0f}"
        lines.append(f"  {row['status']}: {row['trial_id']} {row['model']}: {reason}")
    lines.append(f"tables: {store.location(TRIALS)}, {store.location('curves.parquet')}")
    return lines
