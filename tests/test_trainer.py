"""One trial end to end: every model, determinism, checkpoint-resume equality, divergence."""

import math

import pytest
import torch

from gvae.config import MODEL_NAMES, TrialConfig
from gvae.divergence import Diverged, DivergenceWatch
from gvae.errors import GvaeError
from gvae.trainer import CHECKPOINT_FILE, cpu_threads, run_trial

TINY = dict(iterations=20, eval_every=10, eval_samples=300, batch_size=16)


def quiet(_line: str) -> None:
    pass


def tiny(model: str, **overrides) -> TrialConfig:
    return TrialConfig(model=model, **{**TINY, **overrides}).validate()


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_tiny_trial_of_every_model(model, tmp_path):
    reports = []
    outcome = run_trial(
        tiny(model),
        report=lambda m, c: reports.append((m, sorted(p.name for p in c.iterdir()))),
        out_dir=tmp_path,
        log=quiet,
    )
    assert [row["iteration"] for row in outcome.curve] == [10, 20]
    for row in outcome.curve:
        assert 0.0 <= row["mode_entropy"] <= math.log(10) + 1e-6
        assert 0.0 <= row["mean_image_entropy"] <= math.log(10) + 1e-6
        assert sum(row["class_histogram"]) == 300
        assert row["iterations_per_second"] > 0
        assert 1 <= row["modes_covered"] <= 10
        assert row["kl_to_uniform"] == pytest.approx(math.log(10) - row["mode_entropy"])
        assert 1.0 <= row["classifier_score"] <= 10.0 + 1e-6
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
        assert 0.0 <= row["coverage"] <= 1.0 and row["density"] >= 0.0
        # The hinge's activity is a share of steps, recorded by the constrained VAE-GAN only.
        if model == "cvaegan":
            assert 0.0 <= row["constraint_active"] <= 1.0
        else:
            assert "constraint_active" not in row
    assert [files for _, files in reports] == [[CHECKPOINT_FILE]] * 2
    final_metrics = reports[-1][0]
    assert len(final_metrics["image_entropies"]) == 300
    assert len(final_metrics["sample_labels"]) == 100
    assert "image_entropies" not in reports[0][0]  # arrays only with the last evaluation
    assert sorted(p.name for p in tmp_path.glob("samples_*.png")) == [
        "samples_0000010.png",
        "samples_0000020.png",
    ]
    assert outcome.device == "cpu"


def test_same_config_and_seed_give_identical_numbers():
    first = run_trial(tiny("gan"), log=quiet).curve
    second = run_trial(tiny("gan"), log=quiet).curve
    drop = {"iterations_per_second", "eval_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in first] == [
        {k: v for k, v in r.items() if k not in drop} for r in second
    ]
    other_seed = run_trial(tiny("gan", seed=1), log=quiet).curve
    assert other_seed[-1]["g_loss"] != first[-1]["g_loss"]


@pytest.mark.parametrize("model", ["wgan", "cvaegan"])
def test_resume_from_checkpoint_continues_the_same_run(model, tmp_path):
    straight = run_trial(tiny(model), log=quiet)

    def keep_checkpoint(metrics, directory):
        (tmp_path / CHECKPOINT_FILE).write_bytes((directory / CHECKPOINT_FILE).read_bytes())

    run_trial(tiny(model, iterations=10), report=keep_checkpoint, log=quiet)
    resumed = run_trial(tiny(model), resume_from=tmp_path, log=quiet)
    assert [r["iteration"] for r in resumed.curve] == [10, 20]
    for key in ("mode_entropy", "mean_image_entropy", "class_histogram"):
        assert resumed.curve[-1][key] == straight.curve[-1][key]
    assert resumed.final["image_entropies"] == straight.final["image_entropies"]
    losses = [k for k in straight.curve[-1] if k.endswith("_loss")]
    assert losses and all(resumed.curve[-1][k] == straight.curve[-1][k] for k in losses)


def older_lone_trial_format(state: dict) -> None:
    state["curve"] = state.pop("curves")[0]  # one curve, before packs


def older_rng_format(state: dict) -> None:
    del state["rng"]["members"]  # no per-member generators, before packs


@pytest.mark.parametrize(
    "make_older,missing", [(older_lone_trial_format, "curves"), (older_rng_format, "rng.members")]
)
def test_a_checkpoint_in_an_older_format_is_refused_with_the_fix(make_older, missing, tmp_path):
    def keep_checkpoint(metrics, directory):
        (tmp_path / CHECKPOINT_FILE).write_bytes((directory / CHECKPOINT_FILE).read_bytes())

    run_trial(tiny("gan", iterations=10), report=keep_checkpoint, log=quiet)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    make_older(state)
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(GvaeError, match="start this trial afresh") as error:
        run_trial(tiny("gan"), resume_from=tmp_path, log=quiet)
    assert f"no {missing} " in str(error.value) and "\n" not in str(error.value)


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(GvaeError) as error:
        run_trial(tiny("gan"), resume_from=tmp_path, log=quiet)
    assert str(error.value) == (
        f"checkpoint {tmp_path / CHECKPOINT_FILE}: damaged, it cannot be read; restore it from a "
        "copy, or start this trial afresh"
    )


def test_divergence_stops_the_trial_with_its_iteration():
    with pytest.raises(Diverged) as error:
        run_trial(tiny("vae", lr=1e12), log=quiet)
    assert 1 <= error.value.iteration <= 20


def diverged_at(config: TrialConfig, interval: int, monkeypatch) -> Diverged:
    """The Diverged a trial raises when its losses are looked at every `interval` steps."""
    monkeypatch.setattr(DivergenceWatch, "for_device", classmethod(lambda cls, _: cls(interval)))
    with pytest.raises(Diverged) as error:
        run_trial(config, log=quiet)
    return error.value


def test_a_trial_looked_at_per_window_reports_the_divergence_a_per_step_look_finds(monkeypatch):
    config = tiny("vae", lr=1e12, iterations=40, eval_every=40)
    per_step = diverged_at(config, 1, monkeypatch)
    per_window = diverged_at(config, 256, monkeypatch)  # as on CUDA: looked at before evaluating
    assert per_window.iteration == per_step.iteration
    assert str(per_window.losses) == str(per_step.losses)  # the same values, NaN included


def test_training_does_not_depend_on_the_callers_rng():
    torch.manual_seed(123)
    first = run_trial(tiny("vae", iterations=10), log=quiet).curve[-1]["recon_loss"]
    torch.rand(7)
    second = run_trial(tiny("vae", iterations=10), log=quiet).curve[-1]["recon_loss"]
    assert first == second


def test_a_trial_on_a_gpu_gets_one_cpu_thread_unless_its_config_asks_for_more():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cpu_threads(TrialConfig(), cuda, default=16) == 1
    assert cpu_threads(TrialConfig(), cpu, default=16) == 16  # under Ray: the trial's CPUs
    assert cpu_threads(TrialConfig(cpu_threads=4), cuda, default=16) == 4
    assert cpu_threads(TrialConfig(cpu_threads=4), cpu, default=16) == 4
