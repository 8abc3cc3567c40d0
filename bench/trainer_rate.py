"""A lone trial's training rate in the trainer itself, beside the bare step's (benchmark.py).

Run as `python bench/trainer_rate.py [--device cpu|cuda] [--iterations 2000] [--models ...]
[--cpu-threads N]`. Not a test: it prints a header line and one line per model (see
bench/README.md).

Each model trains one trial through `gvae.trainer.run_trial` (mnist5k, batch 64, the default
config, one evaluation at the end), with torch's CPU threads set as `gvae train` sets them
(`cpu_threads`: one on a GPU unless asked). `it/s` is the trainer's own figure for the
training window (`iterations_per_second` of the curve: every step, its divergence watch and the
batches, from the first iteration on). Then, in the same process with the same threads, the bare
`train_step` of the same model after a warm-up: `step it/s` with the trainer's batch source
(`model_and_batches`), `on-device it/s` with benchmark.py's (the training images moved to the
device once, batches drawn there). The three tell the loop's cost from the batch source's.

On a GPU, `graph it/s` is the trainer's rate with the step replayed as a CUDA graph (`graph: on`,
gvae.graphs), and `pack` and `pack graph` the rates of a pack of `--pack` seeds trained eagerly
and as a graph (iterations of the whole pack per second; each trains every member once).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import replace

import torch
from benchmark import cpu_model, timed  # bench/ is on the path of a script run from it

from gvae.config import MODEL_NAMES, TrialConfig
from gvae.data import BatchSampler, load_dataset
from gvae.evaluation import load_or_train_evaluator
from gvae.models import GenerativeModel
from gvae.trainer import cpu_threads, model_and_batches, resolve_device, run_pack, run_trial

DATASET = "mnist5k"
BATCH_SIZE = 64
STEP_ITERATIONS = 200  # bare steps timed after the trial, per model and batch source
WARMUP = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--cpu-threads", type=int, default=0, help="0: as gvae train chooses")
    parser.add_argument("--pack", type=int, default=8, help="seeds of the packs timed on a GPU")
    parser.add_argument(
        "--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES), metavar="MODEL"
    )
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.cpu_threads < 0 or args.pack < 1:
        parser.error("--iterations and --pack must be >= 1, and --cpu-threads >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731 - keep stdout the report
    dataset = load_dataset(DATASET)
    evaluator = load_or_train_evaluator(dataset, log=log)
    base = TrialConfig(
        dataset=DATASET,
        iterations=args.iterations,
        eval_every=args.iterations,
        eval_samples=1000,
        batch_size=BATCH_SIZE,
        device=args.device,
        cpu_threads=args.cpu_threads,
    )
    torch.set_num_threads(cpu_threads(base, device, default=torch.get_num_threads()))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"trainer rate | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"CPU {cpu_model()} ({os.cpu_count()} logical) | device {name} | batch {BATCH_SIZE} | "
        f"{args.iterations} it | load {load}",
        flush=True,
    )
    for model in args.models:
        config = TrialConfig(**{**base.to_dict(), "model": model})
        outcome = run_trial(config, evaluator=evaluator, log=lambda _: None)
        trainer = outcome.curve[-1]["iterations_per_second"]
        built, batches = model_and_batches([config.resolved()], False, dataset, device)
        step = steps_per_second(built, batches, device)
        on_device = BatchSampler(dataset.train_images.to(device), BATCH_SIZE, config.seed)
        bare = steps_per_second(built, on_device, device)
        graphs = graph_rates(config, args.pack, evaluator) if device.type == "cuda" else ""
        print(
            f"{model:8s} it/s {trainer:8.1f}  step it/s {step:8.1f}  on-device it/s {bare:8.1f}  "
            f"trainer / on-device {trainer / bare:5.2f}{graphs}",
            flush=True,
        )


def graph_rates(config: TrialConfig, pack: int, evaluator: object) -> str:
    """The trainer's rates with the step as a CUDA graph, lone, and for a pack eager and graph."""

    def rate(outcomes: list) -> float:
        return outcomes[0].curve[-1]["iterations_per_second"]

    quiet = lambda _: None  # noqa: E731
    lone = rate([run_trial(replace(config, graph="on"), evaluator=evaluator, log=quiet)])
    seeds = [replace(config, seed=seed) for seed in range(pack)]
    eager_pack = rate(run_pack(seeds, evaluator=evaluator, log=quiet))
    graphed = [replace(member, graph="on") for member in seeds]
    graph_pack = rate(run_pack(graphed, evaluator=evaluator, log=quiet))
    return (
        f"  graph it/s {lone:8.1f}  pack {pack} it/s {eager_pack:8.1f}  "
        f"pack {pack} graph it/s {graph_pack:8.1f}"
    )


def steps_per_second(
    model: GenerativeModel, batches: Callable[[], torch.Tensor], device: torch.device
) -> float:
    for _ in range(WARMUP):
        model.train_step(batches)

    def train() -> None:
        for _ in range(STEP_ITERATIONS):
            model.train_step(batches)

    return STEP_ITERATIONS / timed(train, device)


if __name__ == "__main__":
    main()
