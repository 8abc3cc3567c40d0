"""Trials packed onto one GPU with Ray's fractional GPUs: aggregate throughput and utilisation.

Run as `python bench/packing_benchmark.py [--fractions 1 0.25 0.125 0.0625 0.2:5] [--seeds 4]
[--iterations 400] [--models gan wgan vae vaegan cvaegan]`. Not a test: it prints one line per
GPU fraction and a projection of `studies/paper.yaml` (see bench/README.md).

A fraction written `F:K` runs packs (`resources.pack: K`, gvae.pack): K seeds per model, trained
as one pack per model, each pack with F of the GPU; its speeds are member-iterations.

For each fraction f, `gvae study run` runs the same grid (every model x `--seeds` seeds, one CPU
and f GPU per trial, so up to 1/f trials share the GPU) while `nvidia-smi` samples the GPU's
utilisation. From the study's own tables:
- `phase`: first trial start to last trial end;
- `agg it/s`: iterations of all trials over the phase;
- `x alone`: how much faster the set of trials ran than one at a time would, each at the speed
  the trial alone on the GPU had (fraction 1): the serial training time over the phase;
- per model, the median training speed of one trial while it shared the GPU, over its second
  evaluation window (the first holds CUDA's lazy start).
The projection takes those per-model speeds for 1M-iteration trials (25 trials: five models x
five seeds, 50 evaluations each) with 1/f trials at a time, capped by the CPUs at
`--paper-cpus` per trial.
`--device cpu` runs the same on CPUs (fraction ignored; a check of the script itself).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import yaml
from study_benchmark import run_gvae  # bench/ is on the path of a script run from it

ROOT = Path(__file__).resolve().parent.parent
PAPER = {"trials_per_model": 5, "iterations": 1_000_000, "evaluations": 50}


class GpuSampler:
    """`nvidia-smi` utilisation and memory every 200 ms, on a thread, while a study runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, utilisation %, MiB used)
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                utilisation, memory = (float(part) for part in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), utilisation, memory))

    def __exit__(self, *_exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def during(self, start: float, end: float) -> tuple[float, float, float]:
        """Mean and max utilisation, max memory (MiB) between two epoch times."""
        inside = [s for s in self.samples if start <= s[0] <= end] or [
            (0.0, float("nan"), float("nan"))
        ]
        return (
            statistics.fmean(s[1] for s in inside),
            max(s[1] for s in inside),
            max(s[2] for s in inside),
        )


def study_file(
    folder: Path, fraction: float, pack: int, seeds: int, args: argparse.Namespace
) -> Path:
    gpu = args.device == "cuda"
    name = f"packing_{str(fraction).replace('.', '_')}" if gpu else "packing_cpu"
    name += f"_pack{pack}" if pack > 1 else ""
    spec = {
        "name": name,
        "dataset": "mnist5k",
        "models": args.models,
        "iterations": args.iterations,
        # Two evaluation windows: the second one's speed is the steady one, without the first
        # steps' lazy CUDA start (module loading, cuBLAS handles), which a 1M-iteration trial
        # pays once.
        "eval_every": args.iterations // 2,
        "fixed": {"batch_size": 64, "eval_samples": args.eval_samples, "device": args.device},
        "search": {"grid": {"seed": list(range(seeds))}},
        "resources": {"cpus": 1, "gpus": fraction if gpu else 0, "pack": pack},
        "max_failures": 0,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trial_speeds(storage: Path, name: str) -> pd.DataFrame:
    """One row per trial: model, iterations, start, end, training it/s of its last evaluation
    window, evaluation seconds."""
    trials = pd.read_parquet(storage / name / "trials.parquet")
    curves = pd.read_parquet(storage / name / "curves.parquet")
    last = curves.sort_values("iteration").groupby("trial_id").last()
    table = trials.set_index("trial_id")[["model", "iterations_done", "started_at", "wall_seconds"]]
    table = table.join(last[["iterations_per_second", "eval_seconds"]])
    table["ended"] = table.started_at + table.wall_seconds
    return table


def projected_paper_seconds(
    per_model: dict[str, float], eval_s: dict[str, float], slots: int, pack: int
) -> float:
    """Tune trials (packs of `pack` members) of 1M iterations at the measured speeds, `slots` at
    a time; a pack evaluates each of its members."""
    packs_per_model = -(-PAPER["trials_per_model"] // pack)
    durations = [
        PAPER["iterations"] / per_model[model] + PAPER["evaluations"] * eval_s[model] * pack
        for model in per_model
        for _ in range(packs_per_model)
    ]
    return max(sum(durations) / slots, max(durations))


def parse_run(token: str) -> tuple[float, int]:
    """`F` (a GPU fraction per trial) or `F:K` (per pack of K seeds)."""
    fraction, _, pack = token.partition(":")
    return float(fraction), int(pack or 1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"packing: {len(args.models)} models x {args.seeds} seeds, {args.iterations} iterations, "
        f"batch 64, {args.eval_samples} eval samples | {os.cpu_count()} CPUs | {args.device} | "
        f"load {load}",
        flush=True,
    )
    print(
        "fraction  slots  wall s  phase s  agg it/s  x alone  util mean/max %  GPU MiB  "
        "median it/s per model",
        flush=True,
    )
    alone: dict[str, float] = {}
    folder = Path(args.storage or tempfile.mkdtemp(prefix="gvae-packing-"))
    folder.mkdir(parents=True, exist_ok=True)
    projections = []
    for index, (fraction, pack) in enumerate(map(parse_run, args.fractions)):
        seeds = args.alone_seeds if index == 0 and args.alone_seeds else args.seeds
        seeds = pack if pack > 1 else seeds  # one pack per model
        path = study_file(folder, fraction, pack, seeds, args)
        name = path.stem
        shutil.rmtree(folder / "results" / name, ignore_errors=True)
        tick = time.perf_counter()
        with GpuSampler() as sampler:
            run_gvae(path, folder / "results")
        wall = time.perf_counter() - tick
        table = trial_speeds(folder / "results", name)
        start, end = table.started_at.min(), table.ended.max()
        phase = end - start
        per_model = table.groupby("model").iterations_per_second.median().to_dict()
        eval_s = table.groupby("model").eval_seconds.median().to_dict()
        if not alone:
            alone = per_model  # the first fraction (1 by default) is the one-alone baseline
        serial = sum(row.iterations_done / alone[row.model] for row in table.itertuples())
        mean_util, max_util, memory = sampler.during(start, end)
        tune_trials = len(table) // pack
        slots = (
            min(int(round(1 / fraction)), tune_trials) if args.device == "cuda" else os.cpu_count()
        )
        speeds = " ".join(f"{model} {per_model[model]:.0f}" for model in args.models)
        run = f"{fraction:g}" + (f":{pack}" if pack > 1 else "")
        print(
            f"{run:>8s}  {slots:5d}  {wall:6.1f}  {phase:7.1f}  "
            f"{table.iterations_done.sum() / phase:8.0f}  {serial / phase:6.1f}x  "
            f"{mean_util:6.1f} / {max_util:5.1f}  {memory:7.0f}  {speeds}",
            flush=True,
        )
        paper_slots = min(int(round(1 / fraction)), (os.cpu_count() or 1) // args.paper_cpus)
        # The paper evaluates 10,000 samples: evaluation time scaled from this study's count.
        eval_s = {model: seconds * 10_000 / args.eval_samples for model, seconds in eval_s.items()}
        projected = projected_paper_seconds(per_model, eval_s, paper_slots, pack)
        projections.append((fraction, pack, paper_slots, projected))
    print("\nstudies/paper.yaml projected (25 trials x 1M iterations, 50 evaluations each):")
    for fraction, pack, slots, seconds in projections:
        what = f"per pack of {pack}" if pack > 1 else "per trial"
        print(f"  gpus {fraction:g} {what}, {slots} at a time: {seconds / 3600:.2f} h", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", nargs="+", default=["1", "0.25", "0.125", "0.0625", "0.2:5"])
    parser.add_argument("--models", nargs="+", default=["gan", "wgan", "vae", "vaegan", "cvaegan"])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument(
        "--alone-seeds", type=int, default=1, help="seeds of the first fraction, the baseline (1)"
    )
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument(
        "--paper-cpus", type=int, default=1, help="CPUs per trial or pack in paper.yaml (1)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--storage", default=None, help="results folder (a temporary one)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
