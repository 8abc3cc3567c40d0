"""The Dataset type every loader returns, and the helpers loaders share to build one.

Small sets are held as float32 images in [0, 1] on the CPU: the whole of MNIST is ~200 MB, so
keeping it in memory avoids per-item PIL decoding, which would dominate training time on small
CPUs. Sets too large to hold (full CelebA) name their image files instead (`ImageFiles`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """A dataset's images left on disk, decoded as they are needed (too many to hold)."""

    train: tuple[str, ...]  # image paths, in the order of Dataset.train_labels
    test: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (C, H, W) after decoding
    decode: Callable[[str], torch.Tensor]  # path -> uint8 [C, H, W]; module-level (picklable)


# eq=False: the generated __eq__ would compare tensors and raise; identity is what we want.
@dataclass(frozen=True, eq=False)
class Dataset:
    """An image dataset with a training split and a held-out split.

    Labels are either classes (int64 [N], `num_classes` of them) or binary attributes (int64 [N, A]
    of 0/1, named by `attribute_names`, with `num_classes` 0). Images are float32 [N, C, H, W] in
    [0, 1] on the CPU, or None when they stay on disk in `files`. A `channel_dataset` is the
    digit dataset whose classifier labels each channel separately (Stacked MNIST): the modes are
    then the joint labels of the channels, `num_classes` of them.
    """

    name: str
    train_images: torch.Tensor | None
    train_labels: torch.Tensor
    test_images: torch.Tensor | None  # held-out split, same format
    test_labels: torch.Tensor
    num_classes: int
    fingerprint: str  # short sha256 hex of the contents (cache keys)
    source: str  # human-readable: where the data came from (recorded with results)
    attribute_names: tuple[str, ...] = ()
    files: ImageFiles | None = None
    channel_dataset: Dataset | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        if self.files is not None:
            return self.files.image_shape
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def has_attributes(self) -> bool:
        return bool(self.attribute_names)


def fingerprint(*tensors: torch.Tensor) -> str:
    """Short sha256 of the tensors' shapes and bytes, so equal contents give equal keys."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def make_dataset(
    name: str,
    raw_splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    num_classes: int,
    source: str,
    attribute_names: tuple[str, ...] = (),
) -> Dataset:
    """Build a Dataset from uint8 [N, H, W] (or [N, C, H, W]) images and integer labels."""
    train_x, train_y, test_x, test_y = raw_splits
    # Hash the uint8 originals: 4x fewer bytes than the float copies, same information.
    key = fingerprint(train_x, train_y, test_x, test_y)
    return Dataset(
        name=name,
        train_images=_to_float_images(train_x),
        train_labels=train_y.long(),
        test_images=_to_float_images(test_x),
        test_labels=test_y.long(),
        num_classes=num_classes,
        fingerprint=key,
        source=source,
        attribute_names=attribute_names,
    )


def _to_float_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.float().div_(255.0)
