"""Training and evaluation throughput of every model, against the machine's matmul limit.

Run as `.venv/bin/python bench/benchmark.py [--iterations N] [--models ...] [--device cpu|cuda]`.
Not a test: it prints one header line, the measured matmul GFLOP/s and a table (see README.md).

Models, data and batches are made exactly as `gvae.trainer.run_trial` makes them (mnist5k, batch
64, default config). Everything runs on one intra-op thread so figures compare across machines
with different core counts and are not skewed by other work on the remaining cores.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from gvae.config import MODEL_NAMES, TrialConfig
from gvae.data import load_dataset
from gvae.evaluation import Evaluator, load_or_train_evaluator
from gvae.models import MODELS, GenerativeModel
from gvae.trainer import SAMPLE_CHUNK, BatchSampler

BATCH_SIZE = 64
DATASET = "mnist5k"
EVAL_SAMPLES = 10_000
LAYER_SHAPE = (64, 784, 392)  # [64 x 784] @ [784 x 392]: the nets' largest layer at batch 64
SQUARE_SIZE = 1024


@dataclass
class Row:
    model: str
    rates: list[float]  # iterations per second, one per repeat
    flops: int  # FLOPs of one train_step
    matmul_share: float  # of a train_step's CPU time, the share its matmuls take
    matmuls_alone: float  # iterations per second of the step's matmuls replayed with nothing else
    generate_s: float
    classify_s: float

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `function` takes, waiting for queued device work on both sides."""
    synchronise(device)
    tick = time.perf_counter()
    function()
    synchronise(device)
    return time.perf_counter() - tick


def matmul_gflops(
    m: int, k: int, n: int, device: torch.device, repeats: int, seconds: float = 0.25
) -> float:
    """Median float32 GFLOP/s of [m x k] @ [k x n] over `repeats` loops of about `seconds` each."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device)
    b = torch.randn(k, n, generator=generator).to(device)
    out = torch.empty(m, n, device=device)

    def loop(count: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(count):
                torch.mm(a, b, out=out)

        return run

    timed(loop(3), device)  # warm-up: first calls pick kernels and fault in pages
    count = 1
    while (elapsed := timed(loop(count), device)) < seconds / 4:  # calibrate the loop length
        count *= 2
    count = max(1, round(count * seconds / elapsed))
    rates = [2 * m * k * n * count / timed(loop(count), device) for _ in range(repeats)]
    return statistics.median(rates) / 1e9


def train_step_flops(model: GenerativeModel, batches: BatchSampler) -> int:
    """FLOPs of one train_step (forward and backward of all nets) as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        model.train_step(batches)
    return counter.get_total_flops()


def bench_model(
    name: str,
    dataset,
    evaluator: Evaluator,
    device: torch.device,
    iterations: int,
    warmup: int,
    repeats: int,
) -> Row:
    config = TrialConfig(model=name, batch_size=BATCH_SIZE).validate().resolved()
    torch.manual_seed(config.seed)
    model = MODELS[name](config, dataset.image_shape, device)
    batches = BatchSampler(dataset.train_images.to(device), config.batch_size, config.seed)

    flops = train_step_flops(model, batches)

    def train() -> None:
        for _ in range(iterations):
            model.train_step(batches)

    for _ in range(warmup):
        model.train_step(batches)
    rates = [iterations / timed(train, device) for _ in range(repeats)]
    matmul_share = matmul_time_share(train) if device.type == "cpu" else math.nan
    matmuls_alone = matmuls_alone_rate(model, batches, device, repeats)

    # The trainer's evaluation: fixed noise, generated in chunks, then classified at once.
    noise = torch.randn(
        EVAL_SAMPLES, config.latent_dim, generator=torch.Generator().manual_seed(config.seed)
    )
    images: list[torch.Tensor] = []

    def generate() -> None:
        images.append(torch.cat([model.sample(chunk) for chunk in noise.split(SAMPLE_CHUNK)]))

    generate_s = timed(generate, device)
    classify_s = timed(lambda: evaluator.measure(images[0]), device)
    return Row(name, rates, flops, matmul_share, matmuls_alone, generate_s, classify_s)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """The profiler's native library prints start, stop and device-probe lines to file
    descriptor 2 whatever the log level; they would interleave with the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution")
MATMUL_PACKETS = (
    torch.ops.aten.mm,
    torch.ops.aten.addmm,
    torch.ops.aten.bmm,
    torch.ops.aten.convolution,
    torch.ops.aten.convolution_backward,
)


def matmul_time_share(train: Callable[[], None]) -> float:
    """Share of the CPU time of `train` spent inside matmuls (and convolutions), by the profiler:
    the step's FLOPs are theirs, so the step's rate is at most theirs divided by this share."""
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        train()
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    inside = sum(event.self_cpu_time_total for event in events if event.key in MATMUL_OPS)
    return inside / total if total else math.nan


TABLE_HEADER = (
    f"{'model':<8} {'it/s':>8} {'min':>8} {'max':>8} {'spread':>7} {'MFLOP/it':>9} "
    f"{'GFLOP/s':>8} {'of mm':>6} {'in mm':>6} {'mm own':>7} {'mm alone':>9} "
    f"{'gen 10k s':>10} {'cls 10k s':>10}"
)


class Layout(NamedTuple):
    """A tensor operand's shape and strides, all a replayed matmul needs of it."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def tensor(self, device: torch.device) -> torch.Tensor:
        extent = sum((size - 1) * step for size, step in zip(self.shape, self.stride, strict=True))
        return torch.randn(extent + 1, device=device).as_strided(self.shape, self.stride)


class MatmulRecorder(TorchDispatchMode):
    """Records every matmul a step runs: its op, its operands' layouts and its other arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[Any], dict[str, Any]]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket in MATMUL_PACKETS:
            self.calls.append(
                (func, [_layout(a) for a in args], {k: _layout(v) for k, v in kwargs.items()})
            )
        return func(*args, **kwargs)


def _layout(value: Any) -> Any:
    return Layout(tuple(value.shape), value.stride()) if isinstance(value, torch.Tensor) else value


def _operand(value: Any, device: torch.device) -> Any:
    return value.tensor(device) if isinstance(value, Layout) else value


def matmuls_alone_rate(
    model: GenerativeModel, batches: BatchSampler, device: torch.device, repeats: int
) -> float:
    """Steps per second if a step ran its matmuls alone, in its order and with its operands'
    shapes and strides, each on operands of its own as in the step (so caches are as cold): the
    most a step can reach on this machine with every other op free."""
    recorder = MatmulRecorder()
    with recorder:
        model.train_step(batches)
    calls = [
        (func, [_operand(a, device) for a in args], {k: _operand(v, device) for k, v in kw.items()})
        for func, args, kw in recorder.calls
    ]

    def replay() -> None:
        for func, args, kwargs in calls:
            func(*args, **kwargs)

    for _ in range(5):
        replay()
    count = 50
    return statistics.median(
        count / timed(lambda: [replay() for _ in range(count)], device) for _ in range(repeats)
    )


def table_row(row: Row, limit_gflops: float) -> str:
    median = row.median_rate
    spread = (max(row.rates) - min(row.rates)) / median
    achieved = row.flops * median / 1e9
    return (
        f"{row.model:<8} {median:>8.1f} {min(row.rates):>8.1f} {max(row.rates):>8.1f} "
        f"{spread:>7.1%} {row.flops / 1e6:>9.1f} {achieved:>8.2f} "
        f"{achieved / limit_gflops:>6.1%} {row.matmul_share:>6.1%} "
        f"{achieved / row.matmul_share / limit_gflops:>7.1%} "
        f"{row.flops * row.matmuls_alone / 1e9 / limit_gflops:>9.1%} "
        f"{row.generate_s:>10.3f} {row.classify_s:>10.3f}"
    )


METRIC_DATASETS = ("mnist5k", "stacked-mnist5k")


def cpu_timed(function: Callable[[], object]) -> float:
    """CPU seconds of this process for one call: on one thread, the work itself, which other
    processes sharing the cores inflate far less than the wall time."""
    tick = time.process_time()
    function()
    return time.process_time() - tick


def metric_costs(name: str, log: Callable[[str], None]) -> str:
    """CPU seconds each part of one evaluation takes on EVAL_SAMPLES real training images of
    `name`: the classifier pass, the mode statistics (histogram, entropies, classifier score), the
    Frechet distance, and the k-NN metrics (precision, recall, density, coverage)."""
    from gvae.metrics import feature_statistics, frechet_distance_from_statistics

    dataset = load_dataset(name)
    evaluator = load_or_train_evaluator(dataset, log=log)
    index = torch.randint(len(dataset.train_images), (EVAL_SAMPLES,), generator=torch.Generator())
    images = dataset.train_images[index]
    outputs: list[torch.Tensor] = []  # [probabilities, features]
    classify = cpu_timed(lambda: outputs.extend(evaluator.predict(images)))
    probs, features = outputs
    modes = cpu_timed(lambda: evaluator.measure_probs(probs))
    reference = evaluator.reference_features
    frechet = cpu_timed(
        lambda: frechet_distance_from_statistics(*feature_statistics(features), *reference)
    )
    neighbours = cpu_timed(lambda: evaluator.neighbours.score(features))
    real = len(evaluator.neighbours.features)
    return (
        f"{name:<16} classify {classify:6.3f} s | modes + classifier score {modes:6.3f} s | "
        f"Frechet {frechet:6.3f} s | precision/recall/density/coverage {neighbours:6.3f} s "
        f"(k-NN over {min(EVAL_SAMPLES, 5000)} generated x {real} real)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--iterations", type=int, default=30, help="train_step calls per timed repeat (30)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model (5)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed train_steps first (5)")
    parser.add_argument(
        "--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES), metavar="MODEL"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if min(args.iterations, args.repeats) < 1 or args.warmup < 0:
        parser.error("--iterations and --repeats must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731 - keep stdout the report

    dataset = load_dataset(DATASET)
    evaluator = load_or_train_evaluator(dataset, log=log).to(device)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"CPU {cpu_model()} ({os.cpu_count()} logical) | device {device_name} | "
        f"batch {BATCH_SIZE} | {args.repeats} x {args.iterations} it | load {load}"
    )
    m, k, n = LAYER_SHAPE
    layer = matmul_gflops(m, k, n, device, args.repeats)
    square = matmul_gflops(SQUARE_SIZE, SQUARE_SIZE, SQUARE_SIZE, device, args.repeats)
    print(
        f"matmul float32: [{m}x{k}]@[{k}x{n}] {layer:.2f} GFLOP/s (the limit used below), "
        f"[{SQUARE_SIZE}x{SQUARE_SIZE}]@[{SQUARE_SIZE}x{SQUARE_SIZE}] {square:.2f} GFLOP/s"
    )
    print()
    print(TABLE_HEADER)
    print("-" * len(TABLE_HEADER), flush=True)
    for name in args.models:  # one row at a time, so a long run shows progress
        row = bench_model(
            name, dataset, evaluator, device, args.iterations, args.warmup, args.repeats
        )
        print(table_row(row, layer), flush=True)
    print(f"\nmetrics of one evaluation of {EVAL_SAMPLES} images (CPU seconds, one thread):")
    for name in METRIC_DATASETS:
        print(metric_costs(name, log), flush=True)


if __name__ == "__main__":
    main()
