"""What an evaluation measures, and the Evaluator: a trained classifier plus the real-data
reference it compares samples with."""

from __future__ import annotations

import dataclasses
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
    classifier_score,
    density_coverage_from_distances,
    entropy,
    feature_statistics,
    frechet_distance_from_statistics,
    image_entropies,
    joint_modes,
    kl_to_uniform,
    knn_radii,
    mode_entropy,
    modes_covered,
    pairwise_distances,
    precision_recall_from_distances,
)
from gvae.names import METRIC_NAMES

STATE_FORMAT = 3  # 3: per-channel (Stacked MNIST) evaluators, real images' k-NN radii
PRECISION_RECALL_K = 3  # Kynkäänniemi et al. (2019)
DENSITY_COVERAGE_K = 5  # Naeem et al. (2020)
# Real and generated images behind the k-NN metrics, at most: the first this many held-out images
# and generated samples (the evaluation noise is random, so these are a random subset). Keeps one
# evaluation near a second on a small CPU; the k-NN radii, and so the values, depend on this count.
NEIGHBOUR_SAMPLES = 5000


@dataclass
class Measurement:
    """Classifier-based statistics of one set of images."""

    mode_entropy: float
    mean_image_entropy: float  # for attributes: the mean binary entropy (metrics.binary_entropies)
    class_histogram: list[int]  # counts per mode: classes, digit triples or attribute values
    image_entropies: torch.Tensor  # [N] float32 CPU
    labels: torch.Tensor  # [N] int64 predicted modes, CPU
    modes_covered: int = 0  # modes with at least one image
    kl_to_uniform: float = 0.0  # ln(modes) - mode_entropy
    classifier_score: float = 1.0  # exp(H(mean p) - mean H(p)) over the modes
    frechet_distance: float | None = None  # to the evaluator's held-out real images
    precision: float | None = None  # these four against NEIGHBOUR_SAMPLES held-out images
    recall: float | None = None
    density: float | None = None
    coverage: float | None = None

    def scalars(self) -> dict[str, float]:
        """The named numbers (not histograms or per-image arrays) that were measured."""
        values = {name: getattr(self, name) for name in METRIC_NAMES}
        return {name: value for name, value in values.items() if value is not None}

    def as_state(self) -> dict:
        """Plain-dict form for `torch.save` / `weights_only` loading."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> Measurement:
        """Inverse of :meth:`as_state`."""
        return cls(**state)


def _measurement(
    labels: torch.Tensor, modes: int, entropies: torch.Tensor, mode_probs: torch.Tensor
) -> Measurement:
    """`labels` [N] in [0, modes), per-image entropies [N] (float64) and mode probabilities
    ([N, modes], or [N, C, K] independent factors of K^C = modes joint ones)."""
    return Measurement(
        mode_entropy=mode_entropy(labels, modes),
        mean_image_entropy=float(entropies.mean()),
        class_histogram=class_histogram(labels, modes).tolist(),
        image_entropies=entropies.float().cpu(),
        labels=labels,
        modes_covered=modes_covered(labels, modes),
        kl_to_uniform=kl_to_uniform(labels, modes),
        classifier_score=classifier_score(mode_probs),
    )


def measurement_from_probs(probs: torch.Tensor, num_classes: int | None = None) -> Measurement:
    """Mode statistics from class probabilities [N, K], or from per-channel ones [N, C, K] whose
    modes are the K^C joint labels (Stacked MNIST: 100a + 10b + c). An image's entropy is that
    of its joint distribution: for independent channels, the sum of the channels' entropies."""
    probs = probs.cpu()
    classes = probs.shape[-1]
    if probs.dim() == 2:
        labels, entropies = probs.argmax(dim=1), image_entropies(probs.double())
    else:
        place = classes ** torch.arange(probs.shape[1] - 1, -1, -1)
        labels = (probs.argmax(dim=2) * place).sum(dim=1)
        entropies = entropy(probs.double(), dim=2).sum(dim=1)
    modes = num_classes or classes ** (probs.shape[1] if probs.dim() == 3 else 1)
    return _measurement(labels, modes, entropies, probs)


def measurement_from_attribute_probs(
    probs: torch.Tensor, mode_columns: tuple[int, ...]
) -> Measurement:
    """Attribute-mode entropy, mean binary entropy and mode histogram from attribute
    probabilities [N, A]; an image's mode is the joint value of the `mode_columns` attributes,
    each present when its probability exceeds 0.5."""
    chosen = probs[:, list(mode_columns)].cpu()
    labels = joint_modes(chosen > 0.5)
    factors = torch.stack([1 - chosen, chosen], dim=2)  # [N, k, 2]: index 1 = present, as bits
    return _measurement(labels, 2 ** len(mode_columns), binary_entropies(probs.double()), factors)


@dataclass
class RealNeighbours:
    """Held-out images' features [N, D] and their k-NN radii, for precision/recall (k = 3) and
    density/coverage (k = 5): computed once with the evaluator, not at every evaluation."""

    features: torch.Tensor
    precision_radii: torch.Tensor
    density_radii: torch.Tensor

    @classmethod
    def from_features(cls, features: torch.Tensor) -> RealNeighbours:
        features = features[:NEIGHBOUR_SAMPLES].float().contiguous()
        return cls(
            features,
            knn_radii(features, PRECISION_RECALL_K),
            knn_radii(features, DENSITY_COVERAGE_K),
        )

    def score(self, fake: torch.Tensor) -> dict[str, float]:
        """Precision, recall, density and coverage of generated images' features [M, D]."""
        fake = fake[:NEIGHBOUR_SAMPLES].float()
        distances = pairwise_distances(fake, self.features)
        precision, recall = precision_recall_from_distances(
            distances, self.precision_radii, knn_radii(fake, PRECISION_RECALL_K)
        )
        density, coverage = density_coverage_from_distances(
            distances, self.density_radii, DENSITY_COVERAGE_K
        )
        return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}

    def as_state(self) -> dict:
        return dataclasses.asdict(self)


class Evaluator:
    """A trained classifier plus its held-out accuracy and the real-data reference row.

    A digit evaluator has `num_classes` outputs (softmax); an attribute evaluator one output per
    name in `attribute_names` (sigmoid, `num_classes` 0), its modes being the joint values of
    `mode_attributes`. A channel evaluator (Stacked MNIST) labels each of the image's channels with
    a digit classifier of `channel_classes` outputs; its `num_classes` modes are the joint labels.
    `reference_features` are the mean and covariance of the held-out images' penultimate features,
    against which `measure` computes the Frechet distance; `neighbours` hold the held-out features
    behind precision, recall, density and coverage.
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
        channel_classes: int = 0,
        neighbours: RealNeighbours | None = None,
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
        self.channel_classes = channel_classes
        self.neighbours = neighbours

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
        """Probabilities [N, outputs] ([N, C, channel_classes] for a channel evaluator) and
        penultimate features [N, D] (the C channels' features side by side), on the CPU."""
        images = self._as_images(images)
        return predict(
            self.net, images, self.has_attributes, batch_size, bool(self.channel_classes)
        )

    def measure(self, images: torch.Tensor) -> Measurement:
        """Mode statistics, histogram and per-image values; with the reference features, the
        Frechet distance and (from DENSITY_COVERAGE_K + 2 images on) precision, recall, density
        and coverage."""
        probs, features = self.predict(images)
        measurement = self.measure_probs(probs)
        if self.reference_features is not None and len(features) >= 2:
            measurement.frechet_distance = frechet_distance_from_statistics(
                *feature_statistics(features), *self.reference_features
            )
        if self.neighbours is not None and len(features) > DENSITY_COVERAGE_K + 1:
            for name, value in self.neighbours.score(features).items():
                setattr(measurement, name, value)
        return measurement

    def real_columns(self) -> dict[str, float]:
        """The reference row's mode counts and classifier score, as trials-table columns."""
        reference = self.reference
        return {
            "real_modes_covered": reference.modes_covered,
            "real_kl_to_uniform": reference.kl_to_uniform,
            "real_classifier_score": reference.classifier_score,
        }

    def measure_probs(self, probs: torch.Tensor) -> Measurement:
        """The mode statistics of `predict`'s probabilities (no feature-space metrics)."""
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
            "channel_classes": self.channel_classes,
            "neighbours": self.neighbours.as_state() if self.neighbours is not None else None,
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
        channel_classes = int(state.get("channel_classes") or 0)
        if attribute_names:
            net = build_attribute_classifier(image_shape[0], len(attribute_names))
        elif channel_classes:
            net = build_classifier(1, channel_classes)
        else:
            net = build_classifier(image_shape[0], int(state["num_classes"]))
        net.load_state_dict(state["weights"])
        features = state.get("reference_features")
        neighbours = state.get("neighbours")
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
            channel_classes=channel_classes,
            neighbours=RealNeighbours(**neighbours) if neighbours is not None else None,
        )

    def to(self, device: str | torch.device) -> Evaluator:
        """Move the network to `device` (in place) and return self."""
        self.net.to(device)
        return self
