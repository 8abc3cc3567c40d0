"""Network building blocks, chosen by architecture name.

`mlp` is the paper's fully connected family (same nets for every model): generator
100 -> 98 -> 196 -> 392 -> 784 with a sigmoid output, discriminator 784 -> 392 -> 196 -> 98 -> 1,
and an encoder that mirrors the discriminator with mean and log-variance heads.

`conv` is the convolutional family of Larsen et al. (2015, Table 1 of their appendix), all 5x5
kernels, batch norm and ReLU:
  encoder        conv 64 /2, conv 128 /2, conv 256 /2, then the mean and log-variance heads
  decoder        fc 8x8x256, convT 256 x2, convT 128 x2, convT 32 x2, conv C, sigmoid
  discriminator  conv 32, conv 128 /2, conv 256 /2, conv 256 /2, fc 512, fc 1 (a logit)
for 64x64 images (8x8 after three halvings). 28x28 images (MNIST) get the same layers with the
first two halvings only (28 -> 14 -> 7); the remaining stride-2 layer keeps stride 1.
Sigmoid rather than Larsen's tanh: every model here works with images in [0, 1]. Larsen's encoder
has a 2048-unit dense layer (with batch norm) before the heads; it would hold 34M of the encoder's
35M weights and make every checkpoint ~10x larger, so here the heads read the 8x8x256 features.
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


# --- conv (Larsen et al. 2015) ---------------------------------------------------------------

KERNEL = 5


def conv_halvings(image_shape: ImageShape) -> int:
    """How many of the three stride-2 stages the image size takes: 3 for 64x64, 2 for 28x28."""
    _, height, width = image_shape
    if height != width:
        raise GvaeError(f"arch: conv needs square images, got {height}x{width}; use arch mlp")
    for halvings in (3, 2):
        if height % 2**halvings == 0 and height // 2**halvings >= 4:
            return halvings
    raise GvaeError(
        f"arch: conv needs images whose side is a multiple of 4 (28, 64, ...), got {height}x{width}"
    )


def _strides(image_shape: ImageShape) -> list[int]:
    """Strides of the three resolution-changing stages: the last ones stay 1 on small images."""
    halvings = conv_halvings(image_shape)
    return [2] * halvings + [1] * (3 - halvings)


def _conv_block(channels_in: int, channels_out: int, stride: int, norm: bool = True) -> list:
    layers: list[nn.Module] = [
        nn.Conv2d(channels_in, channels_out, KERNEL, stride, padding=KERNEL // 2, bias=not norm)
    ]
    if norm:
        layers.append(nn.BatchNorm2d(channels_out))
    return [*layers, nn.ReLU()]


def _up_block(channels_in: int, channels_out: int, stride: int) -> list[nn.Module]:
    # padding 2 with output_padding 1 doubles the size exactly (stride 2) or keeps it (stride 1).
    return [
        nn.ConvTranspose2d(
            channels_in,
            channels_out,
            KERNEL,
            stride,
            padding=KERNEL // 2,
            output_padding=stride - 1,
            bias=False,
        ),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(),
    ]


def _dense_block(features_in: int, features_out: int) -> list[nn.Module]:
    return [
        nn.Linear(features_in, features_out, bias=False),
        nn.BatchNorm1d(features_out),
        nn.ReLU(),
    ]


def _grid(image_shape: ImageShape) -> int:
    """Side of the 256-channel feature map where the conv stacks meet the dense layers."""
    return image_shape[1] // 2 ** conv_halvings(image_shape)


def conv_encoder(latent_dim: int, image_shape: ImageShape) -> Encoder:
    channels, grid = image_shape[0], _grid(image_shape)
    strides = _strides(image_shape)
    body = nn.Sequential(
        *_conv_block(channels, 64, strides[0]),
        *_conv_block(64, 128, strides[1]),
        *_conv_block(128, 256, strides[2]),
        nn.Flatten(),
    )
    return Encoder(body, 256 * grid * grid, latent_dim)


def conv_generator(latent_dim: int, image_shape: ImageShape) -> nn.Module:
    """The decoder: outputs [N, C, H, W] in [0, 1]."""
    channels, grid = image_shape[0], _grid(image_shape)
    strides = _strides(image_shape)
    return nn.Sequential(
        *_dense_block(latent_dim, 256 * grid * grid),
        nn.Unflatten(1, (256, grid, grid)),
        *_up_block(256, 256, strides[2]),
        *_up_block(256, 128, strides[1]),
        *_up_block(128, 32, strides[0]),
        nn.Conv2d(32, channels, KERNEL, padding=KERNEL // 2),
        nn.Sigmoid(),
    )


def conv_discriminator(image_shape: ImageShape) -> nn.Module:
    """Outputs one logit per image (the critic's score for WGAN)."""
    channels, grid = image_shape[0], _grid(image_shape)
    strides = _strides(image_shape)
    return nn.Sequential(
        *_conv_block(channels, 32, 1, norm=False),  # Larsen et al.: no batch norm on the input
        *_conv_block(32, 128, strides[0]),
        *_conv_block(128, 256, strides[1]),
        *_conv_block(256, 256, strides[2]),
        nn.Flatten(),
        *_dense_block(256 * grid * grid, 512),
        nn.Linear(512, 1),
    )


# --- registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    generator: Callable[[int, ImageShape], nn.Module]
    discriminator: Callable[[ImageShape], nn.Module]
    encoder: Callable[[int, ImageShape], Encoder]


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(mlp_generator, mlp_discriminator, mlp_encoder),
    "conv": Architecture(conv_generator, conv_discriminator, conv_encoder),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise GvaeError(f"arch: {name!r} is not available; use one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
