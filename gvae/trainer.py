"""The training loop of one trial: train, evaluate every `eval_every`, checkpoint, report.

Knows nothing of Ray: `gvae train`, the Ray trainable, `gvae reproduce` and the tests all call
`run_trial` with a config, a `report` callable and optionally a checkpoint to resume from.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gvae.config import TrialConfig
from gvae.data import (
    BatchSampler,
    PackBatches,
    StreamedBatches,
    load_dataset,
    pack_batches,
    training_batches,
)
from gvae.divergence import Diverged, DivergenceWatch
from gvae.errors import GvaeError
from gvae.evaluation import Evaluator, load_or_train_evaluator
from gvae.graphs import training_step
from gvae.io import CHECKPOINT_FILE, readable_checkpoint
from gvae.models import MODELS, GenerativeModel
from gvae.models.base import build_pack

GRID_SIZE = 100  # a 10x10 grid of samples per evaluation
SAMPLE_CHUNK = 1000  # generate evaluation samples in chunks to bound memory
# What a checkpoint holds (see _checkpoint_and_report); one that lacks any of it is refused.
CHECKPOINT_KEYS = ("model", "iteration", "curves", "diverged", "rng")
RNG_KEYS = ("torch", "cuda", "members", "batches")

# report(metrics, checkpoint_dir): the directory lives only for the duration of the call, so the
# callee must copy what it keeps (Ray Tune's report does exactly that).
Reporter = Callable[[dict[str, Any], Path], None]
# A pack's report: one metrics dict per member, in the order of its configs.
PackReporter = Callable[[list[dict[str, Any]], Path], None]


@dataclass
class TrialOutcome:
    config: TrialConfig
    curve: list[dict[str, Any]]
    final: dict[str, Any]  # the last evaluation, with the per-image arrays
    device: str
    evaluator_accuracy: float
    reference: dict[str, float] = field(default_factory=dict)
    mode_attributes: tuple[str, ...] = ()  # what mode_entropy counts, when not classes (CelebA)
    diverged: Diverged | None = None  # a pack's member that diverged (a lone trial raises)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_threads(config: TrialConfig, device: torch.device, default: int) -> int:
    """The torch CPU threads a trial runs with: as its config asks, else one on a GPU (more
    threads only spin beside the one that launches the kernels), else `default`."""
    return config.cpu_threads or (1 if device.type == "cuda" else default)


def make_deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


Batches = BatchSampler | StreamedBatches | PackBatches  # see gvae.data


def run_trial(
    config: TrialConfig,
    report: Reporter | None = None,
    resume_from: Path | None = None,
    out_dir: Path | None = None,
    evaluator: Evaluator | None = None,
    log: Callable[[str], None] = print,
) -> TrialOutcome:
    """Train one trial to `config.iterations`, resuming from `resume_from` (a checkpoint directory).

    Raises Diverged when a loss turns NaN or infinite.
    """
    member_report = None if report is None else lambda rows, where: report(rows[0], where)
    (outcome,) = _train([config], False, member_report, resume_from, out_dir, evaluator, log)
    if outcome.diverged is not None:
        raise outcome.diverged
    return outcome


def run_pack(
    configs: list[TrialConfig],
    report: PackReporter | None = None,
    resume_from: Path | None = None,
    out_dir: Path | None = None,
    evaluator: Evaluator | None = None,
    log: Callable[[str], None] = print,
) -> list[TrialOutcome]:
    """Train a pack (gvae.pack): the configs, equal but for their seeds, in lockstep.

    One outcome per member; a member that diverged has `diverged` set and stops being
    evaluated, while the others train on. The pack ends when all have diverged.
    """
    if len({dataclasses.replace(config, seed=0) for config in configs}) != 1:
        raise GvaeError("pack: its trials must differ only in seed; pack seeds of one config")
    return _train(configs, True, report, resume_from, out_dir, evaluator, log)


def _train(
    configs: list[TrialConfig],
    packed: bool,
    report: PackReporter | None,
    resume_from: Path | None,
    out_dir: Path | None,
    evaluator: Evaluator | None,
    log: Callable[[str], None],
) -> list[TrialOutcome]:
    configs = [config.resolved() for config in configs]
    config = configs[0]
    device = resolve_device(config.device)
    make_deterministic(device)
    dataset = load_dataset(config.dataset, config.data_root)
    if evaluator is None:
        evaluator = load_or_train_evaluator(dataset, log=log)
    evaluator = evaluator.to(device)
    model, batches = model_and_batches(configs, packed, dataset, device)

    progress = _Progress(configs)
    if resume_from is not None:
        progress = _load_checkpoint(Path(resume_from), model, batches, device, configs)
        log(f"resumed from {resume_from} at iteration {progress.iteration}")
    train_step = training_step(config, model, batches, device, log)  # after the resume

    loss_sums: dict[str, torch.Tensor] = {}
    watch = DivergenceWatch.for_device(device)
    window_iterations, window_start = 0, time.perf_counter()
    try:
        for iteration in range(progress.iteration + 1, config.iterations + 1):
            losses = train_step()
            progress.note_diverged(watch.record(iteration, losses))
            for name, value in losses.items():
                loss_sums[name] = loss_sums.get(name, 0.0) + value.reshape(-1)
            window_iterations += 1
            if progress.all_diverged():
                break
            if iteration % config.eval_every and iteration != config.iterations:
                continue
            # Waits for the window's steps, so the time below is theirs.
            progress.note_diverged(watch.check())
            if progress.all_diverged():
                break
            speed = window_iterations / max(time.perf_counter() - window_start, 1e-9)
            progress.iteration = iteration
            rows = _evaluate(model, evaluator, progress, out_dir)
            for member, row in rows.items():
                row.update({name: float(total[member]) / window_iterations
                            for name, total in loss_sums.items()})  # fmt: skip
                row["iterations_per_second"] = speed
                progress.curves[member].append(row)
                log(_progress_line(configs[member], row))
            _checkpoint_and_report(model, batches, device, progress, report)
            loss_sums, window_iterations, window_start = {}, 0, time.perf_counter()
    finally:
        batches.close()  # stops the decoding workers of a streamed dataset

    if not any(progress.finals) and not progress.all_diverged():
        # resumed from a checkpoint of the last iteration: nothing left to train
        _evaluate(model, evaluator, progress, None)
    return _outcomes(progress, device, evaluator)


def _outcomes(
    progress: _Progress, device: torch.device, evaluator: Evaluator
) -> list[TrialOutcome]:
    return [
        TrialOutcome(
            config=member,
            curve=progress.curves[index],
            final={k: v for k, v in progress.finals[index].items() if k != "grid_images"},
            device=str(device),
            evaluator_accuracy=evaluator.accuracy,
            reference=evaluator.reference.scalars(),
            mode_attributes=evaluator.mode_attributes,
            diverged=progress.diverged[index],
        )
        for index, member in enumerate(progress.configs)
    ]


def model_and_batches(
    configs: list[TrialConfig], packed: bool, dataset: Any, device: torch.device
) -> tuple[GenerativeModel, Batches]:
    """The model and batch source a run trains: a lone trial of `configs[0]`, or a pack."""
    config = configs[0]
    if not packed:
        torch.manual_seed(config.seed)
        model = MODELS[config.model](config, dataset.image_shape, device)
        return model, training_batches(dataset, config.batch_size, config.seed, device)
    seeds = [member.seed for member in configs]
    batches = pack_batches(dataset, config.batch_size, seeds, device)
    return build_pack(MODELS[config.model], configs, dataset.image_shape, device), batches


def _evaluation_noise(config: TrialConfig) -> torch.Tensor:
    """Fixed evaluation noise, drawn apart from the training streams: every evaluation of a
    trial looks at the same latent codes, and evaluating never shifts the training randomness.
    Drawn again at each evaluation (milliseconds), so a pack holds one member's at a time."""
    generator = torch.Generator().manual_seed(config.seed)
    return torch.randn(config.eval_samples, config.latent_dim, generator=generator)


@dataclass
class _Progress:
    """Where a run stands: the iteration last evaluated and, per member, its curve, its last
    evaluation's arrays, and the divergence that stopped it (None while it trains)."""

    configs: list[TrialConfig]
    iteration: int = 0
    curves: list[list[dict[str, Any]]] = field(default_factory=list)
    finals: list[dict[str, Any]] = field(default_factory=list)
    diverged: list[Diverged | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        count = len(self.configs)
        self.curves = self.curves or [[] for _ in range(count)]
        self.finals = [{} for _ in range(count)]
        self.diverged = self.diverged or [None] * count

    def note_diverged(self, found: dict[int, Diverged]) -> None:
        for member, error in found.items():
            self.diverged[member] = error

    def all_diverged(self) -> bool:
        return all(error is not None for error in self.diverged)

    def training(self) -> list[int]:
        return [member for member, error in enumerate(self.diverged) if error is None]


@torch.no_grad()
def _evaluate(
    model: GenerativeModel,
    evaluator: Evaluator,
    progress: _Progress,
    out_dir: Path | None,
) -> dict[int, dict[str, Any]]:
    """Evaluate the members still training: a curve row each (scalars and the mode histogram),
    by member; their arrays (per-image entropies, the sample grid) go to `progress.finals`."""
    rows: dict[int, dict[str, Any]] = {}
    for member in progress.training():
        tick = time.perf_counter()
        sample = model.member_sampler(member) if model.members else model.sample
        noise = _evaluation_noise(progress.configs[member])
        images = torch.cat([sample(chunk) for chunk in noise.split(SAMPLE_CHUNK)])
        row, progress.finals[member] = _measure(images, evaluator, progress.iteration)
        row["eval_seconds"] = time.perf_counter() - tick
        if out_dir is not None:
            grid_name = f"samples_{progress.iteration:07d}.png"
            if model.members:
                grid_name = f"seed{progress.configs[member].seed}_{grid_name}"
            _save_grid(progress.finals[member]["grid_images"], out_dir / grid_name)
        rows[member] = row
    return rows


def _measure(
    images: torch.Tensor, evaluator: Evaluator, iteration: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One curve row (scalars and the mode histogram) and the arrays of this evaluation."""
    measurement = evaluator.measure(images)
    row: dict[str, Any] = {
        "iteration": iteration,
        **measurement.scalars(),  # Frechet distance and the k-NN metrics when measurable
        "class_histogram": measurement.class_histogram,
    }
    grid = images[:GRID_SIZE].cpu()
    arrays = {
        "grid_images": grid,
        "samples_png": _png_base64(grid),
        "sample_labels": measurement.labels[:GRID_SIZE].tolist(),
        "image_entropies": [round(value, 5) for value in measurement.image_entropies.tolist()],
    }
    return row, arrays


def _save_grid(images: torch.Tensor, target: Path | io.BytesIO) -> None:
    """The images as one PNG grid, ten a row."""
    # Imported here: importing torchvision costs 1.3 s (it loads TorchDynamo), which a study's
    # driver, which never draws a grid, should not pay.
    from torchvision.utils import save_image

    save_image(images, target, format="png", nrow=10)


def _png_base64(images: torch.Tensor) -> str:
    buffer = io.BytesIO()
    _save_grid(images, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _progress_line(config: TrialConfig, row: dict[str, Any]) -> str:
    distance = (
        f"frechet_distance {row['frechet_distance']:.3g}  " if "frechet_distance" in row else ""
    )
    return (
        f"[{config.model} seed={config.seed}] it {row['iteration']}/{config.iterations}  "
        f"mode_entropy {row['mode_entropy']:.3f}  mean_image_entropy "
        f"{row['mean_image_entropy']:.3f}  {distance}{row['iterations_per_second']:.2f} it/s"
    )


def _checkpoint_and_report(
    model: GenerativeModel,
    batches: Batches,
    device: torch.device,
    progress: _Progress,
    report: PackReporter | None,
) -> None:
    state = {
        "model": model.state_dict(),
        "iteration": progress.iteration,
        "curves": progress.curves,
        "diverged": [None if e is None else (e.iteration, e.losses) for e in progress.diverged],
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "members": [generator.get_state() for generator in model.member_generators],
            "batches": batches.state(),
        },
    }
    with tempfile.TemporaryDirectory(prefix="gvae-ckpt-") as directory:
        torch.save(state, Path(directory) / CHECKPOINT_FILE)
        if report is not None:
            report(
                [_member_metrics(progress, member) for member in range(len(progress.configs))],
                Path(directory),
            )


def _member_metrics(progress: _Progress, member: int) -> dict[str, Any]:
    """What a member reports: its divergence, or its newest evaluation (with the per-image
    arrays after the last iteration)."""
    error = progress.diverged[member]
    if error is not None:
        return {"diverged_at": error.iteration, "diverged_error": str(error)}
    metrics = dict(progress.curves[member][-1])
    if progress.iteration == progress.configs[member].iterations:
        final = progress.finals[member]
        metrics.update({key: value for key, value in final.items() if key != "grid_images"})
    return metrics


def _load_checkpoint(
    directory: Path,
    model: GenerativeModel,
    batches: Batches,
    device: torch.device,
    configs: list[TrialConfig],
) -> _Progress:
    if not readable_checkpoint(directory):
        raise GvaeError(
            f"checkpoint {directory / CHECKPOINT_FILE}: damaged, it cannot be read; restore it "
            "from a copy, or start this trial afresh"
        )
    state = torch.load(directory / CHECKPOINT_FILE, map_location=device, weights_only=True)
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    missing += [f"rng.{key}" for key in RNG_KEYS if key not in state.get("rng", {})]
    if missing:
        raise GvaeError(
            f"checkpoint {directory}: no {', '.join(missing)} (written by an older gvae); "
            "start this trial afresh"
        )
    model.load_state_dict(state["model"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
    for generator, generator_state in zip(
        model.member_generators, state["rng"]["members"], strict=True
    ):
        generator.set_state(generator_state.cpu())
    batches.load_state(state["rng"]["batches"])
    return _Progress(
        configs,
        iteration=int(state["iteration"]),
        curves=[list(curve) for curve in state["curves"]],
        diverged=[None if d is None else Diverged(*d) for d in state["diverged"]],
    )
