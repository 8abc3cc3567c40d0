"""Stacked MNIST: three digits in the three colour channels, 3x28x28, 1,000 modes.

The standard mode-collapse benchmark (VEEGAN, Srivastava et al. 2017; Unrolled GAN, Metz et al.
2017; PacGAN, Lin et al. 2018). An image's mode is its digit triple, numbered 100a + 10b + c for
digits a, b, c in the red, green and blue channels. Triples are drawn, with a fixed seed, from
one split's own digits: held-out triples use only held-out digits, so the evaluator's reference
row never sees a training digit.
"""

from __future__ import annotations

import hashlib

import torch

from gvae.data.dataset import Dataset

STACKED_SEED = 20170601  # fixed: the same triples everywhere, forever
CHANNELS = 3
# Held-out triples: PacGAN counts modes over 26,000 samples, so the real-data reference row is
# taken over as many images as a study's evaluation (eval_samples: 26000 in the stacked studies).
HELD_OUT_TRIPLES = 26_000
# Training triples: 25 per mode on average for mnist5k's 4,000 digits, so every mode is present
# in training (a mode is missing with probability e^-25); full MNIST gives one per training digit.
TRAIN_TRIPLES = {"stacked-mnist": 60_000, "stacked-mnist5k": 25_000}


def draw_triples(
    images: torch.Tensor, labels: torch.Tensor, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images [count, 3, H, W] whose channels are digits drawn uniformly (with
    replacement) from `images` [N, 1, H, W], and their modes 100a + 10b + c as int64 [count]."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(images), (count, CHANNELS), generator=generator)
    stacked = images[index].squeeze(2)  # [count, 3, 1, H, W] -> [count, 3, H, W]
    digits = labels[index]  # [count, 3]
    return stacked, (digits * torch.tensor([100, 10, 1])).sum(dim=1)


def stack(name: str, digits: Dataset) -> Dataset:
    """The Stacked MNIST dataset `name` built from a digit dataset's two splits."""
    train_x, train_y = draw_triples(
        digits.train_images, digits.train_labels, TRAIN_TRIPLES[name], STACKED_SEED
    )
    test_x, test_y = draw_triples(
        digits.test_images, digits.test_labels, HELD_OUT_TRIPLES, STACKED_SEED + 1
    )
    # The triples are a pure function of the digits and these numbers: hashing them is enough.
    recipe = f"{name} {digits.fingerprint} {STACKED_SEED} {TRAIN_TRIPLES[name]} {HELD_OUT_TRIPLES}"
    return Dataset(
        name=name,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        num_classes=digits.num_classes**CHANNELS,
        fingerprint=hashlib.sha256(recipe.encode()).hexdigest()[:16],
        source=(
            f"Stacked MNIST from {digits.name} ({digits.source}): {len(train_y)} training / "
            f"{len(test_y)} held-out digit triples drawn from each split with seed {STACKED_SEED}"
        ),
        channel_dataset=digits,
    )
