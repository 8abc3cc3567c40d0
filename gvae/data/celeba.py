"""CelebA's aligned faces at 64x64 with their 40 binary attributes, from a folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from gvae.data.dataset import Dataset, ImageFiles, make_dataset
from gvae.errors import GvaeError

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
        return make_dataset(
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
