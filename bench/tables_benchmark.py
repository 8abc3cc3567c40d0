"""Cost of recording a study's trials into its tables, at 100, 1,000 and 10,000 trials.

Run as `.venv/bin/python bench/tables_benchmark.py [--trials 100 1000 10000] [--evaluations 20]
[--eval-samples 10000] [--storage DIR]`. Not a test: it prints a header line and one row per
study size (see README.md).

Each trial writes its own rows (gvae.study.tables), as a trial does in a study: at its start, at
each evaluation, and at its end with the last evaluation's arrays (one entropy per generated image
and a 10x10 sample grid as base64 PNG); the driver's callback then sees the trial complete
(`loop ms`: what Tune's event loop waits for). The rows and files are real, through the same
ResultsStore as in a study, into a local folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gvae.data import load_dataset
from gvae.study.outcome import Status
from gvae.study.spec import parse_study
from gvae.study.tables import StudyTables, Tables, compact, member_rows
from gvae.trainer import GRID_SIZE, _png_base64


class Trial:
    """What the driver's callback reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict[str, Any]) -> None:
        self.trial_id, self.config = trial_id, config
        self.num_failures, self.status = 0, "TERMINATED"
        self.last_result = {"iteration": config["iterations"]}


def final_arrays(eval_samples: int) -> dict[str, Any]:
    """Arrays as big as a real trial's last evaluation: real digits, entropies < ln 10."""
    images = load_dataset("mnist5k").train_images[:GRID_SIZE]
    entropies = torch.rand(eval_samples, generator=torch.Generator().manual_seed(0)) * 2.3
    return {
        "image_entropies": [round(value, 5) for value in entropies.tolist()],
        "sample_labels": [index % 10 for index in range(GRID_SIZE)],
        "samples_png": _png_base64(images),
    }


def trial_writes(
    tables: StudyTables, trial: Trial, evaluations: int, arrays: dict, waits: list[float]
) -> list[float]:
    """Seconds each of one trial's writes took; appends to `waits` what the driver's hook held
    Tune's event loop when the trial completed."""
    (rows,) = member_rows(trial.trial_id, trial.config)
    context = {"device_used": "cpu", "node": platform.node(), "threads": 1}
    times = []

    def write() -> None:
        tick = time.perf_counter()
        rows.write(tables.tables, tables.store, context, {"wall_seconds": 1.0, "started_at": 0.0})
        times.append(time.perf_counter() - tick)

    write()
    for k in range(1, evaluations + 1):
        rows.curve.append(
            {
                "iteration": 1000 * k,
                "mode_entropy": 2.0 + 0.01 * k,
                "mean_image_entropy": 0.5 - 0.01 * k,
                "class_histogram": [0.1] * 10,
                "frechet_distance": 10.0 / k,
                "iterations_per_second": 120.0,
                "eval_seconds": 2.5,
                "d_loss": 1.2,
                "g_loss": 0.8,
            }
        )
        write()
    rows.status, rows.arrays = Status.FINISHED, arrays
    write()
    tick = time.perf_counter()
    tables.on_trial_complete(iteration=0, trials=[], trial=trial)
    waits.append(time.perf_counter() - tick)
    return times


def bench(trials: int, evaluations: int, arrays: dict, root: Path) -> str:
    spec = parse_study(
        {
            "name": "bench",
            "dataset": "mnist5k",
            "models": ["gan"],
            "iterations": 1000 * evaluations,
            "eval_every": 1000,
            "search": {"grid": {"seed": list(range(trials))}},
        }
    )
    tables = StudyTables(Tables.of(spec, str(root / f"n{trials}"), {"gvae_version": "b"}), trials)
    tables.prepare()
    store = tables.store
    start, cpu_start = time.perf_counter(), time.process_time()
    first: list[float] = []
    last: list[float] = []
    waits: list[float] = []
    for index in range(trials):
        trial = Trial(f"bench_{index:05d}", {"model": "gan", "iterations": 1000 * evaluations})
        before = store.bytes_written
        times = trial_writes(tables, trial, evaluations, arrays, waits)
        if index == 0:
            first, first_bytes = times, store.bytes_written - before
        last, last_bytes = times, store.bytes_written - before
    events_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    tick = time.perf_counter()
    compact(store, tables.tables)
    compact_s = time.perf_counter() - tick
    count = trials * (evaluations + 2)
    return (
        f"{trials:>7} {count:>9} {1e3 * events_s / count:>10.2f} {1e3 * cpu_s / count:>8.2f} "
        f"{1e3 * statistics.median(first):>10.2f} {1e3 * statistics.median(last):>10.2f} "
        f"{1e3 * max(last):>9.2f} {1e3 * statistics.median(waits):>8.2f} "
        f"{first_bytes / len(first) / 1e3:>9.1f} "
        f"{last_bytes / len(last) / 1e3:>9.1f} {events_s:>9.1f} {compact_s:>9.1f}"
    )


HEADER = (
    f"{'trials':>7} {'writes':>9} {'ms/write':>10} {'cpu ms':>8} {'first med':>10} "
    f"{'last med':>10} {'last max':>9} {'loop ms':>8} {'kB/wr 1st':>9} {'kB/wr last':>9} "
    f"{'writes s':>9} {'compact s':>9}"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--evaluations", type=int, default=20, help="results per trial (20)")
    parser.add_argument(
        "--eval-samples", type=int, default=10000, help="image entropies in the final result"
    )
    parser.add_argument("--storage", type=Path, default=None, help="folder (default: a temp one)")
    args = parser.parse_args(argv)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"tables | {platform.node()} | {os.cpu_count()} logical CPUs | load {load} | "
        f"{args.evaluations} evaluations per trial | {args.eval_samples} entropies per trial"
    )
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    with tempfile.TemporaryDirectory(prefix="gvae-bench-", dir=args.storage) as root:
        arrays = final_arrays(args.eval_samples)
        for trials in args.trials:
            print(bench(trials, args.evaluations, arrays, Path(root)), flush=True)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load at the end {load}")


if __name__ == "__main__":
    main()
