"""Datasets: MNIST and Fashion-MNIST via torchvision, mnist5k offline, Stacked MNIST built from
either, CelebA from a folder; and the batch sources the trainer draws from.

One module per family (digits, stacked, celeba), the Dataset type (dataset), the batch sources
(batches) and the registry that names them all (registry). The names below are what the rest of
gvae imports.
"""

from gvae.data.batches import (
    BatchSampler,
    PackBatches,
    StreamedBatches,
    held_out_batches,
    pack_batches,
    stream_workers,
    training_batches,
)
from gvae.data.celeba import IN_MEMORY_MAX_IMAGES, decode_celeba, load_celeba
from gvae.data.dataset import Dataset, ImageFiles, fingerprint, make_dataset
from gvae.data.digits import (
    IDX_FILES,
    load_fashion_mnist,
    load_mnist,
    load_mnist5k,
    mnist5k_arrays,
    stratified_split,
)
from gvae.data.registry import DATASETS, load_dataset, load_stacked_mnist, load_stacked_mnist5k

__all__ = [
    "DATASETS",
    "IDX_FILES",
    "IN_MEMORY_MAX_IMAGES",
    "BatchSampler",
    "Dataset",
    "ImageFiles",
    "PackBatches",
    "StreamedBatches",
    "decode_celeba",
    "fingerprint",
    "held_out_batches",
    "load_celeba",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist5k",
    "load_stacked_mnist",
    "load_stacked_mnist5k",
    "make_dataset",
    "mnist5k_arrays",
    "pack_batches",
    "stratified_split",
    "stream_workers",
    "training_batches",
]
