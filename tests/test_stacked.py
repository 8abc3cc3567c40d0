"""Stacked MNIST: the triples, the channel evaluator over 1,000 modes, a trial on it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from gvae.config import TrialConfig
from gvae.data import DATASETS, Dataset, load_dataset
from gvae.data.stacked import draw_triples
from gvae.evaluation import Evaluator, load_or_train_evaluator
from gvae.trainer import run_trial


@pytest.fixture(scope="module")
def stacked() -> Dataset:
    return load_dataset("stacked-mnist5k")


@pytest.fixture(scope="module")
def small_stacked(stacked: Dataset) -> Dataset:
    """2,000 held-out triples instead of 26,000: the evaluator's reference takes seconds."""
    return dataclasses.replace(
        stacked,
        name="stacked-small",
        test_images=stacked.test_images[:2000],
        test_labels=stacked.test_labels[:2000],
        fingerprint=stacked.fingerprint + "-small",
    )


@pytest.fixture(scope="module")
def channel_evaluator(small_stacked: Dataset) -> Evaluator:
    return load_or_train_evaluator(small_stacked, log=lambda _: None)


def test_triples_carry_their_digits_labels() -> None:
    # Digit i is an image filled with i / 255 and labelled i % 10: each channel tells its source.
    digits = torch.arange(20).float().div(255).view(20, 1, 1, 1).expand(20, 1, 2, 2).clone()
    images, modes = draw_triples(digits, torch.arange(20) % 10, 50, seed=3)
    assert images.shape == (50, 3, 2, 2)
    source = images[:, :, 0, 0].mul(255).round().long()  # [50, 3] digit indices
    expected = (source % 10 * torch.tensor([100, 10, 1])).sum(dim=1)
    assert torch.equal(modes, expected)
    assert torch.equal(draw_triples(digits, torch.arange(20) % 10, 50, seed=3)[0], images)


def test_stacked_mnist5k_shapes_and_split(stacked: Dataset, mnist5k: Dataset) -> None:
    assert stacked.image_shape == (3, 28, 28) and stacked.num_classes == 1000
    assert stacked.train_labels.unique().numel() == 1000  # every mode is in training
    assert stacked.channel_dataset is mnist5k
    # Held-out triples use held-out digits only.
    held_out = {bytes(image.numpy()) for image in mnist5k.test_images}
    training = {bytes(image.numpy()) for image in mnist5k.train_images}
    channels = stacked.test_images[:100].flatten(0, 1)
    assert all(bytes(c.unsqueeze(0).numpy()) in held_out for c in channels)
    assert not any(bytes(c.unsqueeze(0).numpy()) in training for c in channels)
    again = DATASETS["stacked-mnist5k"](Path("data"), False)
    assert again.fingerprint == stacked.fingerprint
    assert torch.equal(again.test_images[:50], stacked.test_images[:50])


def test_channel_evaluator_counts_1000_modes(
    channel_evaluator: Evaluator, small_stacked: Dataset
) -> None:
    evaluator = channel_evaluator
    assert evaluator.channel_classes == 10 and evaluator.num_classes == 1000
    assert evaluator.accuracy > 0.85  # all three digits right (~0.97 each)
    reference = evaluator.reference
    true_modes = small_stacked.test_labels.unique().numel()
    assert 0.95 * true_modes <= reference.modes_covered <= 1000
    assert len(reference.class_histogram) == 1000
    assert reference.kl_to_uniform == pytest.approx(math.log(1000) - reference.mode_entropy)
    # One triple repeated: one mode, KL = ln 1000, and far from the real images.
    collapsed = evaluator.measure(small_stacked.test_images[:1].repeat(300, 1, 1, 1))
    assert collapsed.modes_covered == 1 and collapsed.kl_to_uniform == pytest.approx(math.log(1000))
    assert collapsed.coverage < 0.01 and collapsed.recall < 0.01


def test_channel_evaluator_state_round_trip(
    channel_evaluator: Evaluator, small_stacked: Dataset
) -> None:
    restored = Evaluator.from_state(channel_evaluator.state())
    images = small_stacked.test_images[:100]
    assert torch.equal(restored.predict(images)[0], channel_evaluator.predict(images)[0])
    assert restored.predict(images)[0].shape == (100, 3, 10)
    assert restored.measure(images).scalars() == channel_evaluator.measure(images).scalars()


def test_trial_on_stacked_mnist(channel_evaluator: Evaluator) -> None:
    config = TrialConfig(
        model="gan", dataset="stacked-mnist5k", iterations=4, eval_every=4, eval_samples=200
    ).validate()
    outcome = run_trial(config, evaluator=channel_evaluator, log=lambda _: None)
    (row,) = outcome.curve
    assert len(row["class_histogram"]) == 1000 and sum(row["class_histogram"]) == 200
    assert 1 <= row["modes_covered"] <= 200
    assert row["kl_to_uniform"] == pytest.approx(math.log(1000) - row["mode_entropy"])
    assert outcome.reference["modes_covered"] == channel_evaluator.reference.modes_covered
