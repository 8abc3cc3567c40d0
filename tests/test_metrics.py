"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gvae.metrics import (
    class_histogram,
    entropy,
    frechet_distance,
    image_entropies,
    mean_image_entropy,
    mode_entropy,
)


def test_mode_entropy_uniform_is_ln10() -> None:
    labels = torch.arange(10).repeat(7)
    assert mode_entropy(labels, 10) == pytest.approx(math.log(10))


def test_mode_entropy_single_class_is_zero() -> None:
    assert mode_entropy(torch.full((50,), 3), 10) == 0.0


def test_mode_entropy_two_equal_classes_is_ln2() -> None:
    labels = torch.tensor([2, 7] * 20)
    assert mode_entropy(labels, 10) == pytest.approx(math.log(2))


def test_mode_entropy_rejects_empty_input() -> None:
    with pytest.raises(ValueError):
        mode_entropy(torch.empty(0, dtype=torch.long), 10)


def test_class_histogram_counts_and_range() -> None:
    hist = class_histogram(torch.tensor([0, 0, 3, 9]), 10)
    assert hist.dtype == torch.int64
    assert hist.tolist() == [2, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError):
        class_histogram(torch.tensor([10]), 10)


def test_entropy_treats_zero_probabilities_as_zero() -> None:
    # H(1/2, 1/4, 1/4, 0) = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    probs = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert float(entropy(probs)) == pytest.approx(1.5 * math.log(2))
    assert float(entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0


def test_entropy_along_dim() -> None:
    probs = torch.tensor([[0.5, 1.0], [0.5, 0.0]])  # columns are distributions
    assert entropy(probs, dim=0).tolist() == pytest.approx([math.log(2), 0.0])


def test_image_entropies_one_hot_and_uniform() -> None:
    k = 10
    one_hot = torch.eye(k)
    uniform = torch.full((3, k), 1 / k)
    assert image_entropies(one_hot).tolist() == [0.0] * k
    assert image_entropies(uniform).tolist() == pytest.approx([math.log(k)] * 3)
    both = torch.cat([one_hot[:3], uniform])
    assert mean_image_entropy(both) == pytest.approx(math.log(k) / 2)


def test_frechet_distance_identical_sets_is_zero() -> None:
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_shifted_set_is_squared_shift() -> None:
    # Same covariance, means differ by (1, 2, 0, 0): distance = 1 + 4 = 5.
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(1))
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0])
    assert frechet_distance(x, x + shift) == pytest.approx(5.0, abs=1e-6)


def test_frechet_distance_scaled_1d() -> None:
    # var_a = 1, var_b = 4, same mean: 1 + 4 - 2 * sqrt(1 * 4) = 1.
    x = torch.randn(1000, 1, generator=torch.Generator().manual_seed(2)).double()
    x = (x - x.mean()) / x.std()
    assert frechet_distance(x, 2 * x) == pytest.approx(1.0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300, 6, generator=gen).double()
    b = (torch.randn(300, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 0.5).double()
    cov_a, cov_b = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    covmean = scipy_linalg.sqrtm(cov_a @ cov_b).real
    expected = float(
        ((a.mean(0) - b.mean(0)) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * covmean.trace()
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_mismatched_features() -> None:
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
