"""Training an evaluator's classifier, deterministically, and scoring it on the held-out split."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gvae.data import Dataset, held_out_batches, training_batches
from gvae.errors import GvaeError
from gvae.evaluation.classifiers import (
    ARCH_VERSION,
    ATTRIBUTE_ARCH_VERSION,
    DROPOUT,
    build_attribute_classifier,
    build_classifier,
    predict,
)
from gvae.evaluation.measurement import (
    DENSITY_COVERAGE_K,
    STATE_FORMAT,
    Evaluator,
    RealNeighbours,
    measurement_from_attribute_probs,
    measurement_from_probs,
)
from gvae.metrics import feature_statistics

SEED = 0
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
# The attributes whose joint values are the modes of face images: 2^3 = 8 modes, ln 8 at best.
MODE_ATTRIBUTES = ("Male", "Smiling", "Eyeglasses")
HELD_OUT_LIMIT = 10_000  # held-out images behind the reference row and feature statistics
ATTRIBUTE_MAX_VISITS = 100_000  # training images the attribute classifier sees by default


def default_epochs(num_train: int) -> int:
    """About 32k sample visits, 3 to 8 epochs: 8 for mnist5k's 4000 images, 3 for full MNIST."""
    return min(8, max(3, math.ceil(32_000 / max(num_train, 1))))


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
        "format": STATE_FORMAT,
    }
    if dataset.has_attributes:
        recipe.update(
            arch=ATTRIBUTE_ARCH_VERSION,
            epochs=None,
            steps=attribute_steps(len(dataset.train_labels), epochs),
            modes=list(MODE_ATTRIBUTES),
            held_out=HELD_OUT_LIMIT,
        )
    return _hash(recipe)


def channel_evaluator_key(dataset: Dataset, digits_key: str) -> str:
    """Cache key of a channel evaluator: its digit classifier's key and the stacked images."""
    return _hash({"data": dataset.fingerprint, "digits": digits_key, "format": STATE_FORMAT})


def _hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _isolated_rng(device: torch.device, seed: int) -> Iterator[None]:
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
    """Probabilities, features and labels of the held-out images: all of those held in memory,
    the first HELD_OUT_LIMIT of those streamed from disk."""
    probs, features, labels = [], [], []
    limit = HELD_OUT_LIMIT if dataset.files is not None else None
    per_channel = dataset.channel_dataset is not None
    for images, batch_labels in held_out_batches(dataset, 1000, limit):
        batch_probs, batch_features = predict(
            net, images, dataset.has_attributes, per_channel=per_channel
        )
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
    with _isolated_rng(device, SEED):
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
        correct = reference.labels == labels
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
        **_real_features(features),
    )


def _real_features(features: torch.Tensor) -> dict:
    """The held-out features' statistics (Frechet distance) and nearest neighbours (precision,
    recall, density, coverage), as Evaluator arguments; none from too few images."""
    if len(features) <= DENSITY_COVERAGE_K + 1:
        return {"reference_features": None, "neighbours": None}
    return {
        "reference_features": feature_statistics(features),
        "neighbours": RealNeighbours.from_features(features),
    }


def channel_evaluator(dataset: Dataset, digits: Evaluator, key: str = "") -> Evaluator:
    """The evaluator of a stacked dataset: `digits` (trained on its `channel_dataset`) labels each
    channel, and the reference row and features come from the stacked held-out images.

    Its accuracy is the share of held-out images whose every channel is labelled right.
    """
    net = copy.deepcopy(digits.net).cpu()
    probs, features, labels = _held_out(net, dataset)
    reference = measurement_from_probs(probs, dataset.num_classes)
    meta = {
        "dataset": dataset.name,
        "fingerprint": dataset.fingerprint,
        "digits": digits.key,
        "digit_accuracy": digits.accuracy,
        "held_out_images": len(labels),
    }
    return Evaluator(
        net,
        image_shape=dataset.image_shape,
        num_classes=dataset.num_classes,
        accuracy=float((reference.labels == labels).double().mean()),
        reference=reference,
        key=key or channel_evaluator_key(dataset, digits.key),
        meta=meta,
        channel_classes=digits.num_classes,
        **_real_features(features),
    )
