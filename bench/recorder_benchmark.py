"""Cost of recording Tune events into the study tables, at 100, 1,000 and 10,000 trials.

Run as `.venv/bin/python bench/recorder_benchmark.py [--trials 100 1000 10000] [--evaluations 20]
[--eval-samples 10000] [--storage DIR]`. Not a test: it prints a header line and one row per
study size (see README.md).

Events are simulated, the recorder and the files are real: for each trial, as Tune calls it, a
start, one result per evaluation, the checkpoint of the last evaluation (holding the final arrays a
real trial writes: one entropy per generated image and a 10x10 sample grid as base64 PNG, which the
recorder reads) and a completion. What the
recorder writes goes through the same ResultsStore as in a study, into a local folder.

The recorder writes on a thread of its own (gvae.study.writer); each event here is followed by a
flush, so its time is the whole cost of recording it (hook and write), and `loop ms` is the part
Tune's event loop waits for (the hook alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import tune

from gvae.data import load_dataset
from gvae.study.recorder import ParquetRecorder
from gvae.study.results import ResultsStore
from gvae.study.trainable import move_arrays_into_checkpoint
from gvae.trainer import GRID_SIZE, _png_base64


@dataclass
class Trial:
    """What the recorder reads of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    num_failures: int = 0

    def get_error(self) -> None:
        return None


def final_checkpoint(eval_samples: int, folder: Path) -> tune.Checkpoint:
    """A checkpoint holding arrays as big as a real trial's last evaluation: real digits in the
    PNG, entropies < ln 10."""
    images = load_dataset("mnist5k").train_images[:GRID_SIZE]
    entropies = torch.rand(eval_samples, generator=torch.Generator().manual_seed(0)) * 2.3
    arrays = {
        "image_entropies": [round(value, 5) for value in entropies.tolist()],
        "sample_labels": [index % 10 for index in range(GRID_SIZE)],
        "samples_png": _png_base64(images),
    }
    folder.mkdir(parents=True)
    move_arrays_into_checkpoint(arrays, folder)
    return tune.Checkpoint.from_directory(folder)


def trial_events(
    recorder: ParquetRecorder,
    trial: Trial,
    evaluations: int,
    checkpoint: tune.Checkpoint,
    waits: list[float],
) -> list[float]:
    """Seconds each of one trial's events took to record, written; appends to `waits` the
    seconds each hook held Tune's event loop."""
    times = []

    def event(hook: str, **kwargs: Any) -> None:
        tick = time.perf_counter()
        getattr(recorder, hook)(iteration=0, trials=[], trial=trial, **kwargs)
        waits.append(time.perf_counter() - tick)
        recorder.flush()
        times.append(time.perf_counter() - tick)

    event("on_trial_start")
    for k in range(1, evaluations + 1):
        result = {
            "iteration": 1000 * k,
            "mode_entropy": 2.0 + 0.01 * k,
            "mean_image_entropy": 0.5 - 0.01 * k,
            "class_histogram": [0.1] * 10,
            "frechet_distance": 10.0 / k,
            "iterations_per_second": 120.0,
            "eval_seconds": 2.5,
            "d_loss": 1.2,
            "g_loss": 0.8,
            "time_total_s": 30.0 * k,
            "device_used": "cpu",
            "node": platform.node(),
            "threads": 1,
        }
        event("on_trial_result", result=result)
    event("on_checkpoint", checkpoint=checkpoint)
    event("on_trial_complete")
    return times


def bench(trials: int, evaluations: int, checkpoint: tune.Checkpoint, root: Path) -> str:
    store = ResultsStore(str(root / f"n{trials}"))
    recorder = ParquetRecorder(store, "bench", {"gvae_version": "bench"})
    start, cpu_start = time.perf_counter(), time.process_time()
    first: list[float] = []
    last: list[float] = []
    waits: list[float] = []
    for index in range(trials):
        trial = Trial(f"bench_{index:05d}", {"model": "gan", "iterations": 1000 * evaluations})
        before = store.bytes_written
        times = trial_events(recorder, trial, evaluations, checkpoint, waits)
        if index == 0:
            first, first_bytes = times, store.bytes_written - before
        last, last_bytes = times, store.bytes_written - before
    events_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    tick = time.perf_counter()
    recorder.on_experiment_end(trials=[])
    compact_s = time.perf_counter() - tick
    count = trials * (evaluations + 3)
    return (
        f"{trials:>7} {count:>9} {1e3 * events_s / count:>10.2f} {1e3 * cpu_s / count:>8.2f} "
        f"{1e3 * statistics.median(first):>10.2f} {1e3 * statistics.median(last):>10.2f} "
        f"{1e3 * max(last):>9.2f} {1e3 * statistics.median(waits):>8.2f} "
        f"{first_bytes / len(first) / 1e3:>9.1f} "
        f"{last_bytes / len(last) / 1e3:>9.1f} {events_s:>9.1f} {compact_s:>9.1f}"
    )


HEADER = (
    f"{'trials':>7} {'events':>9} {'ms/event':>10} {'cpu ms':>8} {'first med':>10} "
    f"{'last med':>10} {'last max':>9} {'loop ms':>8} {'kB/ev 1st':>9} {'kB/ev last':>9} "
    f"{'events s':>9} {'compact s':>9}"
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
        f"recorder | {platform.node()} | {os.cpu_count()} logical CPUs | load {load} | "
        f"{args.evaluations} evaluations per trial | {args.eval_samples} entropies per trial"
    )
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    with tempfile.TemporaryDirectory(prefix="gvae-bench-", dir=args.storage) as root:
        checkpoint = final_checkpoint(args.eval_samples, Path(root) / "checkpoint")
        for trials in args.trials:
            print(bench(trials, args.evaluations, checkpoint, Path(root)), flush=True)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load at the end {load}")


if __name__ == "__main__":
    main()
