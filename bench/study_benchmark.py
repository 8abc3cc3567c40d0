"""Overhead of a study of many tiny trials: gvae against its minimum and against plain Ray Tune.

Run as `.venv/bin/python bench/study_benchmark.py [--trials 400] [--iterations 50]
[--eval-samples 200] [--batch-size 32] [--model vae] [--skip-plain] [--repeats 1]`, or with
`--study FILE` to time a study file (e.g. studies/quick.yaml) against its minimum alone. Not a
test: it prints a header line and one line per run (see README.md).

1. `gvae study run` on a grid of `--trials` seeds of one model, on a local Ray started by the
   command itself (every CPU of this machine, one per trial). Wall time is that of the whole
   command; the minimum is the sum of the trials' own times (Tune's `time_total_s`, recorded as
   `wall_seconds`) over the CPUs: what a scheduler with no overhead at all would take.
2. Plain Ray Tune running gvae's trainer, in a fresh process: the same trials (the same configs,
   `gvae.trainer.run_trial` with the same evaluator, cached per worker as gvae caches it), each
   evaluation reported to `tune.report` with the trainer's checkpoint, actors reused, Tune's
   defaults otherwise. The ratio of the two wall times is what gvae's study machinery (its
   tables, callbacks, lease, console and checks) costs over Tune running the same work.
3. Plain Ray Tune in a fresh process: the same count of function trials, each busy for the
   gvae study's median trial time, each reporting once with a checkpoint as large as a gvae
   trial's (its model and optimiser state: 10 MB for the default VAE, so both runs write as
   many bytes to the disk), actors reused. `--small-checkpoint` makes it a few bytes instead,
   which charges gvae for its model's size as well. These trials last the median's wall time
   whatever the load, while gvae's last as long as their work takes on a machine they share
   with the driver: their mean is above their median, so this ratio also charges gvae for the
   spread of its trials' times.

Runs 1 and 2 are repeated `--repeats` times in alternating order, each pair's ratio printed and then
their median. Before each run, the previous run's folder is removed and the disk synced (`os.sync`),
so that it starts as the others did: without gigabytes of another run's checkpoints in the page
cache or waiting to be written back. Each run's wall time is also split into its startup (command
start to the first trial's start: imports, starting Ray, the first worker), its trial phase (first
trial start to last trial end, against the same minimum) and its teardown (last trial end to the
command's exit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import pandas as pd
import yaml

from gvae.study.spec import StudySpec, load_study

ROOT = Path(__file__).resolve().parent.parent


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def settle() -> None:
    """Write every dirty page to disk before a run: each run writes gigabytes of checkpoints, and
    the next one would otherwise pay for the disk writing them back."""
    tick = time.perf_counter()
    os.sync()
    print(f"  sync before the next run: {time.perf_counter() - tick:.1f} s", flush=True)


def run_gvae(study: Path, storage: Path) -> tuple[float, float, int]:
    """Start time (epoch seconds) and wall seconds of `gvae study run`, and the lines it printed."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as a new user's first run
    start, tick = time.time(), time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "gvae.cli", "study", "run", str(study), "--storage", str(storage)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - tick
    if out.returncode != 0:
        sys.exit(f"gvae study run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return start, wall, len((out.stdout + out.stderr).splitlines())


def tiny_study(folder: Path, args: argparse.Namespace) -> Path:
    path = folder / "bench_tiny.yaml"
    study = {
        "name": "bench_tiny",
        "dataset": "mnist5k",
        "models": [args.model],
        "iterations": args.iterations,
        "eval_every": args.iterations,
        "fixed": {"batch_size": args.batch_size, "eval_samples": args.eval_samples},
        "search": {"grid": {"seed": list(range(args.trials))}},
        "resources": {"cpus": 1},
    }
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def report_line(label: str, start: float, wall: float, trials: pd.DataFrame, cpus: int) -> float:
    """Print a run's figures; `trials` has each trial's `seconds`, `started` and `ended`."""
    minimum = trials.seconds.sum() / cpus
    first, last = trials.started.min() - start, trials.ended.max() - start
    print(
        f"{label}: {len(trials)} trials, median trial {trials.seconds.median():.2f} s, "
        f"wall {wall:.1f} s, minimum {minimum:.1f} s (sum of trial times / {cpus} CPUs), "
        f"wall / minimum {wall / minimum:.2f}\n"
        f"  startup {first:.1f} s, trial phase {last - first:.1f} s (/ minimum "
        f"{(last - first) / minimum:.2f}), teardown {wall - last:.1f} s",
        flush=True,
    )
    return minimum


def plain_tune(trials: int, seconds: float, checkpoint_bytes: int, storage: Path) -> None:
    """Runs in its own process: `trials` function trials busy for `seconds` each, each writing
    a checkpoint of `checkpoint_bytes`."""
    import ray
    from ray import tune

    def trainable(config: dict) -> None:
        started = time.time()
        end = time.perf_counter() + config["seconds"]
        total = 0
        while time.perf_counter() < end:  # busy, like a training loop
            total += 1
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "state.bin").write_bytes(total.to_bytes(8) * (config["bytes"] // 8))
            checkpoint = tune.Checkpoint.from_directory(directory)
            tune.report({"started": started, "ended": time.time()}, checkpoint=checkpoint)

    ray.init(log_to_driver=False)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"seconds": seconds, "bytes": max(checkpoint_bytes, 8)},
        tune_config=tune.TuneConfig(num_samples=trials, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(storage), name="plain", verbose=0),
    )
    results = tuner.fit()
    rows = [
        {key: result.metrics[key] for key in ("started", "ended")}
        | {"seconds": result.metrics["time_total_s"]}
        for result in results
    ]
    print(f"PLAIN {json.dumps(rows)}")


EVALUATORS: dict[str, object] = {}  # one per worker process, as gvae's trials keep it


def plain_trainer(trials: int, base: dict, storage: Path) -> None:
    """Runs in its own process: gvae's trainer as a plain Tune function trainable, one trial per
    seed 0..trials-1 of the `base` config."""
    import ray
    from ray import tune

    from gvae.config import TrialConfig
    from gvae.data import load_dataset
    from gvae.evaluation import Evaluator, load_or_train_evaluator
    from gvae.trainer import run_trial

    def trainable(config: dict, evaluator_state: dict) -> None:
        started = time.time()
        if "evaluator" not in EVALUATORS:
            EVALUATORS["evaluator"] = Evaluator.from_state(evaluator_state)

        def report(metrics: dict, checkpoint_dir: Path) -> None:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            scalars |= {"started": started, "ended": time.time()}
            tune.report(scalars, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

        trial = TrialConfig.from_dict(config).validate()
        run_trial(trial, report=report, evaluator=EVALUATORS["evaluator"], log=lambda _: None)

    ray.init(log_to_driver=False)
    dataset = load_dataset(base["dataset"], Path(base["data_root"]))
    state = load_or_train_evaluator(dataset, log=lambda _: None).state()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, evaluator_state=state), {"cpu": 1}),
        param_space={**base, "seed": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(storage), name="plain", verbose=0),
    )
    results = tuner.fit()
    rows = [
        {"started": r.metrics["started"], "ended": r.metrics["ended"]}
        | {"seconds": r.metrics["ended"] - r.metrics["started"]}
        for r in results
    ]
    print(f"PLAIN {json.dumps(rows)}")


def run_plain(*arguments: str) -> tuple[float, float, pd.DataFrame]:
    """Run this file with `arguments` (`--plain-run ...` or `--plain-trainer ...`) in a fresh
    process: start time, wall seconds and the trials' times it printed."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, __file__, *arguments]
    start, tick = time.time(), time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PLAIN ")), None)
    if out.returncode != 0 or line is None:
        sys.exit(f"plain Tune run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return start, wall, pd.DataFrame(json.loads(line.removeprefix("PLAIN ")))


def checkpoint_size(study: Path) -> int:
    """The median size in bytes of the study's trials' last checkpoints (Tune's folder)."""
    sizes = []
    for trial in (study / "tune").iterdir():
        checkpoints = sorted(trial.glob("checkpoint_*"))
        if checkpoints:
            sizes.append(sum(f.stat().st_size for f in checkpoints[-1].iterdir()))
    return int(pd.Series(sizes).median()) if sizes else 8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="vae")
    parser.add_argument("--skip-plain", action="store_true", help="only the gvae study")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="pairs of gvae and plain Tune with gvae's trainer, in alternating order",
    )
    parser.add_argument("--study", type=Path, help="time this study file instead")
    parser.add_argument(
        "--small-checkpoint",
        action="store_true",
        help="plain Tune's trials checkpoint a few bytes, not as much as gvae's",
    )
    parser.add_argument("--plain-run", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--plain-trainer", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_run:
        trials, seconds, size, storage = args.plain_run
        plain_tune(int(trials), float(seconds), int(size), Path(storage))
        return
    if args.plain_trainer:
        trials, base, storage = args.plain_trainer
        plain_trainer(int(trials), json.loads(base), Path(storage))
        return

    cpus = os.cpu_count() or 1
    print(f"study benchmark | {platform.node()} | {cpus} logical CPUs | load {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gvae-study-bench-") as folder:
        study = args.study or tiny_study(Path(folder), args)
        spec = load_study(study)
        if args.study or args.skip_plain:
            timed_gvae(study, spec.name, Path(folder), cpus)
            return
        ratios = []
        for repeat in range(args.repeats):
            # Alternate which runs first, so that neither is always the one that meets a
            # colder page cache or the other's leftover load.
            if repeat % 2 == 0:
                wall, trials, size = timed_gvae(study, spec.name, Path(folder), cpus)
                same_wall = timed_plain_trainer(spec, args.model, Path(folder), cpus)
            else:
                same_wall = timed_plain_trainer(spec, args.model, Path(folder), cpus)
                wall, trials, size = timed_gvae(study, spec.name, Path(folder), cpus)
            ratios.append(wall / same_wall)
            print(f"gvae wall / plain Tune with gvae's trainer wall {ratios[-1]:.2f}", flush=True)
        if args.repeats > 1:
            spread = ", ".join(f"{ratio:.2f}" for ratio in ratios)
            print(f"gvae / plain Tune with gvae's trainer: median {median(ratios):.2f} ({spread})")
        size = 8 if args.small_checkpoint else size
        print(f"  checkpoint: {size / 1e6:.2f} MB per trial for plain Tune", flush=True)
        settle()
        plain_start, plain_wall, plain = run_plain(
            "--plain-run",
            str(len(trials)),
            str(float(trials.seconds.median())),
            str(size),
            str(Path(folder) / "plain"),
        )
        busy = "plain Ray Tune, busy trials"
        plain_minimum = report_line(busy, plain_start, plain_wall, plain, cpus)
        gvae_minimum = trials.seconds.sum() / cpus
        print(
            f"gvae wall / plain Tune busy wall {wall / plain_wall:.2f}; "
            f"gvae minimum / plain minimum {gvae_minimum / plain_minimum:.2f}; "
            f"load {load()}"
        )


def timed_gvae(study: Path, name: str, folder: Path, cpus: int) -> tuple[float, pd.DataFrame, int]:
    """Run the study file (named `name`) with gvae from a synced disk; its wall time, its trials'
    times (started_at: when Tune started the trial; wall_seconds: the trial's own time) and
    checkpoint size. Its folder is removed after."""
    settle()
    start, wall, lines = run_gvae(study, folder / "results")
    table = pd.read_parquet(folder / "results" / name / "trials.parquet")
    trials = pd.DataFrame(
        {
            "seconds": table.wall_seconds,
            "started": table.started_at,
            "ended": table.started_at + table.wall_seconds,
        }
    )
    report_line(f"gvae study {name}", start, wall, trials, cpus)
    print(f"  console: {lines} lines for {len(trials)} trials; load {load()}", flush=True)
    size = checkpoint_size(folder / "results" / name)
    shutil.rmtree(folder / "results")
    return wall, trials, size


def timed_plain_trainer(spec: StudySpec, model: str, folder: Path, cpus: int) -> float:
    """Run gvae's trainer on the study's trials under plain Tune from a synced disk; its wall."""
    settle()
    base = {**spec.base_config(), "model": model}
    base["data_root"] = str(Path("data").resolve())  # as gvae hands it to its trials
    start, wall, same = run_plain(
        "--plain-trainer", str(spec.trial_count), json.dumps(base), str(folder / "same")
    )
    report_line("plain Ray Tune, gvae's trainer", start, wall, same, cpus)
    shutil.rmtree(folder / "same")
    return wall


if __name__ == "__main__":
    main()
