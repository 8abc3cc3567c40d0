"""The CUDA path: determinism, resume, moving between devices, the evaluator, `gvae reproduce`.

Marked `cuda` and skipped where torch finds no CUDA device; `bench/gpu_check.sh` runs them on a
GPU machine (`pytest -m cuda`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from gvae.cli import main
from gvae.config import TrialConfig
from gvae.data import load_dataset
from gvae.divergence import Diverged, DivergenceWatch
from gvae.evaluation import load_or_train_evaluator
from gvae.trainer import CHECKPOINT_FILE, run_pack, run_trial

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TINY = dict(iterations=20, eval_every=10, eval_samples=300, batch_size=16)
DROP = {"iterations_per_second", "eval_seconds"}  # timings, the only fields allowed to differ


def quiet(_line: str) -> None:
    pass


# Each determinism and resume test runs eagerly and with the step as a CUDA graph (gvae.graphs).
GRAPH = pytest.mark.parametrize("graph", ["off", "on"])


def tiny(model: str, device: str = "cuda", **overrides) -> TrialConfig:
    return TrialConfig(model=model, device=device, **{**TINY, **overrides}).validate()


def numbers(outcome) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in DROP} for row in outcome.curve]


def keep_checkpoint(target: Path):
    def report(_metrics, directory: Path) -> None:
        (target / CHECKPOINT_FILE).write_bytes((directory / CHECKPOINT_FILE).read_bytes())

    return report


@GRAPH
@pytest.mark.parametrize("model", ["gan", "wgan", "vae", "vaegan", "cvaegan"])
def test_a_trial_is_deterministic_on_cuda(model, graph):
    first = run_trial(tiny(model, graph=graph), log=quiet)  # two captures in one process
    second = run_trial(tiny(model, graph=graph), log=quiet)
    assert first.device.startswith("cuda")
    assert numbers(first) == numbers(second)
    assert first.final["image_entropies"] == second.final["image_entropies"]


@GRAPH
@pytest.mark.parametrize("model", ["wgan", "cvaegan"])
def test_a_trial_resumes_from_its_checkpoint_on_cuda(model, tmp_path, graph):
    straight = run_trial(tiny(model, graph=graph), log=quiet)
    run_trial(tiny(model, iterations=10, graph=graph), report=keep_checkpoint(tmp_path), log=quiet)
    resumed = run_trial(tiny(model, graph=graph), resume_from=tmp_path, log=quiet)
    assert [row["iteration"] for row in resumed.curve] == [10, 20]
    assert numbers(resumed)[-1] == numbers(straight)[-1]
    assert resumed.final["image_entropies"] == straight.final["image_entropies"]


@pytest.mark.parametrize(("written_on", "resumed_on"), [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_checkpoint_written_on_one_device_resumes_on_the_other(written_on, resumed_on, tmp_path):
    run_trial(
        tiny("cvaegan", written_on, iterations=10), report=keep_checkpoint(tmp_path), log=quiet
    )
    first = run_trial(tiny("cvaegan", resumed_on), resume_from=tmp_path, log=quiet)
    again = run_trial(tiny("cvaegan", resumed_on), resume_from=tmp_path, log=quiet)
    assert first.device.startswith(resumed_on)
    assert [row["iteration"] for row in first.curve] == [10, 20]
    assert numbers(first) == numbers(again)  # deterministic on the new device too
    losses = [value for key, value in first.curve[-1].items() if key.endswith("_loss")]
    assert losses and torch.isfinite(torch.tensor(losses)).all()


def test_divergence_on_cuda_is_reported_at_its_first_iteration(monkeypatch):
    config = tiny("vae", lr=1e12, iterations=40, eval_every=40)
    with pytest.raises(Diverged) as per_window:  # the trainer's own watch: one look per window
        run_trial(config, log=quiet)
    monkeypatch.setattr(DivergenceWatch, "for_device", classmethod(lambda cls, _: cls(1)))
    with pytest.raises(Diverged) as per_step:
        run_trial(config, log=quiet)
    assert per_window.value.iteration == per_step.value.iteration < 40
    assert str(per_window.value.losses) == str(per_step.value.losses)


def test_the_evaluator_measures_on_cuda_as_on_the_cpu():
    dataset = load_dataset("mnist5k")
    evaluator = load_or_train_evaluator(dataset, log=quiet)
    images = dataset.test_images[:2000]
    on_cpu = evaluator.to("cpu").measure(images)
    on_gpu = evaluator.to("cuda").measure(images.to("cuda"))
    agree = (on_cpu.labels.cpu() == on_gpu.labels.cpu()).float().mean().item()
    assert agree >= 0.999
    assert on_gpu.scalars()["mean_image_entropy"] == pytest.approx(
        on_cpu.scalars()["mean_image_entropy"], abs=1e-3
    )


@pytest.mark.parametrize("seeds, pack", [("0", 1), ("0, 1", 2)])
def test_gvae_reproduce_gives_identical_numbers_on_the_same_gpu(seeds, pack, tmp_path, capsys):
    import ray

    study = tmp_path / "gpu.yaml"
    study.write_text(
        "name: gpu\ndataset: mnist5k\nmodels: [gan, cvaegan]\niterations: 40\neval_every: 20\n"
        "fixed: {batch_size: 16, eval_samples: 300, device: cuda}\n"
        f"search: {{grid: {{seed: [{seeds}]}}}}\nresources: {{cpus: 1, gpus: 0.5, pack: {pack}}}\n"
    )
    storage = str(tmp_path / "results")
    try:
        assert main(["study", "run", str(study), "--storage", storage]) == 0
    finally:
        ray.shutdown()
    capsys.readouterr()
    assert main(["reproduce", "gpu", "--storage", storage]) == 0
    printed = capsys.readouterr().out
    assert "identical to the recorded trial" in printed, printed
    row = pd.read_parquet(Path(storage) / "gpu" / "reproductions.parquet").iloc[-1]
    assert row["identical"] and row["same_device"] and str(row["device"]).startswith("cuda")


PACK_SEEDS = (3, 7, 11)


@GRAPH
@pytest.mark.parametrize("model", ["gan", "wgan", "vae", "vaegan", "cvaegan"])
def test_a_pack_is_deterministic_on_cuda_and_its_members_start_as_their_lone_trials(model, graph):
    configs = [tiny(model, seed=seed, d=0.3, graph=graph) for seed in PACK_SEEDS]
    first = run_pack(configs, log=quiet)
    second = run_pack(configs, log=quiet)
    for a, b in zip(first, second, strict=True):
        assert a.device.startswith("cuda") and a.diverged is None
        assert numbers(a) == numbers(b)
        assert a.final["image_entropies"] == b.final["image_entropies"]
    lone = run_trial(configs[1], log=quiet)
    losses = [key for key in lone.curve[0] if key.endswith("_loss")]
    for key in losses:  # the first window's mean losses, to the rounding of batched matmuls
        assert first[1].curve[0][key] == pytest.approx(lone.curve[0][key], rel=1e-2, abs=1e-3)


@GRAPH
def test_a_pack_resumes_from_its_checkpoint_on_cuda(tmp_path, graph):
    configs = [tiny("cvaegan", seed=seed, graph=graph) for seed in PACK_SEEDS]
    straight = run_pack(configs, log=quiet)

    def keep(_rows, directory: Path) -> None:
        (tmp_path / CHECKPOINT_FILE).write_bytes((directory / CHECKPOINT_FILE).read_bytes())

    run_pack(
        [tiny("cvaegan", seed=seed, iterations=10, graph=graph) for seed in PACK_SEEDS],
        report=keep,
        log=quiet,
    )
    resumed = run_pack(configs, resume_from=tmp_path, log=quiet)
    for a, b in zip(straight, resumed, strict=True):
        assert numbers(a) == numbers(b)


@pytest.mark.parametrize("model", ["gan", "wgan", "vae", "vaegan", "cvaegan"])
def test_a_graph_trial_is_near_the_eager_trial(model):
    graph = run_trial(tiny(model, graph="on"), log=quiet)
    eager = run_trial(tiny(model), log=quiet)
    for key in [key for key in eager.curve[0] if key.endswith("_loss")]:  # the first window
        assert graph.curve[0][key] == pytest.approx(eager.curve[0][key], rel=1e-4, abs=1e-5), key


def test_graph_trials_in_two_fresh_processes_give_identical_numbers(tmp_path):
    import subprocess
    import sys

    curves = []
    for run in ("first", "second"):
        out = tmp_path / run
        command = [sys.executable, "-m", "gvae.cli", "train", "--model", "cvaegan"]
        command += ["--device", "cuda", "--graph", "on", "--iterations", "200"]
        command += ["--eval-every", "100", "--eval-samples", "300", "--out", str(out)]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        rows = pd.read_parquet(out / "curve.parquet").to_dict("records")
        exact = [
            {k: repr(getattr(v, "tolist", lambda v=v: v)()) for k, v in row.items()} for row in rows
        ]
        curves.append([{k: v for k, v in row.items() if k not in DROP} for row in exact])
    assert curves[0] == curves[1]
