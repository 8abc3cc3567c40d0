"""A small CNN that labels generated images, so mode coverage and sharpness can be measured.

The classifier is trained once per dataset and cached on disk, keyed by everything that
determines its weights; every study, trial and process then scores samples with the very
same network, which keeps metrics comparable across runs.

Two kinds, chosen by the dataset: a digit (class) classifier for MNIST-like sets, and for
CelebA a classifier of the 40 binary face attributes, whose modes are the joint values of
MODE_ATTRIBUTES. Both also give the Frechet distance between generated and held-out real images
in their penultimate feature space (not comparable with published FIDs: another network).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gvae.data import Dataset, held_out_batches, training_batches
from gvae.errors import GvaeError
from gvae.metrics import (
    binary_entropies,
    class_histogram,
    feature_statistics,
    frechet_distance_from_statistics,
    image_entropies,
    joint_modes,
    mean_binary_entropy,
    mean_image_entropy,
    mode_entropy,
)

try:  # POSIX only; elsewhere concurrent processes may just train the same network twice
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# Bump ARCH_VERSION (digits) or ATTRIBUTE_ARCH_VERSION whenever that network or its training
# changes: it invalidates old caches.
ARCH_VERSION = 1
ATTRIBUTE_ARCH_VERSION = 1
STATE_FORMAT = 2  # 2: attribute evaluators and reference feature statistics
SEED = 0
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
DROPOUT = 0.25
FEATURE_GRID = 7  # spatial size the conv stack is pooled to before the fc layers
ATTRIBUTE_GRID = 8  # the same for the attribute classifier (64x64 faces after three poolings)
# The attributes whose joint values are the modes of face images: 2^3 = 8 modes, ln 8 at best.
MODE_ATTRIBUTES = ("Male", "Smiling", "Eyeglasses")
HELD_OUT_LIMIT = 10_000  # held-out images behind the reference row and feature statistics
ATTRIBUTE_MAX_VISITS = 100_000  # training images the attribute classifier sees by default


@dataclass
class Measurement:
    """Classifier-based statistics of one set of images."""

    mode_entropy: float
    mean_image_entropy: float  # for attributes: the mean binary entropy (metrics.binary_entropies)
    class_histogram: list[int]  # counts per mode: classes, or joint values of MODE_ATTRIBUTES
    image_entropies: torch.Tensor  # [N] float32 CPU
    labels: torch.Tensor  # [N] int64 predicted modes, CPU
    frechet_distance: float | None = None  # to the evaluator's held-out real images

    def as_state(self) -> dict:
        """Plain-dict form for `torch.save` / `weights_only` loading."""
        return {
            "mode_entropy": self.mode_entropy,
            "mean_image_entropy": self.mean_image_entropy,
            "class_histogram": list(self.class_histogram),
            "image_entropies": self.image_entropies,
            "labels": self.labels,
            "frechet_distance": self.frechet_distance,
        }

    @classmethod
    def from_state(cls, state: dict) -> Measurement:
        """Inverse of :meth:`as_state`."""
        return cls(**state)


def measurement_from_probs(probs: torch.Tensor, num_classes: int) -> Measurement:
    """Mode entropy, mean image entropy and histogram from class probabilities [N, K]."""
    labels = probs.argmax(dim=1).cpu()
    return Measurement(
        mode_entropy=mode_entropy(labels, num_classes),
        mean_image_entropy=mean_image_entropy(probs),
        class_histogram=class_histogram(labels, num_classes).tolist(),
        image_entropies=image_entropies(probs).float().cpu(),
        labels=labels,
    )


def measurement_from_attribute_probs(
    probs: torch.Tensor, mode_columns: tuple[int, ...]
) -> Measurement:
    """Attribute-mode entropy, mean binary entropy and mode histogram from attribute
    probabilities [N, A]; an image's mode is the joint value of the `mode_columns` attributes,
    each present when its probability exceeds 0.5."""
    labels = joint_modes(probs[:, list(mode_columns)] > 0.5)
    modes = 2 ** len(mode_columns)
    return Measurement(
        mode_entropy=mode_entropy(labels, modes),
        mean_image_entropy=mean_binary_entropy(probs),
        class_histogram=class_histogram(labels, modes).tolist(),
        image_entropies=binary_entropies(probs).float().cpu(),
        labels=labels,
    )


class PoolTo(nn.Module):
    """Adaptive average pooling to `size` x `size`, skipped when the input already has that size.

    28x28 images arrive at 7x7 and never touch it, which keeps CUDA training deterministic
    (adaptive pooling's CUDA backward uses atomics).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.adaptive_avg_pool2d(x, self.size)


def _conv_pool_stages(widths: list[int]) -> list[nn.Module]:
    """5x5 conv, ReLU and 2x2 max-pool per stage: each stage halves the image."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Conv2d(width_in, width_out, kernel_size=5, padding=2), nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
    return layers


def build_classifier(in_channels: int, num_classes: int) -> nn.Sequential:
    """LeNet-style CNN: two 5x5 conv+pool stages, then fc 128 and fc num_classes.

    Adaptive pooling fixes the fc input size, so images other than 28x28 still work.
    """
    return _conv_classifier([in_channels, 16, 32], FEATURE_GRID, num_classes)


def build_attribute_classifier(in_channels: int, num_attributes: int) -> nn.Sequential:
    """Three 5x5 conv+pool stages (64x64 -> 8x8), then fc 128 and one logit per attribute."""
    return _conv_classifier([in_channels, 16, 32, 64], ATTRIBUTE_GRID, num_attributes)


def _conv_classifier(widths: list[int], grid: int, outputs: int) -> nn.Sequential:
    """Conv+pool stages, pooling to grid x grid, then dropout, fc 128, dropout, fc outputs."""
    return nn.Sequential(
        *_conv_pool_stages(widths),
        PoolTo(grid),
        nn.Flatten(),
        nn.Dropout(DROPOUT),
        nn.Linear(widths[-1] * grid * grid, 128),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(128, outputs),
    )


def default_epochs(num_train: int) -> int:
    """About 32k sample visits, 3 to 8 epochs: 8 for mnist5k's 4000 images, 3 for full MNIST."""
    return min(8, max(3, math.ceil(32_000 / max(num_train, 1))))


class Evaluator:
    """A trained classifier plus its held-out accuracy and the real-data reference row.

    A digit evaluator has `num_classes` outputs (softmax); an attribute evaluator one output per
    name in `attribute_names` (sigmoid, `num_classes` 0), its modes being the joint values of
    `mode_attributes`. `reference_features` are the mean and covariance of the held-out images'
    penultimate features, against which `measure` computes the Frechet distance.
    """

    def __init__(
        self,
        net: nn.Sequential,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        accuracy: float,
        reference: Measurement,
        key: str,
        meta: dict | None = None,
        attribute_names: tuple[str, ...] = (),
        mode_attributes: tuple[str, ...] = (),
        reference_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.net = net.eval()
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.accuracy = accuracy
        self.reference = reference
        self.key = key
        self.meta = dict(meta or {})  # provenance: dataset, epochs, seed, training time
        self.attribute_names = tuple(attribute_names)
        self.mode_attributes = tuple(mode_attributes)
        self.reference_features = reference_features

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def has_attributes(self) -> bool:
        return bool(self.attribute_names)

    @property
    def mode_columns(self) -> tuple[int, ...]:
        return tuple(self.attribute_names.index(name) for name in self.mode_attributes)

    def _as_images(self, images: torch.Tensor) -> torch.Tensor:
        # MLP generators emit flat [N, C*H*W] vectors; accept them as well as [N, C, H, W].
        if images.dim() == 2 and images.shape[1] == math.prod(self.image_shape):
            images = images.reshape(-1, *self.image_shape)
        if images.dim() != 4 or images.shape[1] != self.image_shape[0]:
            raise ValueError(
                f"expected images [N, {self.image_shape[0]}, H, W] or [N, "
                f"{math.prod(self.image_shape)}], got {tuple(images.shape)}"
            )
        return images

    def predict(
        self, images: torch.Tensor, batch_size: int = 1000
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities [N, outputs] and penultimate features [N, D], on the CPU."""
        return _predict(self.net, self._as_images(images), self.has_attributes, batch_size)

    def predict_probs(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Class (or attribute) probabilities [N, outputs] on the CPU for images in [0, 1] on any
        device."""
        return self.predict(images, batch_size)[0]

    def measure(self, images: torch.Tensor) -> Measurement:
        """Mode entropy, mean image entropy, histogram, per-image values and Frechet distance."""
        probs, features = self.predict(images)
        measurement = self._measurement(probs)
        if self.reference_features is not None and len(features) >= 2:
            measurement.frechet_distance = frechet_distance_from_statistics(
                *feature_statistics(features), *self.reference_features
            )
        return measurement

    def _measurement(self, probs: torch.Tensor) -> Measurement:
        if self.has_attributes:
            return measurement_from_attribute_probs(probs, self.mode_columns)
        return measurement_from_probs(probs, self.num_classes)

    def state(self) -> dict:
        """Everything needed to rebuild this evaluator; loadable with `weights_only=True`."""
        return {
            "format": STATE_FORMAT,
            "arch_version": ATTRIBUTE_ARCH_VERSION if self.has_attributes else ARCH_VERSION,
            "key": self.key,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "attribute_names": list(self.attribute_names),
            "mode_attributes": list(self.mode_attributes),
            "accuracy": self.accuracy,
            "weights": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "reference": self.reference.as_state(),
            "reference_features": (
                list(self.reference_features) if self.reference_features is not None else None
            ),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_state(cls, state: dict, device: str | torch.device = "cpu") -> Evaluator:
        """Rebuild an evaluator saved with :meth:`state`."""
        attribute_names = tuple(state.get("attribute_names") or ())
        arch = ATTRIBUTE_ARCH_VERSION if attribute_names else ARCH_VERSION
        found = (state.get("format"), state.get("arch_version"))
        if found != (STATE_FORMAT, arch):
            raise ValueError(f"evaluator state (format, arch) {found} is not supported")
        image_shape = tuple(int(s) for s in state["image_shape"])
        if attribute_names:
            net = build_attribute_classifier(image_shape[0], len(attribute_names))
        else:
            net = build_classifier(image_shape[0], int(state["num_classes"]))
        net.load_state_dict(state["weights"])
        features = state.get("reference_features")
        return cls(
            net.to(device),
            image_shape=image_shape,
            num_classes=int(state["num_classes"]),
            accuracy=float(state["accuracy"]),
            reference=Measurement.from_state(state["reference"]),
            key=str(state["key"]),
            meta=state.get("meta"),
            attribute_names=attribute_names,
            mode_attributes=tuple(state.get("mode_attributes") or ()),
            reference_features=tuple(features) if features is not None else None,
        )

    def to(self, device: str | torch.device) -> Evaluator:
        """Move the network to `device` (in place) and return self."""
        self.net.to(device)
        return self


def _predict(
    net: nn.Sequential, images: torch.Tensor, attributes: bool, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (sigmoid for attributes, else softmax) and the last hidden layer's features."""
    device = next(net.parameters()).device
    body, head = net[:-1], net[-1]
    net.eval()
    probs, features = [], []
    with torch.no_grad():  # not inference_mode: callers may still use the probs under autograd
        for batch in images.split(batch_size):
            hidden = body(batch.to(device, torch.float32))
            logits = head(hidden)
            probs.append((logits.sigmoid() if attributes else logits.softmax(dim=1)).cpu())
            features.append(hidden.cpu())
    if not probs:
        return torch.empty(0, head.out_features), torch.empty(0, head.in_features)
    return torch.cat(probs), torch.cat(features)


# --- training -------------------------------------------------------------------------------


def attribute_steps(num_train: int, epochs: int | None) -> int:
    """Training steps of the attribute classifier: `epochs` passes over the training images, by
    default those of `default_epochs` but at most ATTRIBUTE_MAX_VISITS images in all (full
    CelebA would otherwise take ~500k decoded images, slow on the CPU where studies train it)."""
    if epochs is None:
        visits = min(default_epochs(num_train) * num_train, ATTRIBUTE_MAX_VISITS)
    else:
        visits = epochs * num_train
    return max(1, math.ceil(visits / BATCH_SIZE))


def evaluator_key(dataset: Dataset, epochs: int | None) -> str:
    """Cache key: a hash of everything that determines the trained weights (and reference)."""
    recipe = {
        "data": dataset.fingerprint,
        "arch": ARCH_VERSION,
        "epochs": epochs,
        "seed": SEED,
        "batch": BATCH_SIZE,
        "lr": LEARNING_RATE,
        "dropout": DROPOUT,
    }
    if dataset.has_attributes:
        recipe.update(
            arch=ATTRIBUTE_ARCH_VERSION,
            epochs=None,
            steps=attribute_steps(len(dataset.train_labels), epochs),
            modes=list(MODE_ATTRIBUTES),
            held_out=HELD_OUT_LIMIT,
        )
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _private_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global RNGs for training, then restore the caller's streams exactly."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        if cuda:
            torch.manual_seed(seed)
        else:
            # CPU only: seeding CUDA would alter (and initialise) RNGs fork_rng does not restore.
            torch.default_generator.manual_seed(seed)
        yield


def _fit(net: nn.Module, dataset: Dataset, epochs: int, device: torch.device) -> None:
    """Adam with a one-cycle schedule: reaches its plateau in few epochs, which keeps CPUs cheap."""
    images, labels = dataset.train_images.to(device), dataset.train_labels.to(device)
    steps_per_epoch = math.ceil(len(images) / BATCH_SIZE)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch
    )
    order = torch.Generator().manual_seed(SEED)  # own stream: shuffling never touches global RNG
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=order).split(BATCH_SIZE):
            idx = idx.to(device)
            loss = F.cross_entropy(net(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()


def _fit_attributes(net: nn.Module, dataset: Dataset, steps: int, device: torch.device) -> None:
    """As `_fit`, with one binary cross-entropy per attribute, for `steps` batches drawn as the
    trainer draws them (from memory, or streamed from disk for full CelebA)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=steps
    )
    batches = training_batches(dataset, BATCH_SIZE, SEED, device)  # own seeded stream
    net.train()
    try:
        for _ in range(steps):
            images, labels = batches.next_with_labels()
            loss = F.binary_cross_entropy_with_logits(net(images), labels.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        batches.close()
    net.eval()


def _check_mode_attributes(dataset: Dataset) -> None:
    missing = [name for name in MODE_ATTRIBUTES if name not in dataset.attribute_names]
    if missing:
        raise GvaeError(
            f"dataset '{dataset.name}': attribute {missing[0]} is not among its attribute names "
            f"({', '.join(dataset.attribute_names)}); use the original attribute list"
        )


def _held_out(
    net: nn.Sequential, dataset: Dataset
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities, features and labels of the first HELD_OUT_LIMIT held-out images."""
    probs, features, labels = [], [], []
    for images, batch_labels in held_out_batches(dataset, 1000, HELD_OUT_LIMIT):
        batch_probs, batch_features = _predict(net, images, dataset.has_attributes)
        probs.append(batch_probs)
        features.append(batch_features)
        labels.append(batch_labels)
    return torch.cat(probs), torch.cat(features), torch.cat(labels)


def train_evaluator(
    dataset: Dataset, epochs: int | None, device: str | torch.device = "cpu", key: str = ""
) -> Evaluator:
    """Train the classifier deterministically and score it on the held-out split.

    `epochs` are passes over the training images; None picks `default_epochs` (for attributes,
    capped as in `attribute_steps`).
    """
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    attributes = dataset.has_attributes
    if epochs is None and not attributes:
        epochs = default_epochs(len(dataset.train_labels))
    device = torch.device(device)
    channels = dataset.image_shape[0]
    started = time.perf_counter()
    with _private_rng(device, SEED):
        if attributes:
            _check_mode_attributes(dataset)
            steps = attribute_steps(len(dataset.train_labels), epochs)
            net = build_attribute_classifier(channels, len(dataset.attribute_names)).to(device)
            _fit_attributes(net, dataset, steps, device)
        else:
            net = build_classifier(channels, dataset.num_classes).to(device)
            _fit(net, dataset, epochs, device)
    seconds = round(time.perf_counter() - started, 2)
    probs, features, labels = _held_out(net, dataset)
    mode_attributes = MODE_ATTRIBUTES if attributes else ()
    if attributes:
        columns = tuple(dataset.attribute_names.index(name) for name in mode_attributes)
        reference = measurement_from_attribute_probs(probs, columns)
        correct = (probs > 0.5).long() == labels  # per image and attribute
    else:
        reference = measurement_from_probs(probs, dataset.num_classes)
        correct = probs.argmax(dim=1) == labels
    meta = {
        "dataset": dataset.name,
        "fingerprint": dataset.fingerprint,
        "epochs": epochs,
        "seed": SEED,
        "train_seconds": seconds,
        "held_out_images": len(labels),
    }
    if attributes:
        meta.update(steps=steps, batch_size=BATCH_SIZE)
    return Evaluator(
        net,
        image_shape=dataset.image_shape,
        num_classes=dataset.num_classes,
        accuracy=float(correct.double().mean()),
        reference=reference,
        key=key or evaluator_key(dataset, epochs),
        meta=meta,
        attribute_names=dataset.attribute_names,
        mode_attributes=mode_attributes,
        reference_features=feature_statistics(features) if len(features) >= 2 else None,
    )


# --- cache ----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$GVAE_CACHE if set, else ~/.cache/gvae."""
    env = os.environ.get("GVAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gvae"


@contextlib.contextmanager
def _exclusive(lock_path: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Inter-process lock, so parallel trials wait for one training instead of each training."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"evaluator: waiting for another process to finish {lock_path.with_suffix('.pt')}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_save(state: dict, path: Path) -> None:
    """Write to a temp file in the same directory, then rename: readers never see a torn file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _try_load(
    path: Path, key: str, device: str | torch.device, log: Callable[[str], None]
) -> Evaluator | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("key") != key:
            raise ValueError(f"key {state.get('key')!r} != {key!r}")
        return Evaluator.from_state(state, device)
    except Exception as error:  # any unreadable or stale file is simply rebuilt
        log(f"evaluator: ignoring unusable cache file {path} ({error}); retraining")
        return None


def _prepare_cache_dir(cache_dir: Path) -> Path:
    target = cache_dir / "evaluators"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GvaeError(
            f"cannot create evaluator cache {target} ({error.strerror}); "
            f"set GVAE_CACHE to a writable directory"
        ) from error
    return target


def load_or_train_evaluator(
    dataset: Dataset,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    epochs: int | None = None,
) -> Evaluator:
    """The evaluator for `dataset`: from the disk cache if present, else trained and cached."""
    if epochs is None and not dataset.has_attributes:
        epochs = default_epochs(len(dataset.train_labels))
    key = evaluator_key(dataset, epochs)
    folder = _prepare_cache_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    path = folder / f"{dataset.name}-{key}.pt"
    with _exclusive(path.with_suffix(".lock"), log):
        evaluator = _try_load(path, key, device, log)
        if evaluator is not None:
            log(f"evaluator: loaded {path} (held-out accuracy {evaluator.accuracy:.1%})")
            return evaluator
        evaluator = train_evaluator(dataset, epochs, device, key)
        _atomic_save(evaluator.state(), path)
    log(
        f"evaluator: trained on {dataset.name} in {evaluator.meta['train_seconds']:.1f} s, "
        f"held-out accuracy {evaluator.accuracy:.1%}, cached at {path}"
    )
    return evaluator
