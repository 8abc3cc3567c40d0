"""Section 4.2: conv nets, CelebA from a folder (in memory and streamed), the attribute evaluator,
attribute-mode entropy and the Frechet distance, on a small CelebA-format folder made here."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from gvae.cli import main
from gvae.config import MODEL_NAMES, TrialConfig
from gvae.data import Dataset, StreamedBatches, load_celeba, load_dataset
from gvae.data import celeba as celeba_module
from gvae.errors import GvaeError
from gvae.evaluation import (
    MODE_ATTRIBUTES,
    Evaluator,
    load_or_train_evaluator,
    measurement_from_attribute_probs,
    train_evaluator,
)
from gvae.metrics import binary_entropies, joint_modes, mode_entropy
from gvae.nets import architecture
from gvae.study.spec import load_study
from gvae.trainer import CHECKPOINT_FILE, run_trial
from tests.celeba_folder import ATTRIBUTE_NAMES, write_celeba_folder

STUDIES = Path(__file__).resolve().parent.parent / "studies"
CONV = dict(arch="conv", iterations=2, eval_every=2, eval_samples=16, batch_size=4, n_critic=2)


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 training, 4 validation and 12 held-out 178x218 JPEGs in CelebA's layout."""
    root = tmp_path_factory.mktemp("celeba-data")
    write_celeba_folder(root, train=24, valid=4, test=12)
    return root


@pytest.fixture(scope="module")
def celeba(celeba_root: Path) -> Dataset:
    return load_dataset("celeba", celeba_root)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory, celeba_root: Path) -> tuple[Path, Dataset]:
    """The same folder loaded as if it were too large to hold: decoded batch by batch."""
    root = tmp_path_factory.mktemp("celeba-streamed")
    (root / "celeba").symlink_to(celeba_root / "celeba")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(celeba_module, "IN_MEMORY_MAX_IMAGES", 0)
        return root, load_dataset("celeba", root)


@pytest.fixture(scope="module")
def celeba_evaluator(celeba: Dataset, gvae_cache: Path) -> tuple[Evaluator, list[str]]:
    lines: list[str] = []
    return load_or_train_evaluator(celeba, log=lines.append, epochs=40), lines


# --- conv nets --------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "grid"), [((3, 64, 64), 8), ((1, 28, 28), 7)])
def test_conv_nets_follow_larsen_et_al(shape: tuple[int, int, int], grid: int) -> None:
    torch.manual_seed(0)
    arch = architecture("conv")
    encoder, decoder = arch.encoder(100, shape), arch.generator(100, shape)
    discriminator = arch.discriminator(shape)
    images = torch.rand(3, *shape)
    mean, log_var = encoder(images)
    assert mean.shape == log_var.shape == (3, 100)
    decoded = decoder(mean)
    assert decoded.shape == (3, *shape) and decoded.min() >= 0 and decoded.max() <= 1
    assert discriminator(images).shape == (3, 1)

    def conv_widths(net: torch.nn.Module) -> list[int]:
        kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
        return [m.out_channels for m in net.modules() if isinstance(m, kinds)]

    assert conv_widths(encoder) == [64, 128, 256]
    assert conv_widths(decoder) == [256, 128, 32, shape[0]]
    assert conv_widths(discriminator) == [32, 128, 256, 256]
    assert encoder.mean.in_features == encoder.log_var.in_features == 256 * grid * grid
    assert decoder[0].out_features == 256 * grid * grid
    assert [m.out_features for m in discriminator if isinstance(m, torch.nn.Linear)] == [512, 1]


def test_conv_rejects_image_sizes_it_cannot_halve() -> None:
    with pytest.raises(GvaeError, match="multiple of 4"):
        architecture("conv").discriminator((1, 30, 30))


# --- CelebA -----------------------------------------------------------------------------------


def test_celeba_folder_loads_at_64x64_with_attributes(celeba: Dataset, celeba_root: Path) -> None:
    assert celeba.train_images.shape == (24, 3, 64, 64)  # partition 0
    assert celeba.test_images.shape == (12, 3, 64, 64)  # partition 2; validation unused
    assert celeba.train_labels.shape == (24, 40) and celeba.test_labels.shape == (12, 40)
    assert celeba.attribute_names == tuple(ATTRIBUTE_NAMES) and celeba.num_classes == 0
    assert celeba.train_images.dtype == torch.float32
    assert celeba.train_images.min() >= 0 and celeba.train_images.max() <= 1
    # The fake faces are red for Male and blue otherwise, which survives crop and resize.
    male = celeba.train_labels[:, ATTRIBUTE_NAMES.index("Male")].bool()
    red_minus_blue = (celeba.train_images[:, 0] - celeba.train_images[:, 2]).mean(dim=(1, 2))
    assert torch.equal(red_minus_blue > 0, male)
    assert str(celeba_root.resolve()) in celeba.source


def test_celeba_uses_only_the_listed_images_present(tmp_path: Path) -> None:
    write_celeba_folder(tmp_path, train=6, valid=0, test=3)
    (tmp_path / "celeba" / "img_align_celeba" / "000002.jpg").unlink()
    (tmp_path / "celeba" / "img_align_celeba" / "999999.jpg").write_bytes(b"not listed")
    dataset = load_celeba(tmp_path, download=False)
    assert len(dataset.train_labels) == 5 and len(dataset.test_labels) == 3
    assert "5 training / 3 held-out images of 9 listed" in dataset.source


def test_missing_celeba_files_name_the_exact_paths(tmp_path: Path) -> None:
    folder = tmp_path.resolve() / "celeba"
    with pytest.raises(GvaeError) as info:
        load_dataset("celeba", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert f"{folder / 'img_align_celeba'} not found" in message
    assert f"in {folder}/" in message and "list_attr_celeba.txt" in message
    assert "list_eval_partition.txt" in message

    (folder / "img_align_celeba").mkdir(parents=True)
    (folder / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    with pytest.raises(GvaeError, match=f"{folder / 'list_attr_celeba.txt'} not found"):
        load_dataset("celeba", tmp_path)


def test_missing_celeba_is_exit_2_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # the small study's data_root, data/celeba-small, is not here
    assert main(["study", "run", str(STUDIES / "celeba_small.yaml"), "--storage", "out"]) == 2
    error = capsys.readouterr().err.strip()
    expected = tmp_path.resolve() / "data" / "celeba-small" / "celeba" / "img_align_celeba"
    assert error.startswith("gvae: error: dataset 'celeba': ") and "\n" not in error
    assert str(expected) in error
    assert main(["train", "--dataset", "celeba", "--data-root", "nowhere", "--arch", "conv"]) == 2
    expected = tmp_path.resolve() / "nowhere" / "celeba" / "img_align_celeba"
    assert f"{expected} not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written before the data is found


def test_celeba_studies_validate_without_data() -> None:
    full, small = load_study(STUDIES / "celeba.yaml"), load_study(STUDIES / "celeba_small.yaml")
    for spec in (full, small):
        assert spec.datasets == ("celeba",) and spec.fixed["arch"] == "conv"
        assert spec.models == ("vaegan", "cvaegan")
    assert full.iterations == math.ceil(50 * 162_770 / 64) and full.fixed["batch_size"] == 64
    assert full.gpus > 0 and full.cpus == 4
    assert small.gpus == 0 and small.fixed["data_root"] == "data/celeba-small"


# --- streaming ----------------------------------------------------------------------------------


def test_streamed_batches_have_the_right_shapes_and_order(
    streamed: tuple[Path, Dataset], celeba: Dataset
) -> None:
    dataset = streamed[1]
    assert dataset.files is not None and dataset.train_images is None
    assert dataset.image_shape == (3, 64, 64) and dataset.fingerprint != celeba.fingerprint
    cpu = torch.device("cpu")
    with_workers = StreamedBatches(dataset.files, dataset.train_labels, 8, 5, cpu, workers=2)
    batches = [with_workers.next_with_labels() for _ in range(4)]
    with_workers.close()
    for images, labels in batches:
        assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
        assert labels.shape == (8, 40) and images.min() >= 0 and images.max() <= 1
    # An epoch (3 batches of 8 from 24 images) shows every training image exactly once.
    epoch = torch.cat([images for images, _ in batches[:3]])
    as_rows = {image.numpy().tobytes() for image in epoch}
    assert as_rows == {image.numpy().tobytes() for image in celeba.train_images}

    in_process = StreamedBatches(dataset.files, dataset.train_labels, 8, 5, cpu, workers=0)
    for images, labels in batches:  # the same stream, whatever the number of workers
        again = in_process.next_with_labels()
        assert torch.equal(again[0], images) and torch.equal(again[1], labels)
    other_seed = StreamedBatches(dataset.files, dataset.train_labels, 8, 6, cpu, workers=0)
    assert not torch.equal(other_seed(), batches[0][0])

    resumed = StreamedBatches(dataset.files, dataset.train_labels, 8, 5, cpu, workers=0)
    resumed.load_state(torch.tensor([3]))
    assert torch.equal(resumed(), batches[3][0])


def test_streamed_trial_resumes_like_a_straight_run(
    streamed: tuple[Path, Dataset], celeba_evaluator: tuple[Evaluator, list[str]], tmp_path: Path
) -> None:
    root, evaluator = str(streamed[0]), celeba_evaluator[0]
    config = TrialConfig(model="vae", dataset="celeba", data_root=root, **CONV)
    config = dataclasses.replace(config, eval_every=1).validate()
    straight = run_trial(config, evaluator=evaluator, log=quiet)

    def keep(metrics: dict, directory: Path) -> None:
        (tmp_path / CHECKPOINT_FILE).write_bytes((directory / CHECKPOINT_FILE).read_bytes())

    run_trial(
        dataclasses.replace(config, iterations=1), report=keep, evaluator=evaluator, log=quiet
    )
    resumed = run_trial(config, resume_from=tmp_path, evaluator=evaluator, log=quiet)
    for key in ("recon_loss", "kl_loss", "frechet_distance", "mean_image_entropy"):
        assert resumed.curve[-1][key] == straight.curve[-1][key]


# --- evaluator and metrics ------------------------------------------------------------------


def test_attribute_evaluator_trains_and_caches(
    celeba_evaluator: tuple[Evaluator, list[str]], celeba: Dataset, gvae_cache: Path
) -> None:
    evaluator, lines = celeba_evaluator
    assert lines[0].startswith("evaluator: trained on celeba in ")
    assert evaluator.attribute_names == tuple(ATTRIBUTE_NAMES)
    assert evaluator.mode_attributes == MODE_ATTRIBUTES == ("Male", "Smiling", "Eyeglasses")
    probs = evaluator.predict(celeba.test_images)[0]
    assert probs.shape == (12, 40) and probs.min() >= 0 and probs.max() <= 1
    male = ATTRIBUTE_NAMES.index("Male")  # shown plainly by the fake faces' colour
    assert ((probs[:, male] > 0.5).long() == celeba.test_labels[:, male]).float().mean() >= 0.75
    assert 0 <= evaluator.accuracy <= 1
    assert sum(evaluator.reference.class_histogram) == 12
    assert len(evaluator.reference.class_histogram) == 8
    mean, covariance = evaluator.reference_features
    assert mean.shape == (128,) and covariance.shape == (128, 128)

    again_lines: list[str] = []
    again = load_or_train_evaluator(celeba, log=again_lines.append, epochs=40)
    assert again_lines[0].startswith("evaluator: loaded ") and str(gvae_cache) in again_lines[0]
    assert torch.equal(again.predict(celeba.test_images)[0], probs)
    assert again.mode_attributes == MODE_ATTRIBUTES
    assert torch.equal(again.reference_features[1], covariance)


def attribute_mode_entropy(bits: torch.Tensor) -> float:
    """The entropy of the joint modes of k binary attributes, as the evaluator measures faces."""
    return mode_entropy(joint_modes(bits), 2 ** bits.shape[1])


def test_attribute_mode_entropy_by_hand() -> None:
    assert joint_modes(torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]])).tolist() == [5, 0, 7]
    every_mode = torch.tensor([[m >> 2 & 1, m >> 1 & 1, m & 1] for m in range(8)] * 3)
    assert attribute_mode_entropy(every_mode) == pytest.approx(math.log(8))
    assert attribute_mode_entropy(every_mode[:1].repeat(10, 1)) == 0.0
    assert attribute_mode_entropy(torch.tensor([[1, 0, 0], [0, 1, 1]] * 4)) == pytest.approx(
        math.log(2)
    )

    # Made-up predictions: 16 images spread evenly over the 8 joint modes, every attribute
    # predicted with probability 0.9 or 0.1, so each image's mean binary entropy is H(0.9).
    columns = tuple(ATTRIBUTE_NAMES.index(name) for name in MODE_ATTRIBUTES)
    probs = torch.full((16, 40), 0.1)
    probs[:, list(columns)] = torch.where(every_mode[:16].bool(), 0.9, 0.1)
    measured = measurement_from_attribute_probs(probs, columns)
    assert measured.mode_entropy == pytest.approx(math.log(8))
    assert measured.class_histogram == [2] * 8
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert measured.mean_image_entropy == pytest.approx(h)
    assert binary_entropies(torch.tensor([[0.5, 0.5], [0.0, 1.0]])).tolist() == pytest.approx(
        [math.log(2), 0.0]
    )


# --- conv trials of every model --------------------------------------------------------------


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_conv_trial_on_celeba(
    model: str, celeba_root: Path, celeba_evaluator: tuple[Evaluator, list[str]]
) -> None:
    config = TrialConfig(model=model, dataset="celeba", data_root=str(celeba_root), **CONV)
    outcome = run_trial(config.validate(), evaluator=celeba_evaluator[0], log=quiet)
    [row] = outcome.curve
    assert row["iteration"] == 2 and all(math.isfinite(row[k]) for k in row if k.endswith("_loss"))
    assert 0 <= row["mode_entropy"] <= math.log(8) + 1e-9
    assert 0 <= row["mean_image_entropy"] <= math.log(2) + 1e-9
    assert len(row["class_histogram"]) == 8 and sum(row["class_histogram"]) == 16
    assert math.isfinite(row["frechet_distance"]) and row["frechet_distance"] > 0
    assert len(outcome.final["image_entropies"]) == 16
    assert outcome.mode_attributes == MODE_ATTRIBUTES


@pytest.fixture(scope="module")
def digit_evaluator(mnist5k: Dataset) -> Evaluator:
    """A digit evaluator trained for one epoch on 400 images: quick, good enough to score."""
    tiny = dataclasses.replace(
        mnist5k, train_images=mnist5k.train_images[:400], train_labels=mnist5k.train_labels[:400]
    )
    return train_evaluator(tiny, epochs=1)


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_conv_trial_on_mnist_shaped_data(model: str, digit_evaluator: Evaluator) -> None:
    config = TrialConfig(model=model, dataset="mnist5k", **CONV).validate()
    outcome = run_trial(config, evaluator=digit_evaluator, log=quiet)
    row = outcome.curve[-1]
    assert 0 <= row["mode_entropy"] <= math.log(10) + 1e-9
    assert len(row["class_histogram"]) == 10 and sum(row["class_histogram"]) == 16
    assert math.isfinite(row["frechet_distance"]) and row["frechet_distance"] > 0
    assert outcome.mode_attributes == ()
