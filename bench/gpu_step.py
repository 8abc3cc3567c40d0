"""What a GPU training step costs in host syncs and kernel launches, and what packing buys.

Run as `python bench/gpu_step.py [--iterations 300] [--models ...] [--stacks 1 8 32 128]
[--compile]`. Not a test: it prints two tables (see bench/README.md).

1. Per model, iterations per second of the trainer's step (mnist5k, batch 64, default config):
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
2. The paper's MLP GAN stacked K times: K models trained in lockstep as one batched computation
   (weights [K, in, out], `baddbmm`), eager and as a CUDA graph, in model-iterations per second.

On the CPU only the eager columns and the eager stack run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from benchmark import synchronise  # bench/ is on the path of a script run from it
from torch import nn

from gvae.config import MODEL_NAMES, TrialConfig
from gvae.data import load_dataset, training_batches
from gvae.divergence import DivergenceWatch
from gvae.models import MODELS, GenerativeModel

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
    torch.manual_seed(config.seed)
    model = MODELS[name](config, load_dataset(DATASET).image_shape, device)
    if capturable:  # before any step: RMSprop makes its step counters on the device only so
        model.optimizers = {key: _capturable(opt) for key, opt in model.optimizers.items()}
    batches = training_batches(load_dataset(DATASET), BATCH_SIZE, config.seed, device)
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


# --- K paper-MLP GANs as one batched computation ---------------------------------------------


class StackedLinear(nn.Module):
    """K independent linear layers: weight [K, in, out], bias [K, 1, out]; input [K, B, in]."""

    def __init__(self, stack: int, width_in: int, width_out: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(width_in)  # nn.Linear's default initialisation, per model
        self.weight = nn.Parameter(torch.empty(stack, width_in, width_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(stack, 1, width_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def stacked_mlp(stack: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(StackedLinear(stack, width_in, width_out))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class StackedGAN:
    """K paper-MLP GANs (non-saturating loss, Adam β1 0.5) stepped together. Each model's loss is
    its own batch mean; their sum has, for each model's weights, exactly that model's gradient."""

    def __init__(
        self, stack: int, images: torch.Tensor, device: torch.device, capturable: bool
    ) -> None:
        torch.manual_seed(0)
        self.stack, self.images, self.device = stack, images.flatten(1).to(device), device
        self.generator = stacked_mlp(stack, [100, 98, 196, 392, 784]).to(device)
        self.discriminator = stacked_mlp(stack, [784, 392, 196, 98, 1]).to(device)
        options = {"lr": 2e-4, "betas": (0.5, 0.999), "capturable": capturable}
        options |= {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.g_opt = torch.optim.Adam(self.generator.parameters(), **options)
        self.d_opt = torch.optim.Adam(self.discriminator.parameters(), **options)
        self.sampler = torch.Generator(device=device).manual_seed(0)

    def real_batches(self) -> torch.Tensor:
        index = torch.randint(
            len(self.images), (self.stack, BATCH_SIZE), generator=self.sampler, device=self.device
        )
        return self.images[index]

    def train_step(self, next_batch: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
        real = next_batch()
        noise = torch.randn(self.stack, BATCH_SIZE, 100, device=self.device)
        fake = torch.sigmoid(self.generator(noise))
        logits = self.discriminator(torch.cat([real, fake.detach()], dim=1))
        real_logits, fake_logits = logits.split(BATCH_SIZE, dim=1)
        d_loss = (
            F.softplus(-real_logits).mean((1, 2)) + F.softplus(fake_logits).mean((1, 2))
        ).sum()
        self.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_opt.step()
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        g_loss = F.softplus(-self.discriminator(fake)).mean((1, 2)).sum()
        for p in self.discriminator.parameters():
            p.requires_grad_(True)
        self.g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_opt.step()
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}


def bench_stack(
    stack: int, images: torch.Tensor, device: torch.device, args: argparse.Namespace, single: float
) -> str:
    iterations = max(20, args.iterations // max(1, stack // 8))
    model = StackedGAN(stack, images, device, capturable=False)
    eager = stack * rate(
        lambda: model.train_step(model.real_batches), iterations, device, args.repeats
    )
    cells = [f"{stack:5d}", f"{eager:12.0f}", f"{eager / single:8.1f}x"]
    if device.type == "cuda":
        try:
            model = StackedGAN(stack, images, device, capturable=True)
            replay = graphed(model.train_step, model.real_batches)
            graph = stack * rate(replay, iterations, device, args.repeats)
            cells += [f"{graph:12.0f}", f"{graph / single:8.1f}x"]
        except Exception as error:
            traceback.print_exc()
            cells.append(f"graph failed: {type(error).__name__}: {str(error)[:80]}")
    return "  ".join(cells)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="steps per timed loop (300)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per figure (3)")
    parser.add_argument("--models", nargs="*", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--stacks", nargs="*", type=int, default=[1, 8, 32, 128, 512])
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

    images = load_dataset(DATASET).train_images
    single_model, single_batches = build("gan", device)
    single = rate(with_watch(single_model, single_batches), args.iterations, device, args.repeats)
    print(
        "\nstacked paper-MLP GANs, model-iterations/s "
        f"(x: against one gvae GAN trial, {single:.0f} it/s)"
    )
    columns = ["    K", "       eager", "  eager x"]
    if device.type == "cuda":
        columns += ["       graph", "  graph x"]
    print("  ".join(columns), flush=True)
    for stack in args.stacks:
        try:
            print(bench_stack(stack, images, device, args, single), flush=True)
        except Exception as error:
            print(f"{stack:5d}  failed: {type(error).__name__}: {str(error)[:100]}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
