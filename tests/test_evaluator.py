"""The evaluator classifier: accuracy, disk cache, determinism and RNG isolation."""

from __future__ import annotations

import dataclasses
import io
import math
import time
from pathlib import Path

import pytest
import torch

from gvae.data import Dataset, fingerprint, load_dataset
from gvae.evaluation import Evaluator, default_cache_dir, load_or_train_evaluator
from gvae.names import METRIC_NAMES


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of this module's own: other tests may have cached the mnist5k evaluator already."""
    return tmp_path_factory.mktemp("evaluator-cache")


@pytest.fixture(scope="module")
def trained(mnist5k: Dataset, own_cache: Path) -> tuple[Evaluator, float, list[str]]:
    """The mnist5k evaluator, trained fresh into an empty cache, with time and log lines."""
    lines: list[str] = []
    started = time.perf_counter()
    evaluator = load_or_train_evaluator(mnist5k, cache_dir=own_cache, log=lines.append)
    return evaluator, time.perf_counter() - started, lines


@pytest.fixture(scope="module")
def tiny(mnist5k: Dataset) -> Dataset:
    """A 400-image slice: one epoch on it takes a fraction of a second."""
    parts = (mnist5k.train_images[:400], mnist5k.train_labels[:400])
    parts += (mnist5k.test_images[:200], mnist5k.test_labels[:200])
    return dataclasses.replace(
        mnist5k,
        name="tiny",
        train_images=parts[0],
        train_labels=parts[1],
        test_images=parts[2],
        test_labels=parts[3],
        fingerprint=fingerprint(*parts),
    )


def test_default_cache_dir_follows_env(gvae_cache: Path) -> None:
    assert default_cache_dir() == gvae_cache


def test_held_out_accuracy_on_mnist5k(trained: tuple[Evaluator, float, list[str]]) -> None:
    evaluator, seconds, lines = trained
    print(f"mnist5k evaluator: held-out accuracy {evaluator.accuracy:.2%} ({seconds:.1f} s)")
    assert evaluator.accuracy >= 0.95
    assert len(lines) == 1 and lines[0].startswith("evaluator: trained on mnist5k in ")
    assert f"held-out accuracy {evaluator.accuracy:.1%}, cached at " in lines[0]


def test_second_call_loads_from_cache(
    trained: tuple[Evaluator, float, list[str]], mnist5k: Dataset, own_cache: Path
) -> None:
    evaluator, train_seconds, _ = trained
    lines: list[str] = []
    started = time.perf_counter()
    again = load_or_train_evaluator(mnist5k, cache_dir=own_cache, log=lines.append)
    assert time.perf_counter() - started < train_seconds
    assert again.key == evaluator.key and again.accuracy == evaluator.accuracy
    assert lines == [
        f"evaluator: loaded {own_cache / 'evaluators' / f'mnist5k-{evaluator.key}.pt'} "
        f"(held-out accuracy {evaluator.accuracy:.1%})"
    ]
    images = mnist5k.test_images[:300]
    assert torch.equal(again.predict(images)[0], evaluator.predict(images)[0])


def test_predictions_are_deterministic(
    trained: tuple[Evaluator, float, list[str]], mnist5k: Dataset
) -> None:
    evaluator = trained[0]
    images = mnist5k.test_images[:300]
    first = evaluator.predict(images, batch_size=64)[0]
    assert first.shape == (300, 10) and first.device.type == "cpu"
    assert torch.allclose(first.sum(dim=1), torch.ones(300))
    assert torch.allclose(evaluator.predict(images)[0], first, atol=1e-6)
    flat = evaluator.predict(images.reshape(300, -1))[0]  # MLP generators emit flat vectors
    assert torch.allclose(flat, first, atol=1e-6)
    assert evaluator.predict(torch.rand(4, 1, 32, 32))[0].shape == (4, 10)  # adaptive pooling
    with pytest.raises(ValueError):
        evaluator.predict(torch.zeros(2, 3, 28, 28))[0]


def test_training_is_deterministic(tiny: Dataset, tmp_path: Path) -> None:
    a = load_or_train_evaluator(tiny, tmp_path / "a", log=lambda _: None, epochs=1)
    b = load_or_train_evaluator(tiny, tmp_path / "b", log=lambda _: None, epochs=1)
    for name, weight in a.state()["weights"].items():
        assert torch.equal(weight, b.state()["weights"][name]), name


def test_measure_held_out_real_images(
    trained: tuple[Evaluator, float, list[str]], mnist5k: Dataset
) -> None:
    evaluator = trained[0]
    measured = evaluator.measure(mnist5k.test_images)
    print(f"real held-out: mode entropy {measured.mode_entropy:.4f} (ln 10 = {math.log(10):.4f})")
    assert 2.2 < measured.mode_entropy <= math.log(10) + 1e-9
    assert measured.mean_image_entropy < 0.5
    assert sum(measured.class_histogram) == 1000 and len(measured.class_histogram) == 10
    assert measured.labels.dtype == torch.int64 and measured.labels.shape == (1000,)
    assert measured.image_entropies.dtype == torch.float32
    assert measured.mode_entropy == pytest.approx(evaluator.reference.mode_entropy)
    assert measured.class_histogram == evaluator.reference.class_histogram
    assert measured.modes_covered == 10
    assert measured.kl_to_uniform == pytest.approx(math.log(10) - measured.mode_entropy)
    assert 9.0 < measured.classifier_score <= 10.0
    # The very images behind the reference neighbours: every one lies in its own k-NN ball.
    assert (measured.precision, measured.recall, measured.coverage) == (1.0, 1.0, 1.0)
    assert measured.frechet_distance == pytest.approx(0.0, abs=1e-6)


def test_an_evaluation_reports_every_metric_a_study_may_name(
    trained: tuple[Evaluator, float, list[str]], mnist5k: Dataset
) -> None:
    # A study's objective and ASHA metric are checked against METRIC_NAMES without torch.
    measured = trained[0].measure(mnist5k.test_images)
    assert tuple(measured.scalars()) == METRIC_NAMES


def test_collapsed_samples_score_low(trained: tuple[Evaluator, float, list[str]], mnist5k: Dataset):
    evaluator = trained[0]
    one_digit = mnist5k.test_images[:1].repeat(500, 1, 1, 1)
    measured = evaluator.measure(one_digit)
    assert measured.modes_covered == 1 and measured.mode_entropy == 0.0
    assert measured.kl_to_uniform == pytest.approx(math.log(10))
    assert measured.classifier_score == pytest.approx(1.0, abs=0.05)
    assert measured.coverage < 0.05 and measured.recall < 0.05


def test_state_round_trip(trained: tuple[Evaluator, float, list[str]], mnist5k: Dataset) -> None:
    evaluator = trained[0]
    buffer = io.BytesIO()
    torch.save(evaluator.state(), buffer)
    buffer.seek(0)
    restored = Evaluator.from_state(torch.load(buffer, weights_only=True))
    images = mnist5k.test_images[:200]
    assert torch.equal(restored.predict(images)[0], evaluator.predict(images)[0])
    assert restored.key == evaluator.key and restored.num_classes == 10
    assert restored.reference.class_histogram == evaluator.reference.class_histogram
    assert torch.equal(restored.reference.labels, evaluator.reference.labels)


def test_caller_rng_is_not_disturbed(tiny: Dataset, tmp_path: Path) -> None:
    torch.manual_seed(1234)
    before = torch.rand(4)
    load_or_train_evaluator(tiny, tmp_path, log=lambda _: None, epochs=1)  # trains: uses RNGs
    after = torch.rand(4)
    torch.manual_seed(1234)
    assert torch.equal(torch.cat([before, after]), torch.rand(8))


def test_unusable_cache_file_is_retrained(tiny: Dataset, tmp_path: Path) -> None:
    first = load_or_train_evaluator(tiny, tmp_path, log=lambda _: None, epochs=1)
    path = tmp_path / "evaluators" / f"tiny-{first.key}.pt"
    path.write_bytes(b"torn")
    lines: list[str] = []
    again = load_or_train_evaluator(tiny, tmp_path, log=lines.append, epochs=1)
    assert "ignoring unusable cache file" in lines[0] and "trained on tiny" in lines[1]
    assert again.accuracy == first.accuracy
    leftovers = {p.suffix for p in path.parent.iterdir()}
    assert leftovers == {".pt", ".lock"}  # no temp files left behind


def test_accuracy_on_idx_mnist(mnist_idx_root: Path) -> None:
    data = load_dataset("mnist", mnist_idx_root, download=False)
    lines: list[str] = []
    evaluator = load_or_train_evaluator(data, log=lines.append)
    print(f"IDX-fixture MNIST: {lines[0]}")
    assert evaluator.accuracy >= 0.95
    assert evaluator.reference.mode_entropy > 2.2
