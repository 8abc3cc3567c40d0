"""The dataset registry: name -> loader, and `load_dataset`, which loads each once per process.

Its names are gvae.names.DATASET_NAMES, which a config is validated against without torch.
Stacked MNIST is composed here, from digits loaded through the registry (so loaded, and kept, once);
gvae.data.stacked builds the triples and imports nothing from this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gvae.data.celeba import load_celeba
from gvae.data.dataset import Dataset
from gvae.data.digits import load_fashion_mnist, load_mnist, load_mnist5k
from gvae.data.stacked import stack
from gvae.errors import GvaeError
from gvae.names import DATASET_NAMES


def load_stacked_mnist(root: Path, download: bool) -> Dataset:
    """Stacked MNIST from full MNIST (60,000 training / 26,000 held-out triples)."""
    return stack("stacked-mnist", load_dataset("mnist", root, download))


def load_stacked_mnist5k(root: Path, download: bool) -> Dataset:
    """Stacked MNIST from the offline mnist5k digits (25,000 training / 26,000 held-out triples)."""
    return stack("stacked-mnist5k", load_dataset("mnist5k", root, download))


DATASETS: dict[str, Callable[[Path, bool], Dataset]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "mnist5k": load_mnist5k,
    "celeba": load_celeba,
    "stacked-mnist": load_stacked_mnist,
    "stacked-mnist5k": load_stacked_mnist5k,
}

_LOADED: dict[tuple[str, Path], Dataset] = {}


def load_dataset(name: str, root: str | Path = "data", download: bool = True) -> Dataset:
    """Load a registered dataset, once per (name, root) per process."""
    loader = DATASETS.get(name)
    if loader is None:
        raise GvaeError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    key = (name, Path(root).expanduser().resolve())
    if key not in _LOADED:
        _LOADED[key] = loader(key[1], download)
    return _LOADED[key]
