"""What an evaluation measures, and the Evaluator: a trained classifier plus the real-data
reference it compares samples with."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gvae.evaluation.classifiers import (
    ARCH_VERSION,
    ATTRIBUTE_ARCH_VERSION,
    build_attribute_classifier,
    build_classifier,
    predict,
)
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

STATE_FORMAT = 2  # 2: attribute evaluators and reference feature statistics


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
        return predict(self.net, self._as_images(images), self.has_attributes, batch_size)

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
