"""A training step captured as one CUDA graph and replayed, for a lone trial or a pack.

A step of the paper's small MLPs is bound by kernel launches, not by the GPU's arithmetic: the
eager step launches a hundred-odd kernels, a replay one graph. `TrialConfig.graph` chooses:
`off` (eager), `on` (a graph or an error that says why not) or `auto` (a graph on a GPU when it can
be captured, else eager, said in one line).

What keeps a replay the eager step, number for number:
- **Batches.** Before each replay the host draws the step's batch indices from the trial's own
  samplers, as the eager step draws them, and copies them into a static buffer that the graph
  gathers from. The same batches reach both, and a checkpoint's sampler state is exact.
- **Random numbers.** A captured random kernel reads its generator's state at each replay, and
  each replay advances it as the eager step would. Warm-up draws too, so every generator is set
  back after the warm-up and again after capture.
- **State.** Capture needs warm-up steps first (they make cuBLAS's handles and the optimisers'
  lazily made state). Their effect is undone in place: a replay reads and writes fixed
  addresses, so weights and optimiser state are copied back, and state the warm-up made is
  zeroed, which is Adam's and RMSprop's fresh state.
- **Gradients.** `.grad` is None at capture, so each captured backward writes its gradients
  rather than adding to them. Each backward of a step reaches only its own net's parameters
  (gvae.models.base.frozen and detached fakes).
- **Streams.** Warm-up and capture run on a stream of the step's own, so no other graph shares
  its cuBLAS workspace. Replays and the copies into the buffer run on the current stream, in
  order with the trainer's reads of the losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gvae.config import TrialConfig
from gvae.data import BatchSampler, PackBatches
from gvae.errors import GvaeError
from gvae.models.base import GenerativeModel, Losses

TrainStep = Callable[[], Losses]
# Warm-up steps before capture, as in PyTorch's whole-network capture example.
WARMUP_STEPS = 3
# Capturing a random op on a generator other than the default needs it registered before
# torch 2.14; from 2.14 on, registration is automatic and the call a deprecated no-op.
REGISTERS_GENERATORS = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 14)


def training_step(
    config: TrialConfig,
    model: GenerativeModel,
    batches: object,
    device: torch.device,
    log: Callable[[str], None],
) -> TrainStep:
    """The step the trainer calls each iteration: a replayed graph when `config.graph` asks for
    one and the step can be captured, else the model's eager step."""

    def eager() -> Losses:
        return model.train_step(batches)

    if config.graph == "off" or (config.graph == "auto" and device.type != "cuda"):
        return eager
    reason = unsupported(device, batches)
    if reason is None:
        try:
            return GraphStep(model, batches, capture_cuda_graph).replay
        except RuntimeError as error:  # an op of the step that cannot be captured
            reason = f"its capture failed ({str(error).strip().splitlines()[0]})"
    if config.graph == "on":
        raise refused(reason)
    log(f"graph: the step runs eagerly, as {reason}")
    return eager


def check_device(config: TrialConfig, device: torch.device) -> None:
    """Refuse `graph: on` off a GPU before anything is trained or written."""
    if config.graph == "on" and device.type != "cuda":
        raise refused(unsupported(device, None))


def refused(reason: str | None) -> GvaeError:
    return GvaeError(f"graph: on, but {reason}; set graph: auto (eager then) or off")


def unsupported(device: torch.device, batches: object) -> str | None:
    """Why the step cannot be a CUDA graph here, or None."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device and this trial runs on {device}"
    if not isinstance(batches, BatchSampler | PackBatches):
        return "the dataset is streamed from disk, decoded on the host at each step"
    return None


class StaticBatches:
    """The batch source inside a graph: the step's i-th draw gathers row i of a static index
    buffer, which `fill` loads before each replay with what the trial's samplers draw."""

    def __init__(self, batches: BatchSampler | PackBatches) -> None:
        self.batches = batches
        self.images = batches.images
        shape = batches.index_shape
        self.rows = [torch.zeros(shape, dtype=torch.long, device=self.images.device)]
        self.drawn = 0
        self.counting = True  # the first warm-up step counts the draws a step makes

    def rewound(self) -> StaticBatches:
        self.drawn = 0
        return self

    def __call__(self) -> torch.Tensor:
        if self.drawn == len(self.rows):
            if not self.counting:
                raise RuntimeError("the step drew more batches than its warm-up did")
            self.rows.append(torch.zeros_like(self.rows[0]))
        row = self.rows[self.drawn]
        self.drawn += 1
        return self.images[row]

    def freeze(self) -> None:
        """One buffer for the counted rows, so `fill` is one copy; before capture."""
        self.counting = False
        self.buffer = torch.stack(self.rows)
        self.rows = list(self.buffer.unbind(0))

    def fill(self) -> None:
        """The next step's batch indices, drawn on the host in the eager step's order."""
        drawn = torch.stack([self.batches.draw_index() for _ in self.rows])
        if self.buffer.device.type == "cuda":  # queued like a kernel, from pinned memory
            drawn = drawn.pin_memory()
        self.buffer.copy_(drawn, non_blocking=True)


@dataclass
class Snapshot:
    """A model's weights, optimiser state and random streams, to be put back in place."""

    nets: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict[torch.Tensor, dict[str, torch.Tensor]]]
    rng: dict[str, torch.Tensor | list[torch.Tensor] | None]

    @classmethod
    def of(cls, model: GenerativeModel) -> Snapshot:
        nets = {
            name: {key: value.clone() for key, value in net.state_dict().items()}
            for name, net in model.nets.items()
        }
        optimizers = {
            name: {
                param: {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
                for param, state in optimizer.state.items()
            }
            for name, optimizer in model.optimizers.items()
        }
        cuda = model.device.type == "cuda"
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(model.device) if cuda else None,
            "members": [generator.get_state() for generator in model.member_generators],
        }
        return cls(nets, optimizers, rng)

    def restore(self, model: GenerativeModel) -> None:
        for name, net in model.nets.items():
            net.load_state_dict(self.nets[name])  # copies into the same tensors
        for name, optimizer in model.optimizers.items():
            saved = self.optimizers[name]
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    if param in saved:
                        value.copy_(saved[param][key])
                    else:  # made by the warm-up: Adam's and RMSprop's fresh state is zeros
                        value.zero_()
        torch.set_rng_state(self.rng["torch"])
        if self.rng["cuda"] is not None:
            torch.cuda.set_rng_state(self.rng["cuda"], model.device)
        for generator, state in zip(model.member_generators, self.rng["members"], strict=True):
            generator.set_state(state)


# capture(step, model, snapshot) -> what replays the step and returns its losses.
Capture = Callable[[TrainStep, GenerativeModel, Snapshot], TrainStep]


class GraphStep:
    """A model's train_step, captured by `capture` over static batches; `replay` runs it."""

    def __init__(
        self, model: GenerativeModel, batches: BatchSampler | PackBatches, capture: Capture
    ) -> None:
        self.batches = StaticBatches(batches)
        snapshot = Snapshot.of(model)

        def step() -> Losses:
            losses = model.train_step(self.batches.rewound())
            if self.batches.counting:  # the first warm-up step: the draws a step makes
                self.batches.freeze()
            return losses

        try:
            self.run = capture(step, model, snapshot)
        finally:
            snapshot.restore(model)  # the warm-up undone, also when capture failed

    def replay(self) -> Losses:
        self.batches.fill()
        return self.run()


def warm_up(step: TrainStep, model: GenerativeModel, snapshot: Snapshot) -> None:
    """Run the step WARMUP_STEPS times, then undo them: the model is as `snapshot` holds it."""
    for _ in range(WARMUP_STEPS):
        step()
    snapshot.restore(model)


def capture_cuda_graph(step: TrainStep, model: GenerativeModel, snapshot: Snapshot) -> TrainStep:
    """The step captured in a CUDA graph on a stream of its own; what it returns replays it."""
    device = model.device
    for optimizer in model.optimizers.values():
        make_capturable(optimizer)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        warm_up(step, model, snapshot)
    torch.cuda.current_stream(device).wait_stream(stream)
    for optimizer in model.optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    if REGISTERS_GENERATORS:
        for generator in model.member_generators:
            graph.register_generator_state(generator)
    with torch.cuda.graph(graph, stream=stream):
        losses = step()  # recorded, not run: GraphStep sets the generators back once more

    def replay() -> Losses:
        graph.replay()
        return losses

    return replay


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Keep the optimiser's step count on the device, where a captured step can update it; a
    count loaded from a checkpoint moves there. Adam's and RMSprop's arithmetic is unchanged."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(param.device)
