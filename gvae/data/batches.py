"""Batch sources: random training batches from memory, or decoded from disk by DataLoader
workers (`StreamedBatches`); `training_batches` picks the right one for a dataset."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import torch
import torch.utils.data

from gvae.data.dataset import Dataset, ImageFiles
from gvae.errors import GvaeError

# Decoding workers per streamed source: studies give CelebA trials 4 CPUs, one for the trainer.
STREAM_WORKERS = 3
STREAM_PREFETCH = 4  # batches queued per worker


def stream_workers() -> int:
    """STREAM_WORKERS, but leaving one CPU of this machine to the trainer."""
    return max(0, min(STREAM_WORKERS, (os.cpu_count() or 1) - 1))


class BatchSampler:
    """Draws random training batches (with replacement) from in-memory images with its own seeded
    generator; `next_with_labels` needs the `labels` of the images."""

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        seed: int,
        labels: torch.Tensor | None = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def index_shape(self) -> tuple[int, ...]:
        return (self.batch_size,)

    def draw_index(self) -> torch.Tensor:
        """The next batch's image indices, on the CPU."""
        return torch.randint(len(self.images), self.index_shape, generator=self.generator)

    def _index(self) -> torch.Tensor:
        return to_device_queued(self.draw_index(), self.images.device)

    def __call__(self) -> torch.Tensor:
        return self.images[self._index()]

    def next_with_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._index()
        return self.images[index], self.labels[index]

    def state(self) -> torch.Tensor:
        """What a checkpoint needs to continue the same sequence of batches."""
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.cpu())

    def close(self) -> None:
        """Nothing to release (the same interface as StreamedBatches)."""


def to_device_queued(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The CPU index on `device` without the host waiting: from pinned memory the copy is queued
    like a kernel, from pageable memory the host would wait for the GPU at every batch. The
    indices come from the CPU generator either way, so a trial draws the same batches on every
    device."""
    if device.type == "cpu":
        return index
    return index.pin_memory().to(device, non_blocking=True)


class PackBatches:
    """The batches of a pack's members (gvae.pack), [K, B, C, H, W]: member k's from its own
    sampler, seeded as its lone trial's, so it sees the batches that trial sees."""

    def __init__(self, images: torch.Tensor, batch_size: int, seeds: list[int]) -> None:
        self.images = images
        self.samplers = [BatchSampler(images, batch_size, seed) for seed in seeds]

    @property
    def index_shape(self) -> tuple[int, ...]:
        return (len(self.samplers), self.samplers[0].batch_size)

    def draw_index(self) -> torch.Tensor:
        """The next batch's image indices of every member, [K, B], on the CPU."""
        return torch.stack([sampler.draw_index() for sampler in self.samplers])

    def __call__(self) -> torch.Tensor:
        return self.images[to_device_queued(self.draw_index(), self.images.device)]

    def state(self) -> torch.Tensor:
        return torch.stack([sampler.state() for sampler in self.samplers])

    def load_state(self, state: torch.Tensor) -> None:
        for sampler, member_state in zip(self.samplers, state, strict=True):
            sampler.load_state(member_state.clone())  # set_state reads a view wrongly

    def close(self) -> None:
        """Nothing to release (the same interface as StreamedBatches)."""


def _epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed((seed << 20) + epoch))


class _ForeverBatches(torch.utils.data.Sampler):
    """Index lists of batch `start`, `start + 1`, ...: consecutive slices of an endless sequence
    of per-epoch shuffles, each seeded by (seed, epoch), so batch k depends on (seed, k) only."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int) -> None:
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start * self.batch_size
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if position // self.size != epoch:
                    epoch = position // self.size
                    order = _epoch_order(self.size, self.seed, epoch)
                offset = position % self.size
                take = order[offset : offset + self.batch_size - len(batch)]
                batch.extend(take.tolist())
                position += len(take)
            yield batch


class _DecodedImages(torch.utils.data.Dataset):
    def __init__(self, paths: tuple[str, ...], labels: torch.Tensor, decode: Callable) -> None:
        self.paths, self.labels, self.decode = paths, labels, decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.paths[index]), self.labels[index]


class StreamedBatches:
    """Random training batches decoded from disk by DataLoader workers, forever.

    Calling it returns float32 images [B, C, H, W] in [0, 1] on `device`; `next_with_labels` also
    returns their labels. Batch k is a pure function of (seed, k) and DataLoader keeps batches in
    order, so the stream is the same for any number of workers (`workers`: default
    `stream_workers()`), and a checkpoint needs only the count of batches drawn (`state`).
    Images are drawn without replacement within an epoch.
    """

    def __init__(
        self,
        files: ImageFiles,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        device: torch.device,
        workers: int | None = None,
    ) -> None:
        self.images = _DecodedImages(files.train, labels, files.decode)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.workers = stream_workers() if workers is None else workers
        self.drawn = 0
        self._batches: Iterator | None = None

    def _start(self) -> Iterator:
        sampler = _ForeverBatches(len(self.images), self.batch_size, self.seed, self.drawn)
        loader = torch.utils.data.DataLoader(
            self.images,
            batch_sampler=sampler,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=STREAM_PREFETCH if self.workers else None,
            # Its own generator: otherwise starting the iterator draws a worker seed from the
            # global RNG, and a resumed run would diverge from a straight one.
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def next_with_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = self._start()
        images, labels = next(self._batches)
        self.drawn += 1
        images = images.to(self.device, non_blocking=True).float().div_(255.0)
        return images, labels.to(self.device, non_blocking=True)

    def __call__(self) -> torch.Tensor:
        return self.next_with_labels()[0]

    def state(self) -> torch.Tensor:
        return torch.tensor([self.drawn])

    def load_state(self, state: torch.Tensor) -> None:
        self.close()
        self.drawn = int(state[0])

    def close(self) -> None:
        """Stop the workers (a new stream starts where this one left off when called again)."""
        self._batches = None  # the DataLoader iterator shuts its workers down when dropped


def training_batches(
    dataset: Dataset, batch_size: int, seed: int, device: torch.device
) -> BatchSampler | StreamedBatches:
    """The trainer's batch source: in memory when the dataset is, else streamed from disk."""
    if dataset.files is None:
        images = dataset.train_images.to(device)
        return BatchSampler(images, batch_size, seed, dataset.train_labels.to(device))
    return StreamedBatches(dataset.files, dataset.train_labels, batch_size, seed, device)


def pack_batches(
    dataset: Dataset, batch_size: int, seeds: list[int], device: torch.device
) -> PackBatches:
    """A pack's batch source: the dataset must be held in memory."""
    if dataset.files is not None:
        raise GvaeError(
            f"pack: {dataset.name} is streamed from disk, and packs draw from memory; use pack 1"
        )
    return PackBatches(dataset.train_images.to(device), batch_size, seeds)


def held_out_batches(
    dataset: Dataset, batch_size: int, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `limit` held-out images (all by default) and labels in order, in float32 CPU
    batches; decoded by DataLoader workers when the dataset stays on disk."""
    count = len(dataset.test_labels) if limit is None else min(limit, len(dataset.test_labels))
    if dataset.files is None:
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            yield dataset.test_images[start:stop], dataset.test_labels[start:stop]
        return
    files = dataset.files
    images = _DecodedImages(files.test[:count], dataset.test_labels[:count], files.decode)
    loader = torch.utils.data.DataLoader(
        images,
        batch_size=batch_size,
        num_workers=min(stream_workers(), math.ceil(count / 256)),
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
    )
    for batch, labels in loader:
        yield batch.float().div_(255.0), labels
