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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
import yaml
from ray import tune
from ray.tune.error import TuneError
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from gvae.data import load_dataset
from gvae.errors import GvaeError
from gvae.evaluator import load_or_train_evaluator
from gvae.io import StorageFull, is_full
from gvae.study.lease import StudyLease
from gvae.study.recorder import ParquetRecorder
from gvae.study.results import TRIALS, ResultsStore, study_uri
from gvae.study.searcher import DivergenceTolerantASHA, DivergenceTolerantSearch, make_tolerant
from gvae.study.spec import Range, StudySpec, parse_study, read_yaml
from gvae.study.trainable import train_trial

EXPERIMENT = "tune"
# Tune warns when trials checkpoint faster than it snapshots; frequent small checkpoints are the
# point here (every evaluation), so the warning is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
SPEC_FILE = "study.yaml"
# How long a study on a cluster waits for the autoscaler to bring a node that fits one trial:
# launching a cloud GPU instance and running its setup commands takes minutes.
RESOURCE_WAIT_SECONDS = 900.0
# Trial statuses that mean the trial has ended (the rest: pending, running).
ENDED = ("finished", "diverged", "stopped", "failed")


class _HideTuneHints(logging.Filter):
    """At a stop Tune names its Python API (`Tuner.restore(...)`) and warns about trials that had
    not reported yet; gvae says instead how far the study got and which command continues it."""

    HIDDEN = (
        "Resume experiment with",
        "Failed to fetch metrics",
        "Trials did not complete",
        # A study begun before DivergenceTolerantSearch has no state saved for it (it has none).
        "DivergenceTolerantSearch was not found",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] and is_full(record.exc_info[1]):
            return False  # a full disk: gvae's own line names the path and the fix
        return not any(hidden in message for hidden in self.HIDDEN)


for _name in (
    "ray.tune.tune",
    "ray.tune.analysis.experiment_analysis",
    "ray.tune.search.search_generator",
):
    logging.getLogger(_name).addFilter(_HideTuneHints())


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
) -> StudyRun:
    """Run (or continue) a study; returns where its tables are and how far it got."""
    storage = storage or spec.storage
    uri = study_uri(storage, spec.name)
    store = ResultsStore(uri)
    address = address or os.environ.get("RAY_ADDRESS")
    _check_devices(spec, local=not address)
    resume = resume_command(spec.name, storage, address)
    lease = StudyLease(uri, spec.name, log=log)
    with _storage_errors(uri, resume):
        _check_same_study(store, raw_spec)
        lease.acquire(force=force)
    try:
        with _storage_errors(uri, resume):
            return _run_leased(spec, raw_spec, store, address, log, resource_wait)
    finally:
        with contextlib.suppress(OSError):  # a full or unreachable storage: the lease lapses
            lease.release()


def _run_leased(
    spec: StudySpec,
    raw_spec: dict[str, Any],
    store: ResultsStore,
    address: str | None,
    log: Callable[[str], None],
    resource_wait: float,
) -> StudyRun:
    data_root = Path(spec.fixed.get("data_root", "data")).expanduser().resolve()
    dataset = load_dataset(spec.dataset, data_root)
    evaluator = load_or_train_evaluator(dataset, log=log)
    # Tune runs every trial in a folder of its own, where a relative data_root finds nothing:
    # trials get the folder the driver found the data in.
    spec = replace(spec, fixed={**spec.fixed, "data_root": str(data_root)})

    _leave_job_working_dir()
    _init_ray(address, log)
    _check_resources(spec, resource_wait if address else 0.0, log)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, evaluator_state=evaluator.state()),
        {"cpu": spec.cpus, "gpu": spec.gpus},
    )
    experiment = f"{store.root}/{EXPERIMENT}"
    filesystem = store.fs if "://" in store.uri else None  # Tune gets S3 options as we have them
    resumed = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    if resumed:
        where = store.location(EXPERIMENT)
        log(f"resuming study {spec.name} from {where}: finished trials are kept")
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, storage_filesystem=filesystem
        )
        _tolerate_missing_objectives(tuner)
    else:
        _write_spec(store, raw_spec)
        recorder = ParquetRecorder(store, spec.name, provenance())
        tuner = _new_tuner(spec, trainable, store, recorder)
    _fit(tuner)
    trials = store.read(TRIALS)
    statuses = trials["status"] if not trials.empty else []
    done = sum(status in ENDED for status in statuses)
    failed = sum(status == "failed" for status in statuses)
    return StudyRun(spec, store, resumed, done, failed)


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
    config = internal._tune_config
    config.search_alg, config.scheduler = make_tolerant(config.search_alg, config.scheduler)


def resume_command(name: str, storage: str, address: str | None) -> str:
    """The gvae command that continues this study from wherever it is run."""
    command = f"gvae study resume {name}"
    if storage != "results":
        command += f" --storage {storage if '://' in storage else Path(storage).resolve()}"
    return command + (f" --address {address}" if address else "")


@contextlib.contextmanager
def _storage_errors(uri: str, resume: str) -> Iterator[None]:
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
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise GvaeError(
            f"storage: cannot use {uri}: {first}; check the bucket name, the credentials "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and endpoint_override (docs/cluster.md)"
        ) from None


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


def _init_ray(address: str | None, log: Callable[[str], None]) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        log(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(log_to_driver=False)
    resources = ray.cluster_resources()
    log(
        f"ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
        f"{resources.get('GPU', 0):g} GPUs"
    )


def _leave_job_working_dir() -> None:
    """Under `ray job submit --working-dir`, step out of the unpacked working dir.

    Ray may delete that folder while the job's driver still runs (seen right after ray.init), and
    Tune's final ExperimentAnalysis then fails in os.getcwd() (ray-project/ray issue 52343).
    Every path the driver needs is absolute by now.
    """
    if "working_dir_files" in os.getcwd():
        os.chdir(os.path.expanduser("~"))


def _check_devices(spec: StudySpec, local: bool) -> None:
    """Refuse, before Ray starts, trials that ask for CUDA where they cannot get it."""
    asked = _cuda_fields(spec)
    if asked and spec.gpus <= 0:
        raise GvaeError(
            f"{asked[0]}: trials ask for a CUDA device but resources.gpus is 0, so Ray gives them "
            "no GPU; set resources.gpus: 1 (or a fraction such as 0.5), or device: auto"
        )
    if local and (asked or spec.gpus > 0) and not torch.cuda.is_available():
        field = asked[0] if asked else "resources.gpus"
        raise GvaeError(
            f"{field}: trials ask for a GPU but this machine has none (torch finds no CUDA "
            "device or driver); set resources.gpus: 0 and device: auto, or join a GPU cluster "
            "with --address"
        )


def _cuda_fields(spec: StudySpec) -> list[str]:
    """The study-file keys that make a trial ask for device cuda."""
    fields = []
    if str(spec.fixed.get("device", "")).startswith("cuda"):
        fields.append("fixed.device")
    if any(str(v).startswith("cuda") for v in spec.grid.get("device", [])):
        fields.append("search.grid.device")
    space = spec.space.get("device")
    if isinstance(space, list) and any(str(v).startswith("cuda") for v in space):
        fields.append("search.optuna.space.device")
    return fields


def _check_resources(spec: StudySpec, wait: float, log: Callable[[str], None]) -> None:
    """Stop, with the fix, when no Ray node can hold one trial within `wait` seconds.

    Tune only warns about trials it cannot place and then waits for ever; on a cluster the
    autoscaler may still add a node that fits, so that case waits first.
    """
    demand = {"CPU": spec.cpus, "GPU": spec.gpus}
    deadline = time.monotonic() + wait
    while (missing := _unplaceable(demand)) is not None:
        if time.monotonic() >= deadline:
            raise GvaeError(_resource_error(spec, missing, wait))
        log(f"waiting for the autoscaler to add a node with {_describe(demand)} ...")
        time.sleep(min(10.0, max(deadline - time.monotonic(), 0.0)))


def _unplaceable(demand: dict[str, float]) -> tuple[str, float] | None:
    """None when a live node holds the demand, else (resource, the most one node has)."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(all(node.get(k, 0) >= v for k, v in demand.items() if v > 0) for node in nodes):
        return None
    for key, value in demand.items():
        most = max((node.get(key, 0) for node in nodes), default=0)
        if value > 0 and most < value:
            return key, most
    return "CPU+GPU", 0.0  # each fits somewhere, never together


def _resource_error(spec: StudySpec, missing: tuple[str, float], wait: float) -> str:
    key, most = missing
    waited = f"(waited {wait:g} s for the autoscaler)" if wait else "(a local Ray does not grow)"
    if key == "GPU":
        return (
            f"resources.gpus: trials ask for {spec.gpus:g} GPU but no Ray node has that many "
            f"{waited}; set resources.gpus: 0 or add GPU workers (see cluster.yaml)"
        )
    if key == "CPU":
        return (
            f"resources.cpus: a trial asks for {spec.cpus:g} CPUs but the largest Ray node has "
            f"{most:g} {waited}; set resources.cpus: {max(most, 1):g} or less, or add bigger nodes"
        )
    return (
        f"resources: no Ray node has both {spec.cpus:g} CPUs and {spec.gpus:g} GPUs {waited}; "
        "lower resources.cpus or add bigger GPU nodes"
    )


def _describe(demand: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}s" for k, v in demand.items() if v > 0)


def _new_tuner(
    spec: StudySpec, trainable: Any, store: ResultsStore, recorder: ParquetRecorder
) -> tune.Tuner:
    param_space: dict[str, Any] = dict(spec.base_config())
    tune_config: dict[str, Any] = {
        "max_concurrent_trials": spec.concurrency or None,
        "scheduler": _scheduler(spec),
        "reuse_actors": True,  # no new worker process (and torch import) per trial
    }
    if spec.search_type == "grid":
        param_space["model"] = tune.grid_search(list(spec.models))
        for key, values in spec.grid.items():
            param_space[key] = tune.grid_search(values)
    else:
        param_space["model"] = (
            tune.choice(list(spec.models)) if len(spec.models) > 1 else spec.models[0]
        )
        param_space.update({key: _domain(value) for key, value in spec.space.items()})
        optuna = OptunaSearch(
            metric=[o.metric for o in spec.objectives],
            mode=[o.mode for o in spec.objectives],
            seed=0,
        )
        tune_config["search_alg"] = DivergenceTolerantSearch(optuna)
        tune_config["num_samples"] = spec.trials
    run_config = tune.RunConfig(
        name=EXPERIMENT,
        storage_path=store.root if "://" in store.uri else store.uri,
        storage_filesystem=store.fs if "://" in store.uri else None,
        callbacks=[recorder],
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(**tune_config),
        run_config=run_config,
    )


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
    if not done.empty:
        best = done.sort_values("final_mode_entropy", ascending=False).head(5)
        modes = len(best.iloc[0]["final_class_histogram"])  # 10 digits, or 8 face modes
        lines.append(
            f"best by final mode_entropy (ln {modes} = {math.log(modes):.3f} is the ceiling):"
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
