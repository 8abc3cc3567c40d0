"""A small CNN that labels generated images, so mode coverage and sharpness can be measured.

The classifier is trained once per dataset and cached on disk, keyed by everything that
determines its weights; every study, trial and process then scores samples with the very
same network, which keeps metrics comparable across runs.
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

from gvae.data import Dataset
from gvae.errors import GvaeError
from gvae.metrics import class_histogram, image_entropies, mean_image_entropy, mode_entropy

try:  # POSIX only; elsewhere concurrent processes may just train the same network twice
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# Bump ARCH_VERSION whenever the network or its training changes: it invalidates old caches.
ARCH_VERSION = 1
STATE_FORMAT = 1
SEED = 0
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
DROPOUT = 0.25
FEATURE_GRID = 7  # spatial size the conv stack is pooled to before the fc layers


@dataclass
class Measurement:
    """Classifier-based statistics of one set of images."""

    mode_entropy: float
    mean_image_entropy: float
    class_histogram: list[int]
    image_entropies: torch.Tensor  # [N] float32 CPU
    labels: torch.Tensor  # [N] int64 predicted classes, CPU

    def as_state(self) -> dict:
        """Plain-dict form for `torch.save` / `weights_only` loading."""
        return {
            "mode_entropy": self.mode_entropy,
            "mean_image_entropy": self.mean_image_entropy,
            "class_histogram": list(self.class_histogram),
            "image_entropies": self.image_entropies,
            "labels": self.labels,
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


def build_classifier(in_channels: int, num_classes: int) -> nn.Sequential:
    """LeNet-style CNN: two 5x5 conv+pool stages, then fc 128 and fc num_classes.

    Adaptive pooling fixes the fc input size, so images other than 28x28 still work.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        PoolTo(FEATURE_GRID),
        nn.Flatten(),
        nn.Dropout(DROPOUT),
        nn.Linear(32 * FEATURE_GRID * FEATURE_GRID, 128),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(128, num_classes),
    )


def default_epochs(num_train: int) -> int:
    """About 32k sample visits, 3 to 8 epochs: 8 for mnist5k's 4000 images, 3 for full MNIST."""
    return min(8, max(3, math.ceil(32_000 / max(num_train, 1))))


class Evaluator:
    """A trained classifier plus its held-out accuracy and the real-data reference row."""

    def __init__(
        self,
        net: nn.Module,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        accuracy: float,
        reference: Measurement,
        key: str,
        meta: dict | None = None,
    ) -> None:
        self.net = net.eval()
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.accuracy = accuracy
        self.reference = reference
        self.key = key
        self.meta = dict(meta or {})  # provenance: dataset, epochs, seed, training time

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

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

    def predict_probs(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Class probabilities [N, num_classes] on the CPU for images in [0, 1] on any device."""
        return _predict_probs(self.net, self._as_images(images), self.num_classes, batch_size)

    def measure(self, images: torch.Tensor) -> Measurement:
        """Mode entropy, mean image entropy, histogram and per-image values for `images`."""
        return measurement_from_probs(self.predict_probs(images), self.num_classes)

    def state(self) -> dict:
        """Everything needed to rebuild this evaluator; loadable with `weights_only=True`."""
        return {
            "format": STATE_FORMAT,
            "arch_version": ARCH_VERSION,
            "key": self.key,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "accuracy": self.accuracy,
            "weights": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "reference": self.reference.as_state(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_state(cls, state: dict, device: str | torch.device = "cpu") -> Evaluator:
        """Rebuild an evaluator saved with :meth:`state`."""
        found = (state.get("format"), state.get("arch_version"))
        if found != (STATE_FORMAT, ARCH_VERSION):
            raise ValueError(f"evaluator state (format, arch) {found} is not supported")
        image_shape = tuple(int(s) for s in state["image_shape"])
        net = build_classifier(image_shape[0], int(state["num_classes"]))
        net.load_state_dict(state["weights"])
        return cls(
            net.to(device),
            image_shape=image_shape,
            num_classes=int(state["num_classes"]),
            accuracy=float(state["accuracy"]),
            reference=Measurement.from_state(state["reference"]),
            key=str(state["key"]),
            meta=state.get("meta"),
        )

    def to(self, device: str | torch.device) -> Evaluator:
        """Move the network to `device` (in place) and return self."""
        self.net.to(device)
        return self


def _predict_probs(
    net: nn.Module, images: torch.Tensor, num_classes: int, batch_size: int = 1000
) -> torch.Tensor:
    device = next(net.parameters()).device
    net.eval()
    chunks = []
    with torch.no_grad():  # not inference_mode: callers may still use the probs under autograd
        for batch in images.split(batch_size):
            chunks.append(net(batch.to(device, torch.float32)).softmax(dim=1).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, num_classes)


# --- training -------------------------------------------------------------------------------


def evaluator_key(dataset: Dataset, epochs: int) -> str:
    """Cache key: a hash of everything that determines the trained weights."""
    recipe = {
        "data": dataset.fingerprint,
        "arch": ARCH_VERSION,
        "epochs": epochs,
        "seed": SEED,
        "batch": BATCH_SIZE,
        "lr": LEARNING_RATE,
        "dropout": DROPOUT,
    }
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


def train_evaluator(
    dataset: Dataset, epochs: int, device: str | torch.device = "cpu", key: str = ""
) -> Evaluator:
    """Train the classifier deterministically and score it on the held-out split."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    started = time.perf_counter()
    with _private_rng(device, SEED):
        net = build_classifier(dataset.image_shape[0], dataset.num_classes).to(device)
        _fit(net, dataset, epochs, device)
    seconds = round(time.perf_counter() - started, 2)
    probs = _predict_probs(net, dataset.test_images, dataset.num_classes)
    return Evaluator(
        net,
        image_shape=dataset.image_shape,
        num_classes=dataset.num_classes,
        accuracy=float((probs.argmax(dim=1) == dataset.test_labels).double().mean()),
        reference=measurement_from_probs(probs, dataset.num_classes),
        key=key or evaluator_key(dataset, epochs),
        meta={
            "dataset": dataset.name,
            "fingerprint": dataset.fingerprint,
            "epochs": epochs,
            "seed": SEED,
            "train_seconds": seconds,
        },
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
    epochs = default_epochs(len(dataset.train_images)) if epochs is None else epochs
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
