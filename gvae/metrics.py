"""Sample-quality metrics as pure functions on tensors (natural log; 0 * log 0 = 0).

Mode entropy measures coverage (do generated digits span all classes?), mean image entropy
measures sharpness (is each digit confidently one class?), and the Frechet distance compares
feature statistics of two sample sets.

Faces have no ten classes but binary attributes. There, the modes are the joint values of a few
attributes (`joint_modes`: Male x Smiling x Eyeglasses gives 8 modes, ln 8 when even), and
sharpness is the mean binary entropy of all attribute predictions (`binary_entropies`).
"""

from __future__ import annotations

import math

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


def binary_entropies(probs: torch.Tensor) -> torch.Tensor:
    """Per image, the mean over A attributes of the binary entropy of each predicted probability:
    [N, A] -> [N], in nats, between 0 (every attribute certain) and ln 2 (every one a coin toss).

    H(p) = -p ln p - (1 - p) ln(1 - p) for each attribute, averaged over the A attributes.
    """
    if probs.dim() != 2:
        raise ValueError(f"expected probabilities of shape [N, A], got {tuple(probs.shape)}")
    return entropy(torch.stack([probs, 1 - probs], dim=-1), dim=-1).mean(dim=1)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (float64, CPU) of features [N, D]: what the Frechet distance
    compares."""
    x = features.detach().reshape(len(features), -1).double().cpu()
    if len(x) < 2:
        raise ValueError("the Frechet distance needs at least two samples per set")
    return x.mean(dim=0), torch.atleast_2d(torch.cov(x.T))


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via eigendecomposition."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    # Round-off can make tiny eigenvalues negative; they are zero in exact arithmetic.
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_from_statistics(
    mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """Frechet distance between Gaussians with the given `feature_statistics`.

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2). The trace of (S_a S_b)^1/2 equals that of
    (sqrt(S_a) S_b sqrt(S_a))^1/2, which is symmetric PSD, so eigvalsh is stable where a general
    matrix square root of the non-symmetric S_a S_b is not.
    """
    mu_a, cov_a, mu_b, cov_b = (t.double().cpu() for t in (mu_a, cov_a, mu_b, cov_b))
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.numel()} vs {mu_b.numel()}")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(distance), 0.0)  # exact value is >= 0; clip round-off below it


# --- mode counts ----------------------------------------------------------------------------


def modes_covered(labels: torch.Tensor, num_modes: int) -> int:
    """How many of the `num_modes` modes have at least one sample."""
    return int((class_histogram(labels, num_modes) > 0).sum())


def kl_to_uniform(labels: torch.Tensor, num_modes: int) -> float:
    """KL(mode histogram || uniform over `num_modes`) = ln K − mode entropy; 0 when even."""
    return max(math.log(num_modes) - mode_entropy(labels, num_modes), 0.0)


def joint_probabilities(factors: torch.Tensor) -> torch.Tensor:
    """Distributions over K^C joint modes [N, K^C] from C independent factors [N, C, K].

    The first factor is the most significant digit: with digit classes per channel, mode 123 is
    (1, 2, 3). A [N, K] input is returned as it is.
    """
    if factors.dim() == 2:
        return factors
    joint = factors[:, 0]
    for channel in range(1, factors.shape[1]):
        joint = (joint.unsqueeze(2) * factors[:, channel].unsqueeze(1)).flatten(1)
    return joint


def classifier_score(probs: torch.Tensor, chunk: int = 4096) -> float:
    """exp(H(mean p) − mean H(p)): the Inception Score computed with our classifier.

    `probs` is [N, K] class probabilities, or [N, C, K] when C independent factors (the channels
    of a Stacked MNIST image) make a joint distribution over K^C modes; the joint is formed in
    chunks of `chunk` images, and its entropy is the sum of the factors' entropies. Between 1 (all
    images alike, or each one a coin toss) and K^C (every image sure, modes evenly used).
    """
    if probs.dim() not in (2, 3) or len(probs) == 0:
        raise ValueError(f"expected probabilities [N, K] or [N, C, K], got {tuple(probs.shape)}")
    probs = probs.double()
    mean_joint = sum(joint_probabilities(part).sum(dim=0) for part in probs.split(chunk))
    mean_joint = mean_joint / len(probs)
    mean_entropy = entropy(probs, dim=-1).reshape(len(probs), -1).sum(dim=1).mean()
    return float(torch.exp(entropy(mean_joint) - mean_entropy))


# --- fidelity and diversity from k nearest neighbours in feature space ----------------------
# Written here rather than taken from torch-fidelity (precision and recall only) or prdc (all
# four, but one k for all, numpy distance matrices recomputed on every call, and a print): the
# evaluator computes the real images' radii once, and one fake-to-real distance matrix serves
# all four numbers (`gvae.evaluation.measurement.RealNeighbours`). tests/test_metrics.py sets them
# against prdc; docs/metrics.md lists where the conventions differ.


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distances [N, M] (float32) between rows of a [N, D] and b [M, D]."""
    a, b = a.float(), b.float()
    return (
        torch.cat([torch.cdist(part, b) for part in a.split(chunk)])
        if len(a)
        else a.new_empty(0, len(b))
    )


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of [N, D] to its k-th nearest other row: the radius of its
    k-nearest-neighbour ball (the row itself, at distance 0, is not counted)."""
    if not 1 <= k < len(features):
        raise ValueError(
            f"k must lie in [1, {len(features) - 1}] for {len(features)} rows, got {k}"
        )
    distances = pairwise_distances(features, features)
    # topk of k + 1 (sorted, smallest first) is ~10x faster than kthvalue on the CPU.
    return distances.topk(k + 1, dim=1, largest=False).values[:, -1]


def precision_recall_from_distances(
    fake_to_real: torch.Tensor, real_radii: torch.Tensor, fake_radii: torch.Tensor
) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019): precision is the share of fakes inside some real image's
    k-NN ball; recall the share of reals inside some fake image's k-NN ball.

    fake_to_real [M, N] distances, real_radii [N], fake_radii [M]; a point on a ball's surface is
    inside (<=, as in the paper's definition; prdc's reference code counts it outside, <).
    """
    precision = (fake_to_real <= real_radii.unsqueeze(0)).any(dim=1).double().mean()
    recall = (fake_to_real <= fake_radii.unsqueeze(1)).any(dim=0).double().mean()
    return float(precision), float(recall)


def density_coverage_from_distances(
    fake_to_real: torch.Tensor, real_radii: torch.Tensor, k: int
) -> tuple[float, float]:
    """Naeem et al. (2020): density counts, per fake, the real k-NN balls it falls in, divided by
    k and averaged (1 when fakes are distributed like reals, above 1 where they crowd dense
    regions); coverage is the share of reals whose ball holds at least one fake. A fake on a
    ball's surface is inside it (<=, as for precision; prdc's reference code uses <)."""
    inside = fake_to_real <= real_radii.unsqueeze(0)
    density = inside.double().sum(dim=1).mean() / k
    coverage = inside.any(dim=0).double().mean()
    return float(density), float(coverage)
