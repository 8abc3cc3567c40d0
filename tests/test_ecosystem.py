"""A study as the tools researchers already use see it: Optuna (`optuna.load_study` and a real
optuna-dashboard over HTTP), TensorBoard (its own event reader) and MLflow (a sqlite backend),
after one real packed Optuna study on a real Ray cluster."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from html import escape as html_escape
from pathlib import Path

import optuna
import pandas as pd
import pytest

from gvae.study.folder import journal_storage
from tests.raycluster import LocalRayCluster
from tests.test_study import write_study

pytestmark = pytest.mark.slow

SUGGESTIONS = 2


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, str]:
    """One Optuna study of two suggestions x two seeds, packed, tracked in MLflow; its storage
    folder and the MLflow tracking URI."""
    folder = tmp_path_factory.mktemp("ecosystem")
    mlflow_uri = f"sqlite:///{folder / 'mlflow.db'}"
    path = write_study(
        folder,
        "eco",
        models=["cvaegan"],
        search={
            "optuna": {
                "trials": SUGGESTIONS,
                "replicates": 2,
                "objectives": {"mode_entropy": "max", "mean_image_entropy": "min"},
                "space": {"lam": {"low": 0.1, "high": 10.0, "log": True}},
            }
        },
        resources={"cpus": 1, "pack": 2},
        tracking={"mlflow": {"tracking_uri": mlflow_uri, "experiment": "eco"}},
    )
    cluster = LocalRayCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.start_head(num_cpus=2)
        command = [sys.executable, "-m", "gvae.cli", "study", "run", str(path)]
        command += ["--storage", str(folder), "--address", cluster.address]
        done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=600)
    finally:
        cluster.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"optuna-dashboard {folder / 'eco' / 'optuna.journal'}" in done.stdout
    return folder, mlflow_uri


def test_optuna_load_study_finds_each_suggestion_once_with_the_seed_means(study):
    folder, _ = study
    loaded = optuna.load_study(
        study_name="eco", storage=journal_storage(str(folder / "eco" / "optuna.journal"))
    )
    trials = pd.read_parquet(folder / "eco" / "trials.parquet")
    assert [t.state.name for t in loaded.trials] == ["COMPLETE"] * SUGGESTIONS
    for trial in loaded.trials:
        seeds = trials[trials.lam == trial.params["lam"]]
        assert len(seeds) == 2
        assert trial.values[0] == pytest.approx(seeds.final_mode_entropy.mean())
        assert trial.values[1] == pytest.approx(seeds.final_mean_image_entropy.mean())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_optuna_dashboard_serves_the_study_and_its_trials(study):
    folder, _ = study
    port = free_port()
    dashboard = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "optuna-dashboard"),
            str(folder / "eco" / "optuna.journal"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == "eco"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
        assert [t["state"] for t in detail["trials"]] == ["Complete"] * SUGGESTIONS
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def test_tensorboard_reads_every_curve_scalar_of_every_pack_member_at_its_iteration(study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = study
    curves = pd.read_parquet(folder / "eco" / "curves.parquet")
    trials = pd.read_parquet(folder / "eco" / "trials.parquet")
    event_files = sorted((folder / "eco" / "tune").glob("train_trial_*/events.out.tfevents.*"))
    assert len(event_files) == SUGGESTIONS  # one per Tune trial: a pack
    for path in event_files:
        events = EventAccumulator(str(path))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        pack = trials[trials.pack.map(lambda p, path=path: f"train_trial_{p}_" in str(path))]
        for _, member in pack.iterrows():
            curve = curves[curves.trial_id == member.trial_id]
            # Every scalar of the member's curve: metrics, losses and timings.
            scalars = [
                name
                for name in curve.columns
                if name not in ("iteration", "study", "trial_id", "model", "class_histogram")
                and curve[name].notna().all()
            ]
            assert {"mode_entropy", "frechet_distance", "recon_loss", "gan_loss"} <= set(scalars)
            for metric in scalars:
                tag = f"ray/tune/members/seed{member.seed}/{metric}"
                assert tag in tags, sorted(tags)
                logged = {e.step: e.value for e in events.Scalars(tag)}
                assert sorted(logged) == curve.iteration.tolist()
                assert list(logged.values()) == pytest.approx(curve[metric].tolist(), rel=1e-6)
        steps = [event.step for event in events.Scalars("ray/tune/mode_entropy")]
        assert steps == sorted(set(curves.iteration))  # the pack's mean, what Optuna was told


def test_mlflow_has_one_run_per_trial_with_its_params_metrics_and_status(study):
    import mlflow

    folder, uri = study
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["eco"])
    assert len(runs) == SUGGESTIONS
    trials = pd.read_parquet(folder / "eco" / "trials.parquet")
    curves = pd.read_parquet(folder / "eco" / "curves.parquet")
    for _, run in runs.iterrows():
        assert run["params.model"] == "cvaegan" and float(run["params.lam"]) in set(trials.lam)
        assert run["tags.status"] == "finished" and run["status"] == "FINISHED"
        pack = trials[trials.lam == float(run["params.lam"])]
        assert run["metrics.mode_entropy"] == pytest.approx(pack.final_mode_entropy.mean())
        history = mlflow.MlflowClient(uri).get_metric_history(run["run_id"], "mode_entropy")
        curve = curves[curves.trial_id == pack.trial_id.iloc[0]]
        assert [metric.step for metric in history] == curve.iteration.tolist()  # by iteration


def test_the_report_draws_optunas_own_plots_from_the_journal(study, tmp_path):
    folder, _ = study
    done = subprocess.run(
        [sys.executable, "-m", "gvae.cli", "report", "eco", "--storage", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    written = {path.name for path in (tmp_path / "report" / "eco").iterdir()}
    for name in ("optuna_history_mode_entropy.png", "optuna_pareto_front.png"):
        assert name in written, sorted(written)
    html = (tmp_path / "report" / "eco" / "report.html").read_text()
    assert html_escape("Optuna's Pareto front") in html
