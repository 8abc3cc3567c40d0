"""Network building blocks, chosen by architecture name.

`mlp` is the paper's fully connected family (same nets for every model): generator
100 -> 98 -> 196 -> 392 -> 784 with a sigmoid output, discriminator 784 -> 392 -> 196 -> 98 -> 1,
and an encoder that mirrors the discriminator with mean and log-variance heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gvae.errors import GvaeError

ImageShape = tuple[int, int, int]


class Encoder(nn.Module):
    """Maps images to the mean and log-variance of a diagonal Gaussian over the latent."""

    def __init__(self, body: nn.Module, features: int, latent_dim: int) -> None:
        super().__init__()
        self.body = body
        self.mean = nn.Linear(features, latent_dim)
        self.log_var = nn.Linear(features, latent_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(images)
        return self.mean(hidden), self.log_var(hidden)


def _mlp(widths: list[int]) -> list[nn.Module]:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return layers


def mlp_generator(latent_dim: int, image_shape: ImageShape) -> nn.Module:
    pixels = math.prod(image_shape)
    return nn.Sequential(
        *_mlp([latent_dim, 98, 196, 392, pixels]), nn.Sigmoid(), nn.Unflatten(1, image_shape)
    )


def mlp_discriminator(image_shape: ImageShape) -> nn.Module:
    """Outputs one logit per image (the critic's score for WGAN)."""
    return nn.Sequential(nn.Flatten(), *_mlp([math.prod(image_shape), 392, 196, 98, 1]))


def mlp_encoder(latent_dim: int, image_shape: ImageShape) -> Encoder:
    body = nn.Sequential(nn.Flatten(), *_mlp([math.prod(image_shape), 392, 196, 98]), nn.ReLU())
    return Encoder(body, 98, latent_dim)


@dataclass(frozen=True)
class Architecture:
    generator: Callable[[int, ImageShape], nn.Module]
    discriminator: Callable[[ImageShape], nn.Module]
    encoder: Callable[[int, ImageShape], Encoder]


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(mlp_generator, mlp_discriminator, mlp_encoder),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise GvaeError(f"arch: {name!r} is not available; use one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
