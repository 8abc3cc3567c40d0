"""Run a study with Ray Tune: start or join Ray, build the Tuner (or restore it), record results.

Layout of a study folder `<storage>/<name>/`: `study.yaml` (the spec that ran), `trials.parquet`,
`curves.parquet`, and `tune/`, Ray Tune's experiment folder (checkpoints, searcher state), which is
what makes `gvae study resume` possible.
"""

from __future__ import annotations

import contextlib
import json
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
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from gvae.config import TrialConfig
from gvae.data import load_dataset
from gvae.errors import GvaeError
from gvae.evaluation import load_or_train_evaluator
from gvae.io import atomic_local_filesystem
from gvae.study import compat
from gvae.study.faults import StopWhenStorageFull, resume_command, storage_errors
from gvae.study.lease import StudyLease
from gvae.study.outcome import ENDED
from gvae.study.packs import PACKED_SUGGESTION, SEEDS, pack_points, replicate_seeds
from gvae.study.progress import ConsoleProgress
from gvae.study.ray_start import RayStart
from gvae.study.replicates import SeedReplicates
from gvae.study.resources import RESOURCE_WAIT_SECONDS, check_devices, check_resources
from gvae.study.results import TRIALS, ResultsStore, study_uri
from gvae.study.spec import Range, StudySpec, parse_study, read_yaml
from gvae.study.tables import SUGGESTION, StudyTables, Tables
from gvae.study.trainable import train_trial

EXPERIMENT = "tune"
SPEC_FILE = "study.yaml"
# What a study folder holds and how, besides Tune's own experiment folder: the tables' layout,
# which rows a trial writes. A folder of another format is refused, not converted.
FORMAT_FILE = "format.json"
FORMAT = 2
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
    compat.quiet_tune_output(verbose)
    ray_start.wait(log)
    check_resources(spec, resource_wait if ray_start.address else 0.0, log)
    experiment = f"{store.root}/{EXPERIMENT}"
    resumed = tune.Tuner.can_restore(experiment, storage_filesystem=_tune_filesystem(store))
    if resumed:
        where = store.location(EXPERIMENT)
        log(f"resuming study {spec.name} from {where}: finished trials are kept")
        _note_other_versions(store, log)
    else:
        _write_spec(store, raw_spec)
    tables = StudyTables(Tables.of(spec, store.uri, provenance()), spec.tune_trial_count)
    tables.prepare()
    _fit(spec, store, tables, evaluator_states, image_sizes, resumed, verbose)
    statuses = store.read_table(TRIALS, ["status"]).column("status").to_pylist()
    done = sum(status in ENDED for status in statuses)
    return StudyRun(spec, store, resumed, done, statuses.count("failed"))


def _tune_filesystem(store: ResultsStore) -> pafs.FileSystem:
    """Tune's storage: the S3 filesystem with the URI's options (endpoint_override, ...), or on
    local disks one that writes files whole, so a full disk cannot cut Tune's state short."""
    return store.fs if "://" in store.uri else atomic_local_filesystem()


def _fit(
    spec: StudySpec,
    store: ResultsStore,
    tables: StudyTables,
    evaluator_states: dict[str, dict[str, Any]],
    image_sizes: dict[str, int],
    resumed: bool,
    verbose: bool,
) -> None:
    """Run Tune over the study, a new experiment or the saved one continued (`resumed`), with
    this run's callbacks, searcher and scheduler (Tune restores their saved state into them),
    raising the error that stopped it as it was (Tune wraps it in TuneError)."""
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, evaluator_states=evaluator_states, tables=tables.tables),
        {"cpu": spec.cpus, "gpu": spec.gpus},
    )
    # The guard first: it stops the study before a trial is recorded failed for a full disk.
    callbacks = [StopWhenStorageFull(store.uri), tables]
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
            scheduler=_scheduler(spec),
            **_search(spec, image_sizes),
        )
    except TuneError as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, GvaeError | OSError):
            cause = cause.__cause__ or cause.__context__
        raise (cause or error) from None


def _search(spec: StudySpec, image_sizes: dict[str, int]) -> dict[str, Any]:
    """tune.run's search arguments: the grid's points in the order they start (Tune's own grid
    order is by key name), or Optuna over the space."""
    space: dict[str, Any] = dict(spec.base_config())
    space["model"] = tune.choice(list(spec.models)) if len(spec.models) > 1 else spec.models[0]
    if spec.search_type == "grid":
        points = tune_points(spec, image_sizes)
        space["model"] = tune.choice(list(spec.models))
        # Points may only set keys the space has; every point sets them all, so nothing is drawn.
        space["dataset"] = tune.choice(list(spec.datasets))
        space.update({key: tune.choice(values) for key, values in spec.grid.items()})
        if spec.pack > 1:
            del space["seed"]
            space[SEEDS] = tune.choice([point[SEEDS] for point in points])
        generator = BasicVariantGenerator(
            points_to_evaluate=points, max_concurrent=spec.concurrency
        )
        return {"config": space, "search_alg": generator, "num_samples": len(points)}
    space.update({key: _domain(value) for key, value in spec.space.items()})
    if spec.pack > 1:  # one trial per suggestion, training its replicates as one pack
        space[SEEDS] = replicate_seeds(spec.fixed.get("seed", 0), spec.replicates)
        space[SUGGESTION] = PACKED_SUGGESTION
    searcher = _optuna_search(spec)
    if spec.concurrency:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.concurrency)
    return {"config": space, "search_alg": searcher, "num_samples": spec.tune_trial_count}


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
    """Refuse to mix two different studies under one name, or to continue a study folder of
    another format."""
    if not _exists(store, SPEC_FILE):
        return
    found = _read_format(store).get("format", 1)
    if found != FORMAT:
        versions = "an earlier" if found < FORMAT else "a later"
        raise GvaeError(
            f"study: {store.uri} was written by {versions} version of gvae (study format "
            f"{found}, this one reads {FORMAT}); finish it with the version that wrote it, or "
            "start it afresh under another name or after removing that folder"
        )
    with store.fs.open_input_stream(f"{store.root}/{SPEC_FILE}") as stream:
        saved = read_yaml(stream.readall().decode())
    if saved != raw_spec:
        raise GvaeError(
            f"name: a different study named {raw_spec['name']!r} already ran in {store.uri}; "
            "rename this study or remove that folder"
        )


def _write_spec(store: ResultsStore, raw_spec: dict[str, Any]) -> None:
    store.fs.create_dir(store.root, recursive=True)
    versions = {name: _version(name) for name in ("gvae", "ray", "optuna", "torch")}
    with store.fs.open_output_stream(store.path(FORMAT_FILE)) as stream:
        stream.write(json.dumps({"format": FORMAT, "versions": versions}).encode())
    with store.fs.open_output_stream(store.path(SPEC_FILE)) as stream:
        stream.write(yaml.safe_dump(raw_spec, sort_keys=False).encode())


def _read_format(store: ResultsStore) -> dict[str, Any]:
    if not _exists(store, FORMAT_FILE):
        return {}
    with store.fs.open_input_stream(store.path(FORMAT_FILE)) as stream:
        return json.loads(stream.readall())


def _note_other_versions(store: ResultsStore, log: Callable[[str], None]) -> None:
    """Say so when the study was begun under another minor release of Ray or Optuna, whose
    saved state this one may read differently."""
    began = _read_format(store).get("versions", {})
    for package in ("ray", "optuna"):
        then, now = began.get(package), _version(package)
        if then and now and then.split(".")[:2] != now.split(".")[:2]:
            log(f"study began under {package} {then}; continuing it under {package} {now}")


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
    return ASHAScheduler(
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
