"""Sample-quality metrics as pure functions on tensors (natural log; 0 * log 0 = 0).

Mode entropy measures coverage (do generated digits span all classes?), mean image entropy
measures sharpness (is each digit confidently one class?), and the Frechet distance compares
feature statistics of two sample sets.

Faces have no ten classes but binary attributes. There, the modes are the joint values of a few
attributes (`attribute_mode_entropy`: Male x Smiling x Eyeglasses gives 8 modes, ln 8 when even),
and sharpness is the mean binary entropy of all attribute predictions (`mean_binary_entropy`).
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
    return float(entropy(counts / counts.sum())) + 0.0  # + 0.0 turns -0.0 into 0.0


def image_entropies(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of class probabilities [N, K] -> [N]; 0 for a confident one-hot."""
    if probs.dim() != 2:
        raise ValueError(f"expected probabilities of shape [N, K], got {tuple(probs.shape)}")
    return entropy(probs, dim=1)


def mean_image_entropy(probs: torch.Tensor) -> float:
    """Average per-image entropy; low means the classifier is sure what each image shows."""
    return float(image_entropies(probs.double()).mean())


def joint_modes(bits: torch.Tensor) -> torch.Tensor:
    """Mode index of each row of k binary values [N, k] -> int64 [N] in [0, 2^k).

    The first column is the most significant bit: with (Male, Smiling, Eyeglasses), mode 5 = 0b101
    is a man who does not smile and wears glasses.
    """
    if bits.dim() != 2:
        raise ValueError(f"expected binary values of shape [N, k], got {tuple(bits.shape)}")
    k = bits.shape[1]
    weights = 2 ** torch.arange(k - 1, -1, -1, device=bits.device)
    return (bits.long() * weights).sum(dim=1).cpu()


def attribute_mode_entropy(bits: torch.Tensor) -> float:
    """Entropy of the joint histogram of k binary attributes [N, k]; ln(2^k) when all 2^k
    combinations are equally frequent, 0 when every image has the same combination."""
    return mode_entropy(joint_modes(bits), 2 ** bits.shape[1])


def binary_entropies(probs: torch.Tensor) -> torch.Tensor:
    """Per image, the mean over A attributes of the binary entropy of each predicted probability:
    [N, A] -> [N], in nats, between 0 (every attribute certain) and ln 2 (every one a coin toss).

    H(p) = -p ln p - (1 - p) ln(1 - p) for each attribute, averaged over the A attributes.
    """
    if probs.dim() != 2:
        raise ValueError(f"expected probabilities of shape [N, A], got {tuple(probs.shape)}")
    return entropy(torch.stack([probs, 1 - probs], dim=-1), dim=-1).mean(dim=1)


def mean_binary_entropy(probs: torch.Tensor) -> float:
    """Mean over images of `binary_entropies`: the attribute analogue of mean image entropy."""
    return float(binary_entropies(probs.double()).mean())


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (float64, CPU) of features [N, D]: what the Frechet distance
    compares."""
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
    return frechet_distance_from_statistics(
        *feature_statistics(features_a), *feature_statistics(features_b)
    )


def frechet_distance_from_statistics(
    mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """`frechet_distance` from precomputed `feature_statistics` (e.g. of a fixed reference set)."""
    mu_a, cov_a, mu_b, cov_b = (t.double().cpu() for t in (mu_a, cov_a, mu_b, cov_b))
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.numel()} vs {mu_b.numel()}")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(distance), 0.0)  # exact value is >= 0; clip round-off below it
