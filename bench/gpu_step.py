"""What a GPU training step costs in host syncs and kernel launches.

Run as `python bench/gpu_step.py [--iterations 300] [--models ...] [--compile]`. Not a test: it
prints a table (see bench/README.md). Packs, K models trained as one batched computation, are
measured by bench/pack_benchmark.py.

Per model, iterations per second of the trainer's step (mnist5k, batch 64, default config):
   - `sync`: the step plus a finiteness check turned into a Python bool, a host sync per step
     (the trainer before the divergence watch);
   - `async`: the step plus `DivergenceWatch` (the trainer now);
   - `graph`: the whole step captured once as a CUDA graph and replayed (capturable optimisers,
     batches copied into the graph's input buffers), and whether graph runs are deterministic:
     `= eager` whether its parameters after the same 24 steps are bit-identical to the eager
     step's, `det` whether two graph runs agree bit for bit, `waited` the same with the host
     waiting for the GPU after every replay (a race with the host would show here), `warmup` when
     captured on the warm-up's stream rather than a private one (whose cuBLAS workspace differs),
     `algos` under `torch.use_deterministic_algorithms(True)`;
   - `compile`: `torch.compile(mode="reduce-overhead")` of the step (with `--compile`), and the
     seconds its compilation took.

On the CPU only the eager columns run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch
from benchmark import synchronise  # bench/ is on the path of a script run from it

from gvae.config import MODEL_NAMES, TrialConfig
from gvae.data import load_dataset
from gvae.divergence import DivergenceWatch
from gvae.models import GenerativeModel
from gvae.trainer import model_and_batches

BATCH_SIZE = 64
DATASET = "mnist5k"
Step = Callable[[], dict[str, torch.Tensor]]


def rate(step: Callable[[], object], iterations: int, device: torch.device, repeats: int) -> float:
    """Median iterations per second of `step` over `repeats` loops of `iterations`."""
    for _ in range(5):
        step()
    rates = []
    for _ in range(repeats):
        synchronise(device)
        tick = time.perf_counter()
        for _ in range(iterations):
            step()
        synchronise(device)
        rates.append(iterations / (time.perf_counter() - tick))
    return statistics.median(rates)


def build(
    name: str, device: torch.device, capturable: bool = False
) -> tuple[GenerativeModel, Callable]:
    config = (
        TrialConfig(model=name, batch_size=BATCH_SIZE, device=str(device)).validate().resolved()
    )
    model, batches = model_and_batches([config], False, load_dataset(DATASET), device)
    if capturable:  # before any step: RMSprop makes its step counters on the device only so
        model.optimizers = {key: _capturable(opt) for key, opt in model.optimizers.items()}
    return model, batches


def _capturable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    groups = [{**group, "capturable": True} for group in optimizer.param_groups]
    return type(optimizer)(groups)


def with_sync_check(model: GenerativeModel, batches: Callable) -> Callable[[], None]:
    def step() -> None:
        losses = model.train_step(batches)
        if not bool(torch.isfinite(torch.stack(list(losses.values()))).all()):
            raise RuntimeError("diverged")

    return step


def with_watch(model: GenerativeModel, batches: Callable) -> Callable[[], None]:
    watch = DivergenceWatch.for_device(model.device)
    counter = iter(range(1, 1 << 62))

    def step() -> None:
        watch.record(next(counter), model.train_step(batches))

    return step


class StaticBatches:
    """Batch source for a captured step: the graph reads fixed buffers, refilled before replay."""

    def __init__(self, source: Callable[[], torch.Tensor], count: int) -> None:
        self.source = source
        self.buffers = [source().clone() for _ in range(count)]
        self.next = 0

    def __call__(self) -> torch.Tensor:
        buffer = self.buffers[self.next % len(self.buffers)]
        self.next += 1
        return buffer

    def refill(self) -> None:
        for buffer in self.buffers:
            buffer.copy_(self.source(), non_blocking=True)


def batches_per_step(model_step: Callable[[Callable], object], source: Callable) -> int:
    count = 0

    def counting() -> torch.Tensor:
        nonlocal count
        count += 1
        return source()

    model_step(counting)
    return count


def graphed(
    model_step: Callable[[Callable], object], source: Callable, on_warmup_stream: bool = False
) -> Callable[[], None]:
    """`model_step(batches)` captured as one CUDA graph; the returned call refills and replays.
    Captured on torch.cuda.graph's private stream, or on the warm-up's."""
    static = StaticBatches(source, batches_per_step(model_step, source))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            static.refill()
            model_step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side if on_warmup_stream else None):
        model_step(static)

    def replay() -> None:
        static.refill()
        graph.replay()

    return replay


def parameters_after(
    make_step: Callable[[], tuple[Callable[[], None], list[torch.Tensor]]],
    steps: int,
    wait: bool = False,
) -> list[torch.Tensor]:
    """Parameters after `steps` steps; with `wait`, the host waits for the GPU after each."""
    step, parameters = make_step()
    for _ in range(steps):
        step()
        if wait:
            synchronise(parameters[0].device)
    synchronise(parameters[0].device)
    return [p.detach().clone() for p in parameters]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    return "yes" if all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) else "no"


CHECK_STEPS = 20  # graph replays (after a counting step and three warm-ups) before comparing
Run = tuple[Callable[[], None], list[torch.Tensor]]


def twice_the_same(run: Callable[[], list[torch.Tensor]]) -> str:
    """Whether two runs give bit-identical parameters ("err" when the run itself fails)."""
    try:
        return same(run(), run())
    except Exception as error:
        print(f"  ({type(error).__name__}: {str(error)[:120]})", file=sys.stderr)
        return "err"


def with_deterministic_algorithms(graph_run: Callable[[], Run]) -> list[torch.Tensor]:
    torch.use_deterministic_algorithms(True)
    try:
        return parameters_after(graph_run, CHECK_STEPS)
    finally:
        torch.use_deterministic_algorithms(False)


def model_parameters(model: GenerativeModel) -> list[torch.Tensor]:
    return [p for net in model.nets.values() for p in net.parameters()]


def bench_model(name: str, device: torch.device, args: argparse.Namespace) -> str:
    cells = [f"{name:8s}"]
    model, batches = build(name, device)
    cells.append(
        f"{rate(with_sync_check(model, batches), args.iterations, device, args.repeats):9.1f}"
    )
    model, batches = build(name, device)
    eager = rate(with_watch(model, batches), args.iterations, device, args.repeats)
    cells.append(f"{eager:9.1f}")
    if device.type != "cuda":
        return "  ".join(cells)
    cells += graph_cells(name, device, args, eager)
    if args.compile:
        cells += compile_cells(name, device, args)
    return "  ".join(cells)


def graph_cells(
    name: str, device: torch.device, args: argparse.Namespace, eager: float
) -> list[str]:
    try:

        def graph_run(on_warmup_stream: bool = False) -> Run:
            model, batches = build(name, device, capturable=True)
            replay = graphed(model.train_step, batches, on_warmup_stream)
            return replay, model_parameters(model)

        def eager_run() -> Run:
            model, batches = build(name, device, capturable=True)
            # The same batches and steps as graph_run: one counting step, three warm-ups.
            count = batches_per_step(model.train_step, batches)
            static = StaticBatches(batches, count)

            def step() -> None:
                static.refill()
                model.train_step(static)

            for _ in range(3):
                step()
            return step, model_parameters(model)

        step, _ = graph_run()
        graph = rate(step, args.iterations, device, args.repeats)
        plain = parameters_after(eager_run, CHECK_STEPS)
        first = parameters_after(graph_run, CHECK_STEPS)
        verdicts = [
            same(first, plain),
            same(first, parameters_after(graph_run, CHECK_STEPS)),
            twice_the_same(lambda: parameters_after(graph_run, CHECK_STEPS, wait=True)),
            twice_the_same(lambda: parameters_after(lambda: graph_run(True), CHECK_STEPS)),
            twice_the_same(lambda: with_deterministic_algorithms(graph_run)),
        ]
        return [f"{graph:9.1f}", f"{graph / eager:6.2f}x"] + [f"{v:>7s}" for v in verdicts]
    except Exception as error:  # one failing capture must not cost the other figures
        traceback.print_exc()
        return [f"graph failed: {type(error).__name__}: {str(error)[:80]}"]


def compile_cells(name: str, device: torch.device, args: argparse.Namespace) -> list[str]:
    try:
        model, batches = build(name, device, capturable=True)
        # Batches drawn outside the compiled step: dynamo cannot trace the sampler's pin_memory.
        static = StaticBatches(batches, batches_per_step(model.train_step, batches))
        compiled = torch.compile(model.train_step, mode="reduce-overhead")

        def step() -> None:
            static.refill()
            static.next = 0
            compiled(static)

        tick = time.perf_counter()
        for _ in range(3):
            step()
        synchronise(device)
        compile_s = time.perf_counter() - tick
        return [
            f"{rate(step, args.iterations, device, args.repeats):9.1f}",
            f"{compile_s:6.1f}s",
        ]
    except Exception as error:
        traceback.print_exc()
        return [f"compile failed: {type(error).__name__}: {str(error)[:80]}"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="steps per timed loop (300)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per figure (3)")
    parser.add_argument("--models", nargs="*", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # One intra-op thread, as bench/benchmark.py and a study's one-CPU trials: with all cores,
    # the step's small CPU-side ops (batch indices, pinning) cost more than they save.
    torch.set_num_threads(1)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    name += ", one thread"
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"torch {torch.__version__} | device {name} | batch {BATCH_SIZE} | load {load}")
    header = ["model   ", "     sync", "    async"]
    if device.type == "cuda":
        header += [
            "    graph",
            "graph/async",
            "= eager",
            "    det",
            " waited",
            " warmup",
            "  algos",
        ]
        if args.compile:
            header += ["  compile", "compile s"]
    print("it/s: " + "  ".join(header), flush=True)
    for model in args.models:
        print("      " + bench_model(model, device, args), flush=True)

    sys.stdout.flush()


if __name__ == "__main__":
    main()
