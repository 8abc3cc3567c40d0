"""`gvae study run | resume | status`: studies on Ray Tune, results in Parquet."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gvae.errors import GvaeError
from gvae.io import probe_writable
from gvae.study.folder import SPEC_FILE, load_saved_spec
from gvae.study.results import TRIALS, ResultsStore, study_uri
from gvae.study.spec import load_study, read_study_file, with_mlflow

if TYPE_CHECKING:
    from gvae.study.ray_start import RayStart


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("study", help="run, resume or inspect a study on Ray Tune")
    commands = parser.add_subparsers(dest="study_command", required=True)

    run = commands.add_parser(
        "run",
        help="run a study file (runs again continue an interrupted study)",
        description="Run STUDY.yaml with Ray Tune. Running the same file again continues an "
        "interrupted study: finished trials are kept, unfinished ones resume from checkpoints.",
    )
    run.add_argument("study_file", type=Path)
    _cluster_options(run)
    run.set_defaults(run=_run)

    resume = commands.add_parser("resume", help="continue an interrupted study by name")
    resume.add_argument("name")
    _cluster_options(resume)
    resume.set_defaults(run=_resume)

    status = commands.add_parser("status", help="trial counts and best trials of a study")
    status.add_argument("name")
    status.add_argument("--storage", default="results", help="results folder or URI")
    status.set_defaults(run=_status)

    repair = commands.add_parser(
        "repair",
        help="rebuild a study's tables from its trials' checkpoints and Tune's saved state",
        description="Rebuild trials.parquet and curves.parquet of a study whose table files were "
        "lost or cut short, from each trial's newest checkpoint and Tune's saved state (a resume "
        "does the same before it trains).",
    )
    repair.add_argument("name")
    repair.add_argument("--storage", default="results", help="results folder or URI")
    repair.set_defaults(run=_repair)


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (host:port, ray://host:10001 or auto; default: $RAY_ADDRESS, "
        "else start Ray on this machine)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="results folder or URI reachable by every node, e.g. s3://bucket/gvae "
        "(default: the study file's storage, else ./results)",
    )
    parser.add_argument(
        "--resource-wait",
        "--gpu-wait",
        dest="resource_wait",
        type=float,
        default=None,
        help="seconds to wait for the cluster's autoscaler to add a node that can hold one trial "
        "(its resources.cpus and resources.gpus) when none can (default: 900; without "
        "--address: no wait, a local Ray does not grow)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="take the study over from another driver that holds it (use when that driver "
        "died; a dead driver's hold lapses by itself 60 s after its last heartbeat)",
    )
    parser.add_argument(
        "--mlflow",
        metavar="TRACKING_URI",
        default=None,
        help="log each trial as an MLflow run there (e.g. sqlite:///mlflow.db; needs "
        "pip install -e '.[mlflow]'), as tracking.mlflow in the study file does",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray Tune's own status tables and trial results instead of one line per trial",
    )


def _run(args: argparse.Namespace) -> int:
    spec = load_study(args.study_file)  # validated before Ray starts
    raw = read_study_file(args.study_file)
    return _execute(spec, raw, args)


def _resume(args: argparse.Namespace) -> int:
    spec, raw = load_saved_spec(args.storage or "results", args.name)
    return _execute(spec, raw, args)


def _execute(spec: Any, raw: dict[str, Any], args: argparse.Namespace) -> int:
    """Exit status: 0 every trial ended with a result (finished, diverged, stopped), 1 some
    failed after their retries, 2 bad input (GvaeError, in gvae.cli), 130 interrupted."""
    if args.mlflow:
        spec = with_mlflow(spec, args.mlflow)
    # Before Ray starts, or is even imported: a storage nothing can be written to.
    _check_storage(
        args.storage or spec.storage, spec.name, "--storage" if args.storage else "storage"
    )
    from gvae.study import compat  # first: it sets what Ray reads at its import
    from gvae.study.ray_start import RayStart
    from gvae.study.resources import check_devices

    # Before any Ray starts (imports torch only for a study that asks for a GPU).
    check_devices(spec, local=not (args.address or os.environ.get("RAY_ADDRESS")))
    ray_start = RayStart.begin(args.address)
    try:
        with compat.sigterm_interrupts():
            return _run_and_summarise(spec, raw, args, ray_start)
    finally:  # also after bad input found once Ray began starting
        ray_start.close()


def _check_storage(storage: str, name: str, key: str) -> None:
    """Refuse a local storage where the study's folder cannot be made or written (a file in the
    way, no permission, a read-only disk), leaving nothing behind; URIs (s3://) are left to the
    driver, whose filesystem reports an unreachable bucket."""
    if "://" in storage:
        return
    folder = Path(study_uri(storage, name))
    try:
        probe_writable(folder)
    except OSError as error:
        blocker = next(part for part in [folder, *folder.parents] if os.path.lexists(part))
        reason = f"{blocker} is not a folder" if not blocker.is_dir() else error.strerror
        fix = "pass a --storage folder you can write"
        if key == "storage":
            fix = "set storage to a folder you can write, or pass --storage"
        message = f"{key}: cannot write the study folder {folder} ({reason}); {fix}"
        raise GvaeError(message) from None


def _run_and_summarise(
    spec: Any, raw: dict[str, Any], args: argparse.Namespace, ray_start: RayStart
) -> int:
    from analysis.summary import summary_lines, summary_trials
    from gvae.study.driver import resume_command, run_study  # torch: slow import

    wait = {} if args.resource_wait is None else {"resource_wait": args.resource_wait}
    storage = args.storage or spec.storage
    store = ResultsStore(study_uri(storage, spec.name))
    resume = resume_command(spec.name, storage, args.address)
    try:
        run = run_study(
            spec,
            raw,
            address=args.address,
            storage=storage,
            force=args.force,
            verbose=args.verbose,
            ray_start=ray_start,
            **wait,
        )
    except KeyboardInterrupt:  # a second Ctrl-C, or the local Ray stopped by the same SIGTERM
        print(_interrupted_line(spec, store, resume), file=sys.stderr)
        return 130
    print("\n".join(summary_lines(summary_trials(store), store, spec)))
    if run.interrupted:
        print(_interrupted_line(spec, store, resume), file=sys.stderr)
        return 130
    return 1 if run.failed else 0


def _interrupted_line(spec: Any, store: ResultsStore, resume: str) -> str:
    if not store.exists(SPEC_FILE):  # stopped before the study began: nothing to resume
        return (
            f"gvae: interrupted before study {spec.name} began; nothing was recorded, and "
            "`gvae study run FILE` starts it"
        )
    trials = store.read(TRIALS, ["status"])
    statuses = trials["status"].value_counts().to_dict() if not trials.empty else {}
    ended = {s: n for s, n in statuses.items() if s not in ("running", "pending")}
    counts = ", ".join(f"{n} {s}" for s, n in sorted(ended.items()))
    return (
        f"gvae: interrupted: study {spec.name} has {sum(ended.values())} of {spec.trial_count} "
        f"trials done{f' ({counts})' if counts else ''}; `{resume}` continues it"
    )


def _repair(args: argparse.Namespace) -> int:
    from gvae.study.driver import repair_study

    repair_study(args.storage, args.name)
    store = ResultsStore(study_uri(args.storage, args.name))
    counts = store.read(TRIALS, ["status"])["status"].value_counts().to_dict()
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"study {args.name}: tables rebuilt ({summary or 'no trials'})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from analysis.summary import summary_lines, summary_trials

    spec, _ = load_saved_spec(args.storage, args.name)
    store = ResultsStore(study_uri(args.storage, args.name))
    trials = summary_trials(store)
    if trials.empty:
        raise GvaeError(f"name: study {args.name!r} has no recorded trials yet")
    print("\n".join(summary_lines(trials, store, spec)))
    return 0
