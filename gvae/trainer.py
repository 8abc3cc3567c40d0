"""The training loop of one trial: train, evaluate every `eval_every`, checkpoint, report.

Knows nothing of Ray: `gvae train`, the Ray trainable, `gvae reproduce` and the tests all call
`run_trial` with a config, a `report` callable and optionally a checkpoint to resume from.
"""

from __future__ import annotations

import base64
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
from gvae.data import BatchSampler, StreamedBatches, load_dataset, training_batches
from gvae.divergence import DivergenceWatch
from gvae.evaluation import Evaluator, load_or_train_evaluator
from gvae.io import CHECKPOINT_FILE
from gvae.models import MODELS, GenerativeModel

GRID_SIZE = 100  # a 10x10 grid of samples per evaluation
SAMPLE_CHUNK = 1000  # generate evaluation samples in chunks to bound memory

# report(metrics, checkpoint_dir): the directory lives only for the duration of the call, so the
# callee must copy what it keeps (Ray Tune's report does exactly that).
Reporter = Callable[[dict[str, Any], Path], None]


@dataclass
class TrialOutcome:
    config: TrialConfig
    curve: list[dict[str, Any]]
    final: dict[str, Any]  # the last evaluation, with the per-image arrays
    device: str
    evaluator_accuracy: float
    reference: dict[str, float] = field(default_factory=dict)
    mode_attributes: tuple[str, ...] = ()  # what mode_entropy counts, when not classes (CelebA)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


Batches = BatchSampler | StreamedBatches  # in memory, or decoded from disk (see gvae.data)


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
    config = config.resolved()
    device = resolve_device(config.device)
    make_deterministic(device)
    dataset = load_dataset(config.dataset, config.data_root)
    if evaluator is None:
        evaluator = load_or_train_evaluator(dataset, log=log)
    evaluator = evaluator.to(device)

    torch.manual_seed(config.seed)
    model = MODELS[config.model](config, dataset.image_shape, device)
    batches = training_batches(dataset, config.batch_size, config.seed, device)
    # Fixed evaluation noise, drawn apart from the training streams: every evaluation of a trial
    # looks at the same latent codes, and evaluating never shifts the training randomness.
    eval_noise = torch.randn(
        config.eval_samples, config.latent_dim, generator=torch.Generator().manual_seed(config.seed)
    )

    curve: list[dict[str, Any]] = []
    start = 0
    if resume_from is not None:
        start, curve = _load_checkpoint(Path(resume_from), model, batches, device)
        log(f"resumed from {resume_from} at iteration {start}")

    final: dict[str, Any] = {}
    loss_sums: dict[str, torch.Tensor] = {}
    watch = DivergenceWatch.for_device(device)
    window_iterations, window_start = 0, time.perf_counter()
    try:
        for iteration in range(start + 1, config.iterations + 1):
            losses = model.train_step(batches)
            watch.record(iteration, losses)
            for name, value in losses.items():
                loss_sums[name] = loss_sums.get(name, 0.0) + value
            window_iterations += 1

            if iteration % config.eval_every and iteration != config.iterations:
                continue
            watch.check()  # waits for the window's steps, so the time below is theirs
            window_seconds = time.perf_counter() - window_start
            row, final = _evaluate(model, evaluator, eval_noise, iteration)
            row.update(
                {name: float(total) / window_iterations for name, total in loss_sums.items()}
            )
            row["iterations_per_second"] = window_iterations / max(window_seconds, 1e-9)
            curve.append(row)
            log(_progress_line(config, row))
            if out_dir is not None:
                _save_grid(final["grid_images"], out_dir / f"samples_{iteration:07d}.png")
            _checkpoint_and_report(model, batches, device, iteration, curve, row, final, report)
            loss_sums, window_iterations, window_start = {}, 0, time.perf_counter()
    finally:
        batches.close()  # stops the decoding workers of a streamed dataset

    if not final:  # resumed from a checkpoint of the last iteration: nothing left to train
        _, final = _evaluate(model, evaluator, eval_noise, config.iterations)
    return TrialOutcome(
        config=config,
        curve=curve,
        final={key: value for key, value in final.items() if key != "grid_images"},
        device=str(device),
        evaluator_accuracy=evaluator.accuracy,
        reference=evaluator.reference.scalars(),
        mode_attributes=evaluator.mode_attributes,
    )


@torch.no_grad()
def _evaluate(
    model: GenerativeModel,
    evaluator: Evaluator,
    eval_noise: torch.Tensor,
    iteration: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One curve row (scalars and the mode histogram) and the arrays of this evaluation."""
    tick = time.perf_counter()
    images = torch.cat([model.sample(chunk) for chunk in eval_noise.split(SAMPLE_CHUNK)])
    measurement = evaluator.measure(images)
    row: dict[str, Any] = {
        "iteration": iteration,
        **measurement.scalars(),  # Frechet distance and the k-NN metrics when measurable
        "class_histogram": measurement.class_histogram,
    }
    row["eval_seconds"] = time.perf_counter() - tick
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
    # Imported here: importing torchvision costs 1.3 s (it loads torch._dynamo), which a study's
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
    iteration: int,
    curve: list[dict[str, Any]],
    row: dict[str, Any],
    final: dict[str, Any],
    report: Reporter | None,
) -> None:
    state = {
        "model": model.state_dict(),
        "iteration": iteration,
        "curve": curve,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "batches": batches.state(),
        },
    }
    with tempfile.TemporaryDirectory(prefix="gvae-ckpt-") as directory:
        torch.save(state, Path(directory) / CHECKPOINT_FILE)
        if report is not None:
            metrics = dict(row)
            if iteration == model.config.iterations:
                metrics.update({k: v for k, v in final.items() if k != "grid_images"})
            report(metrics, Path(directory))


def _load_checkpoint(
    directory: Path, model: GenerativeModel, batches: Batches, device: torch.device
) -> tuple[int, list[dict[str, Any]]]:
    state = torch.load(directory / CHECKPOINT_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
    batches.load_state(state["rng"]["batches"])
    return int(state["iteration"]), list(state["curve"])
