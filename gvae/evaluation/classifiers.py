"""The classifiers that label samples: a LeNet-style digit CNN (softmax over classes) and a
three-stage CNN for CelebA's 40 binary attributes (one sigmoid each), and how both are run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Bump ARCH_VERSION (digits) or ATTRIBUTE_ARCH_VERSION whenever that network or its training
# changes: it invalidates old caches.
ARCH_VERSION = 1
ATTRIBUTE_ARCH_VERSION = 1
DROPOUT = 0.25
FEATURE_GRID = 7  # spatial size the conv stack is pooled to before the fc layers
ATTRIBUTE_GRID = 8  # the same for the attribute classifier (64x64 faces after three poolings)


class PoolTo(nn.Module):
    """Adaptive average pooling to `size` x `size`, skipped when the input already has that size.

    28x28 images arrive at 7x7 and never touch it, which keeps CUDA training deterministic
    (adaptive pooling's CUDA backward uses atomics).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.adaptive_avg_pool2d(x, self.size)


def _conv_pool_stages(widths: list[int]) -> list[nn.Module]:
    """5x5 conv, ReLU and 2x2 max-pool per stage: each stage halves the image."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Conv2d(width_in, width_out, kernel_size=5, padding=2), nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
    return layers


def build_classifier(in_channels: int, num_classes: int) -> nn.Sequential:
    """LeNet-style CNN: two 5x5 conv+pool stages, then fc 128 and fc num_classes.

    Adaptive pooling fixes the fc input size, so images other than 28x28 still work.
    """
    return _conv_classifier([in_channels, 16, 32], FEATURE_GRID, num_classes)


def build_attribute_classifier(in_channels: int, num_attributes: int) -> nn.Sequential:
    """Three 5x5 conv+pool stages (64x64 -> 8x8), then fc 128 and one logit per attribute."""
    return _conv_classifier([in_channels, 16, 32, 64], ATTRIBUTE_GRID, num_attributes)


def _conv_classifier(widths: list[int], grid: int, outputs: int) -> nn.Sequential:
    """Conv+pool stages, pooling to grid x grid, then dropout, fc 128, dropout, fc outputs."""
    return nn.Sequential(
        *_conv_pool_stages(widths),
        PoolTo(grid),
        nn.Flatten(),
        nn.Dropout(DROPOUT),
        nn.Linear(widths[-1] * grid * grid, 128),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(128, outputs),
    )


def predict(
    net: nn.Sequential,
    images: torch.Tensor,
    attributes: bool,
    batch_size: int = 1000,
    per_channel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (sigmoid for attributes, else softmax) and the last hidden layer's features.

    `per_channel`: label each channel of [N, C, H, W] on its own with a one-channel net, giving
    probabilities [N, C, K] and features [N, C * D].
    """
    if per_channel:
        count, channels = images.shape[:2]
        probs, features = predict(net, images.flatten(0, 1).unsqueeze(1), attributes, batch_size)
        return probs.view(count, channels, -1), features.view(count, -1)
    device = next(net.parameters()).device
    body, head = net[:-1], net[-1]
    net.eval()
    probs, features = [], []
    with torch.no_grad():  # not inference_mode: callers may still use the probs under autograd
        for batch in images.split(batch_size):
            hidden = body(batch.to(device, torch.float32))
            logits = head(hidden)
            probs.append((logits.sigmoid() if attributes else logits.softmax(dim=1)).cpu())
            features.append(hidden.cpu())
    if not probs:
        return torch.empty(0, head.out_features), torch.empty(0, head.in_features)
    return torch.cat(probs), torch.cat(features)
