"""Sample-quality metrics as pure functions on tensors (natural log; 0 * log 0 = 0).

Mode entropy measures coverage (do generated digits span all classes?), mean image entropy
measures sharpness (is each digit confidently one class?), and the Frechet distance compares
feature statistics of two sample sets.
"""

from __future__ import annotations

import torch


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along `dim`; zero probabilities contribute nothing."""
    # xlogy(0, 0) == 0, whereas p * p.log() would give 0 * -inf = nan.
    return -torch.special.xlogy(probs, probs).sum(dim=dim)


def class_histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of each class in `labels` as int64 [num_classes]."""
    flat = labels.detach().reshape(-1).long().cpu()
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {flat.min()}..{flat.max()}")
    return torch.bincount(flat, minlength=num_classes)


def mode_entropy(labels: torch.Tensor, num_classes: int) -> float:
    """Entropy of the distribution of predicted classes; ln(num_classes) when perfectly even."""
    counts = class_histogram(labels, num_classes).double()
    if counts.sum() == 0:
        raise ValueError("mode_entropy needs at least one label")
    return float(entropy(counts / counts.sum()))


def image_entropies(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of class probabilities [N, K] -> [N]; 0 for a confident one-hot."""
    if probs.dim() != 2:
        raise ValueError(f"expected probabilities of shape [N, K], got {tuple(probs.shape)}")
    return entropy(probs, dim=1)


def mean_image_entropy(probs: torch.Tensor) -> float:
    """Average per-image entropy; low means the classifier is sure what each image shows."""
    return float(image_entropies(probs.double()).mean())


def _mean_and_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.detach().reshape(len(features), -1).double().cpu()
    if len(x) < 2:
        raise ValueError("frechet_distance needs at least two samples per set")
    return x.mean(dim=0), torch.atleast_2d(torch.cov(x.T))


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via eigendecomposition."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    # Round-off can make tiny eigenvalues negative; they are zero in exact arithmetic.
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D].

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2). The trace of (S_a S_b)^1/2 equals that of
    (sqrt(S_a) S_b sqrt(S_a))^1/2, which is symmetric PSD, so eigvalsh is stable where a general
    matrix square root of the non-symmetric S_a S_b is not.
    """
    mu_a, cov_a = _mean_and_cov(features_a)
    mu_b, cov_b = _mean_and_cov(features_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.numel()} vs {mu_b.numel()}")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(distance), 0.0)  # exact value is >= 0; clip round-off below it
