"""Packs against lone trials: training speed of K seeds trained as one batched computation.

Run as `python bench/pack_benchmark.py [--device cpu|cuda] [--packs 1 5 8 32 128]
[--models ...] [--iterations 200] [--repeats 3]`. Not a test: it prints a table (see README.md).

For each model and pack size K, the model and batches are made as the trainer makes them
(`gvae.trainer`: mnist5k, batch 64; K = 1 is a lone trial, unpacked). A row gives pack steps per
second (every member takes one iteration per step), member-iterations per second (K x that) and
how many lone trials' worth of training that is (`x lone`: member-it/s over the lone trial's
it/s, both measured here, side by side). One intra-op thread, as bench/benchmark.py.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from benchmark import cpu_model, timed  # bench/ is on the path of a script run from it

from gvae.config import MODEL_NAMES, TrialConfig
from gvae.data import Dataset, load_dataset
from gvae.trainer import make_deterministic, model_and_batches


def steps_per_second(
    name: str, pack: int, dataset: Dataset, device: torch.device, args: argparse.Namespace
) -> float:
    configs = [TrialConfig(model=name, batch_size=64, seed=seed, device=str(device))
               for seed in range(pack)]  # fmt: skip
    configs = [config.validate().resolved() for config in configs]
    model, batches = model_and_batches(configs, pack > 1, dataset, device)

    def train() -> None:
        for _ in range(args.iterations):
            model.train_step(batches)

    for _ in range(args.warmup):
        model.train_step(batches)
    return statistics.median(args.iterations / timed(train, device) for _ in range(args.repeats))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    make_deterministic(device)
    dataset = load_dataset("mnist5k")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"torch {torch.__version__} | threads 1 | CPU {cpu_model()} ({os.cpu_count()} logical) | "
        f"device {name} | batch 64 | {args.repeats} x {args.iterations} steps | load {load}"
    )
    print(f"{'model':8s} {'pack':>5s} {'steps/s':>9s} {'member-it/s':>12s} {'x lone':>7s}")
    for model in args.models:
        lone = None
        for pack in args.packs:
            rate = steps_per_second(model, pack, dataset, device, args)
            lone = lone or (rate if pack == 1 else None)
            ratio = f"{rate * pack / lone:6.1f}x" if lone else "      -"
            print(f"{model:8s} {pack:5d} {rate:9.1f} {rate * pack:12.0f} {ratio}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--packs", nargs="+", type=int, default=[1, 5, 8, 32, 128])
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--iterations", type=int, default=100, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.packs) < 1:
        parser.error("--packs: sizes must be >= 1")
    return args


if __name__ == "__main__":
    main()
