"""`gvae reproduce`: which trial, the comparison, and real re-runs of a tiny study's trial."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from analysis import load_study
from analysis.reproduce import (
    choose_suggestion,
    choose_trial,
    comparison_table,
    find_trial,
    trial_config,
)
from gvae.cli import main
from gvae.config import TrialConfig
from gvae.errors import GvaeError
from gvae.study.spec import Objective
from tests import tiny_studies


@pytest.fixture(scope="session")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_studies.storage(tmp_path_factory)


TRIALS = pd.DataFrame(
    [
        # trial_id, status, final mode entropy, final mean image entropy
        {"trial_id": "x_00000", "status": "finished", "mode": 2.0, "image": 0.9},
        {"trial_id": "x_00001", "status": "finished", "mode": 2.2, "image": 0.5},
        {"trial_id": "x_00002", "status": "finished", "mode": 2.2, "image": 0.4},
        {"trial_id": "x_00003", "status": "finished", "mode": 1.0, "image": 0.1},
        {"trial_id": "x_00004", "status": "diverged", "mode": 2.3, "image": 0.0},
    ]
).rename(columns={"mode": "final_mode_entropy", "image": "final_mean_image_entropy"})


def spec(search_type: str, **objectives: str) -> SimpleNamespace:
    goals = tuple(Objective(metric, mode) for metric, mode in objectives.items())
    return SimpleNamespace(search_type=search_type, objectives=goals)


def test_default_trial_follows_the_study_objective():
    trial, why = choose_trial(TRIALS, spec("grid"))
    assert trial == "x_00002" and "mode_entropy" in why  # the tie goes to the sharper one
    trial, _ = choose_trial(TRIALS, spec("optuna", mean_image_entropy="min"))
    assert trial == "x_00003"  # the diverged trial's 0.0 does not count
    # Front: 00002 (2.2, 0.4) and 00003 (1.0, 0.1). Scaled to [0, 1] over finished trials,
    # 00002 is 0.375 from the ideal corner (1, 1) and 00003 is 1.0.
    trial, why = choose_trial(TRIALS, spec("optuna", mode_entropy="max", mean_image_entropy="min"))
    assert trial == "x_00002" and "Pareto" in why


def test_trial_by_id_or_ending_and_only_finished_ones():
    assert find_trial(TRIALS, "x_00001")["trial_id"] == "x_00001"
    assert find_trial(TRIALS, "00003")["trial_id"] == "x_00003"
    with pytest.raises(GvaeError, match="did not finish"):
        find_trial(TRIALS, "00004")
    with pytest.raises(GvaeError, match="no trial match"):
        find_trial(TRIALS, "00009")


def test_comparison_lists_metrics_and_the_losses_either_side_has():
    recorded = {"evaluator_accuracy": 0.9, "final_mode_entropy": 2.0}
    recorded |= {"final_mean_image_entropy": 0.5, "final_g_loss": 1.0, "final_d_loss": None}
    reproduced = {"evaluator_accuracy": 0.9, "final_mode_entropy": 2.25}
    reproduced |= {"final_mean_image_entropy": 0.5, "final_g_loss": 1.0, "final_c_loss": 3.0}
    table = comparison_table(recorded, reproduced).set_index("metric")
    assert list(table.index) == [
        "evaluator_accuracy",
        "final_mode_entropy",
        "final_mean_image_entropy",
        "final_c_loss",
        "final_g_loss",
    ]
    assert table.loc["final_mode_entropy", "difference"] == 0.25
    assert table.loc["final_g_loss", "difference"] == 0.0
    assert pd.isna(table.loc["final_c_loss", "recorded"])  # missing on one side: never "equal"


def test_reproducing_a_trial_gives_identical_metrics(storage, capsys):
    code = main(["reproduce", "grid", "--storage", str(storage)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "identical to the recorded trial" in printed
    study = load_study("grid", str(storage))
    trial_id, _ = choose_trial(study.trials, study.spec)
    assert f"re-running trial {trial_id}" in printed

    reproductions = pd.read_parquet(storage / "grid" / "reproductions.parquet")
    row = reproductions.iloc[-1]
    assert row["trial_id"] == trial_id and row["identical"] and row["same_device"]
    recorded = study.trials.set_index("trial_id").loc[trial_id]
    for metric in ("final_mode_entropy", "final_mean_image_entropy"):
        assert row[f"reproduced_{metric}"] == recorded[metric] == row[f"recorded_{metric}"]
    losses = [c for c in reproductions if c.startswith("reproduced_final_") and "_loss" in c]
    assert losses and all(row[c] == recorded[c.removeprefix("reproduced_")] for c in losses)
    assert row["threads"] == recorded["threads"] and row["device"] == "cpu"


def test_reproducing_a_replicated_suggestion_reruns_each_seed(storage, capsys):
    code = main(["reproduce", "optuna", "--storage", str(storage)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    study = load_study("optuna", str(storage))
    ids, _ = choose_suggestion(study.trials, study.spec)
    assert len(ids) == 2 and printed.count("identical to the recorded trial") == 2
    reproductions = pd.read_parquet(storage / "optuna" / "reproductions.parquet")
    assert sorted(reproductions["trial_id"].tail(2)) == sorted(ids)
    assert reproductions["identical"].tail(2).all()


def test_a_different_result_on_the_same_device_fails(storage, tmp_path, capsys):
    shutil.copytree(storage / "diverging", tmp_path / "diverging")
    trials = pd.read_parquet(tmp_path / "diverging" / "trials.parquet")
    finished = trials["status"] == "finished"
    trials.loc[finished, "final_mode_entropy"] += 0.5  # a record the code cannot reproduce
    trials.to_parquet(tmp_path / "diverging" / "trials.parquet")
    assert not (tmp_path / "diverging" / "reproductions.parquet").exists()

    code = main(["reproduce", "diverging", "--storage", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "warning" in captured.err and "same device" in captured.err
    assert "final_mode_entropy" in captured.out
    after = pd.read_parquet(tmp_path / "diverging" / "reproductions.parquet")
    assert len(after) == 1
    row = after.iloc[0]
    assert not row["identical"]
    assert row["reproduced_final_mode_entropy"] == pytest.approx(
        row["recorded_final_mode_entropy"] - 0.5
    )


def test_a_damaged_record_of_re_runs_stops_before_any_re_run_trains(storage, tmp_path, capsys):
    shutil.copytree(storage / "diverging", tmp_path / "diverging")
    record = tmp_path / "diverging" / "reproductions.parquet"
    record.write_bytes(b"PAR1 cut short")
    code = main(["reproduce", "diverging", "--storage", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and "re-running trial" not in captured.out
    assert captured.err == (
        f"gvae: error: storage: {record} cannot be read as Parquet (it records the earlier "
        "re-runs); move it aside and run again, which begins a new one\n"
    )
    assert record.read_bytes() == b"PAR1 cut short"


def test_a_trial_recorded_before_a_config_field_existed_reruns_with_its_default():
    recorded = TrialConfig(model="vae", seed=3).resolved().to_dict()
    del recorded["cpu_threads"]  # a trials table written before the field was added
    config = trial_config(recorded, "cpu")
    assert config == TrialConfig(model="vae", seed=3, device="cpu").resolved()
