"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gvae.metrics import (
    class_histogram,
    classifier_score,
    density_coverage,
    entropy,
    frechet_distance,
    image_entropies,
    joint_probabilities,
    kl_to_uniform,
    knn_radii,
    mean_image_entropy,
    mode_entropy,
    modes_covered,
    precision_recall,
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


def test_modes_covered_and_kl_to_uniform() -> None:
    # labels 0, 0, 1, 3 of 4 modes: histogram [2, 1, 0, 1], three modes have a sample.
    # p = [1/2, 1/4, 0, 1/4]: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 3/2 ln 2; KL = ln 4 - H = 1/2 ln 2.
    labels = torch.tensor([0, 0, 1, 3])
    assert modes_covered(labels, 4) == 3
    assert kl_to_uniform(labels, 4) == pytest.approx(0.5 * math.log(2))
    assert kl_to_uniform(torch.arange(1000), 1000) == pytest.approx(0.0, abs=1e-12)


def test_classifier_score_by_hand() -> None:
    # Sure and different: H(mean) = ln 2, mean H = 0 -> exp(ln 2) = 2.
    assert classifier_score(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(2.0)
    # Both unsure: H(mean) = mean H = ln 2 -> 1.
    assert classifier_score(torch.full((2, 2), 0.5)) == pytest.approx(1.0)
    # [1, 0] and [.5, .5]: mean [.75, .25], H(mean) = -(.75 ln .75 + .25 ln .25) = 0.562335;
    # mean H = (0 + ln 2) / 2 = 0.346574 -> exp(0.215762) = 1.240806.
    mixed = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert classifier_score(mixed) == pytest.approx(1.240806, abs=1e-6)


def test_classifier_score_of_independent_channels() -> None:
    # Two images of two sure channels: (0, 1) is joint mode 0b01 = 1, (1, 1) is mode 3.
    # mean joint [0, .5, 0, .5]: H = ln 2, mean H = 0 -> 2.
    factors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    assert joint_probabilities(factors).tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    assert classifier_score(factors) == pytest.approx(2.0)
    assert classifier_score(factors, chunk=1) == pytest.approx(2.0)


def test_knn_radii_leave_the_point_itself_out() -> None:
    # 0, 1, 2, 10: nearest other points at 1, 1, 1, 8; second nearest at 2, 1, 2, 9.
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    assert knn_radii(points, 1).tolist() == [1, 1, 1, 8]
    assert knn_radii(points, 2).tolist() == [2, 1, 2, 9]


def test_precision_recall_density_coverage_by_hand() -> None:
    # reals 0, 1, 2, 10 (k = 1 radii 1, 1, 1, 8); fakes 0.5, 1.5, 20 (radii 1, 1, 18.5).
    # fake-to-real distances: 0.5 -> [.5, .5, 1.5, 9.5]; 1.5 -> [1.5, .5, .5, 8.5];
    # 20 -> [20, 19, 18, 10].
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    fake = torch.tensor([[0.5], [1.5], [20.0]])
    precision, recall = precision_recall(real, fake, k=1)
    # precision: 0.5 (in real 0's ball) and 1.5 (in real 1's) but not 20 -> 2/3.
    # recall: reals 0, 1, 2 lie in the balls of fakes 0.5 or 1.5; real 10 lies in fake 20's wide
    # ball (10 <= 18.5), the outlier effect Naeem et al. point out -> 4/4.
    assert precision == pytest.approx(2 / 3)
    assert recall == pytest.approx(1.0)
    density, coverage = density_coverage(real, fake, k=1)
    # density: fake 0.5 is in the balls of reals 0 and 1, fake 1.5 in those of 1 and 2, fake 20 in
    # none -> (2 + 2 + 0) / (1 * 3) = 4/3. coverage: real 10's nearest fake is 8.5 away (> 8),
    # so 3 of 4 reals are covered.
    assert density == pytest.approx(4 / 3)
    assert coverage == pytest.approx(3 / 4)


def test_identical_sets_have_full_precision_recall_and_coverage() -> None:
    points = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(points, points.clone()) == pytest.approx((1.0, 1.0))
    assert density_coverage(points, points.clone())[1] == pytest.approx(1.0)
