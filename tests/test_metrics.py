"""Metrics against values worked out by hand, and against the reference libraries: prdc for
the k-NN metrics, torchmetrics for the Frechet distance and the Inception Score."""

from __future__ import annotations

import contextlib
import io
import math

import prdc
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from gvae.evaluation.measurement import DENSITY_COVERAGE_K, PRECISION_RECALL_K, RealNeighbours
from gvae.metrics import (
    class_histogram,
    classifier_score,
    density_coverage_from_distances,
    entropy,
    feature_statistics,
    frechet_distance_from_statistics,
    image_entropies,
    joint_probabilities,
    kl_to_uniform,
    knn_radii,
    mean_image_entropy,
    mode_entropy,
    modes_covered,
    pairwise_distances,
    precision_recall_from_distances,
)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance of two feature sets, as the evaluator computes it."""
    return frechet_distance_from_statistics(*feature_statistics(a), *feature_statistics(b))


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


def k_nn_metrics(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """Precision, recall, density and coverage with one k, from the functions the evaluator's
    `RealNeighbours.score` composes."""
    distances = pairwise_distances(fake, real)
    precision, recall = precision_recall_from_distances(
        distances, knn_radii(real, k), knn_radii(fake, k)
    )
    density, coverage = density_coverage_from_distances(distances, knn_radii(real, k), k)
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_precision_recall_density_coverage_by_hand() -> None:
    # reals 0, 1, 2, 10 (k = 1 radii 1, 1, 1, 8); fakes 0.5, 1.5, 20 (radii 1, 1, 18.5).
    # fake-to-real distances: 0.5 -> [.5, .5, 1.5, 9.5]; 1.5 -> [1.5, .5, .5, 8.5];
    # 20 -> [20, 19, 18, 10].
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    fake = torch.tensor([[0.5], [1.5], [20.0]])
    measured = k_nn_metrics(real, fake, k=1)
    # precision: 0.5 (in real 0's ball) and 1.5 (in real 1's) but not 20 -> 2/3.
    # recall: reals 0, 1, 2 lie in the balls of fakes 0.5 or 1.5; real 10 lies in fake 20's wide
    # ball (10 <= 18.5), the outlier effect Naeem et al. point out -> 4/4.
    assert measured["precision"] == pytest.approx(2 / 3)
    assert measured["recall"] == pytest.approx(1.0)
    # density: fake 0.5 is in the balls of reals 0 and 1, fake 1.5 in those of 1 and 2, fake 20 in
    # none -> (2 + 2 + 0) / (1 * 3) = 4/3. coverage: real 10's nearest fake is 8.5 away (> 8),
    # so 3 of 4 reals are covered.
    assert measured["density"] == pytest.approx(4 / 3)
    assert measured["coverage"] == pytest.approx(3 / 4)


def test_identical_sets_have_full_precision_recall_and_coverage() -> None:
    points = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    scores = RealNeighbours.from_features(points).score(points.clone())
    assert (scores["precision"], scores["recall"]) == pytest.approx((1.0, 1.0))
    assert scores["coverage"] == pytest.approx(1.0)


# --- against the reference libraries ----------------------------------------------------------


def compute_prdc(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """prdc's `compute_prdc` (clovaai's reference code), without the line it prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        values = prdc.compute_prdc(real.double().numpy(), fake.double().numpy(), nearest_k=k)
    return {name: float(value) for name, value in values.items()}


GAUSSIANS = {
    # name: (real, fake) in 16 dimensions, 500 reals against 400 fakes, fixed seeds.
    "same distribution": (0, lambda x: x),
    "shifted by 0.5": (1, lambda x: x + 0.5),
    "half the spread": (2, lambda x: 0.5 * x),  # precision 1, recall and coverage low
    "twice the spread": (3, lambda x: 2.0 * x),  # recall 1, precision low
}


@pytest.mark.parametrize("name", GAUSSIANS)
def test_k_nn_metrics_match_prdc(name: str) -> None:
    seed, transform = GAUSSIANS[name]
    generator = torch.Generator().manual_seed(seed)
    real = torch.randn(500, 16, generator=generator)
    fake = transform(torch.randn(400, 16, generator=generator))
    ours = RealNeighbours.from_features(real).score(fake)  # what every evaluation computes
    # The evaluator takes precision and recall at k = 3, density and coverage at k = 5; prdc has
    # one k, so it runs once for each.
    by_k = {k: compute_prdc(real, fake, k) for k in (PRECISION_RECALL_K, DENSITY_COVERAGE_K)}
    expected = {
        "precision": by_k[PRECISION_RECALL_K]["precision"],
        "recall": by_k[PRECISION_RECALL_K]["recall"],
        "density": by_k[DENSITY_COVERAGE_K]["density"],
        "coverage": by_k[DENSITY_COVERAGE_K]["coverage"],
    }
    # Continuous features put no point on a ball's surface, where the two differ (< against <=):
    # every count is the same, and the shares are equal; density's sum and division are ordered
    # differently, so it agrees to round-off.
    for metric in ("precision", "recall", "coverage"):
        assert ours[metric] == expected[metric], metric
    assert ours["density"] == pytest.approx(expected["density"], rel=1e-12, abs=1e-12)
    assert min(ours["precision"], ours["recall"]) > 0  # a set-up that tests something


def test_a_point_on_a_ball_surface_is_inside_here_and_outside_in_prdc() -> None:
    # reals 0, 1, 2, 10 (k = 1 radii 1, 1, 1, 8); fakes 0.5, 1.5, 18 (radii 1, 1, 16.5).
    # Fake 18 is exactly 8 from real 10: on the surface of real 10's ball.
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    fake = torch.tensor([[0.5], [1.5], [18.0]])
    ours, theirs = k_nn_metrics(real, fake, k=1), compute_prdc(real, fake, k=1)
    # precision: fakes 0.5 and 1.5 are inside; 18 too with <= (Kynkäänniemi et al.'s definition),
    # not with prdc's < -> 3/3 against 2/3.
    assert (ours["precision"], theirs["precision"]) == pytest.approx((1.0, 2 / 3))
    # density: fakes 0.5 and 1.5 fall in two balls each, 18 in real 10's with <= only ->
    # (2 + 2 + 1) / 3 = 5/3 against 4/3. coverage: real 10's ball holds fake 18 with <= only.
    assert (ours["density"], theirs["density"]) == pytest.approx((5 / 3, 4 / 3))
    assert (ours["coverage"], theirs["coverage"]) == pytest.approx((1.0, 3 / 4))
    # recall: real 10 is 8 from fake 18, well inside its 16.5 ball: both count every real.
    assert ours["recall"] == theirs["recall"] == 1.0


class Identity(nn.Module):
    """Features are the input itself: torchmetrics' metrics then see exactly our features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # torchmetrics reads it instead of probing the module

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def torchmetrics_frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=Identity(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


FEATURE_SETS = {
    # name: (seed, real, fake) from standard normal features [600, 8] and [500, 8]
    "shifted": (4, lambda x, g: x, lambda x, g: x + 0.3),
    "correlated": (5, lambda x, g: x, lambda x, g: x @ torch.randn(8, 8, generator=g) + 0.5),
    "far from the origin": (6, lambda x, g: x + 100.0, lambda x, g: 1.5 * x + 100.0),
}


@pytest.mark.parametrize("name", FEATURE_SETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frechet_distance_matches_torchmetrics(name: str, dtype: torch.dtype) -> None:
    seed, make_real, make_fake = FEATURE_SETS[name]
    generator = torch.Generator().manual_seed(seed)
    real = make_real(torch.randn(600, 8, generator=generator), generator).to(dtype)
    fake = make_fake(torch.randn(500, 8, generator=generator), generator).to(dtype)
    ours, theirs = frechet_distance(real, fake), torchmetrics_frechet(real, fake)
    assert ours > 0.1
    # Both compute in float64. torchmetrics returns the features' dtype, so float32 features
    # give a float32 distance (7 significant digits); and it takes the covariance in one pass
    # (sum of outer products minus N mean mean^T), which loses digits far from the origin.
    assert ours == pytest.approx(theirs, rel=1e-9 if dtype == torch.float64 else 1e-6)


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save all extracted features")
# One split has no spread to report: torch.std warns of zero degrees of freedom.
@pytest.mark.filterwarnings("ignore:std\\(\\).*degrees of freedom:UserWarning")
def test_classifier_score_is_torchmetrics_inception_score_in_one_split() -> None:
    logits = 3 * torch.randn(1000, 10, generator=torch.Generator().manual_seed(7)).double()
    probs = logits.softmax(dim=1)
    ours = classifier_score(probs)

    # The module's output is taken as logits: log p gives back p under softmax.
    one_split = InceptionScore(feature=Identity(10), splits=1)
    one_split.update(probs.log())
    assert float(one_split.compute()[0]) == pytest.approx(ours, rel=1e-12)

    # torchmetrics' default (and the original Inception Score's) averages the score of 10 random
    # splits: the mean of exp(KL) over 100 images each, lower than over all 1,000 at once.
    ten_splits = InceptionScore(feature=Identity(10), splits=10)
    ten_splits.update(probs.log())
    torch.manual_seed(0)  # it shuffles the images with torch's global generator
    mean_of_splits = float(ten_splits.compute()[0])
    assert mean_of_splits < ours
    assert mean_of_splits == pytest.approx(ours, rel=0.05)
