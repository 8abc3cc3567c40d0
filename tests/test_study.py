"""Real studies through a real Ray cluster: grid, Optuna, failures, a killed driver resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from gvae.config import TrialConfig
from gvae.study.folder import journal_storage
from gvae.trainer import run_trial
from tests.raycluster import LocalRayCluster

TINY = {
    "dataset": "mnist5k",
    "iterations": 40,
    "eval_every": 20,
    "fixed": {"batch_size": 16, "eval_samples": 300},
    "resources": {"cpus": 1},
}


def write_study(folder: Path, name: str, **fields) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **TINY, **fields}, sort_keys=False))
    return path


def gvae(cluster: LocalRayCluster, *args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "gvae.cli", *args, "--address", cluster.address]
    return subprocess.Popen(
        command,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def run_ok(cluster: LocalRayCluster, *args: str) -> str:
    process = gvae(cluster, *args)
    output, _ = process.communicate(timeout=600)  # the first study also trains the evaluator
    assert process.returncode == 0, output[-3000:]
    return output


def tables(storage: Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = storage / name
    return pd.read_parquet(folder / "trials.parquet"), pd.read_parquet(folder / "curves.parquet")


def checkpoints_per_trial(storage: Path, name: str) -> list[int]:
    """How many checkpoint folders each trial of the study's trials table kept in the folder
    Tune last ran it in. (A trial a killed driver started after Tune's last snapshot is started
    again under the same id in a folder named with a later time; the first stays, unknown.)"""
    trial_ids = tables(storage, name)[0].trial_id
    experiment = storage / name / "tune"
    last_folders = [max(experiment.glob(f"train_trial_{trial_id}_*")) for trial_id in trial_ids]
    return [len(list(folder.glob("checkpoint_*"))) for folder in last_folders]


def test_grid_study_writes_both_tables(cluster, tmp_path):
    fixed = {**TINY["fixed"], "cpu_threads": 2}  # Ray's default for a 1-CPU trial is 1
    study = write_study(
        tmp_path, "grid", models=["gan", "cvaegan"], search={"grid": {"seed": [0, 1]}}, fixed=fixed
    )
    output = run_ok(cluster, "study", "run", str(study), "--storage", str(tmp_path / "r"))
    assert "study grid: 4 finished" in output
    trials, curves = tables(tmp_path / "r", "grid")
    assert sorted(zip(trials.model, trials.seed, strict=True)) == [
        ("cvaegan", 0),
        ("cvaegan", 1),
        ("gan", 0),
        ("gan", 1),
    ]
    assert set(trials.status) == {"finished"} and set(trials.iterations_done) == {40}
    for column in ("lam", "d", "lr", "arch", "node", "device", "device_used", "git_commit"):
        assert column in trials.columns and trials[column].notna().all(), column
    assert trials.lr.tolist() == [2e-4] * 4  # resolved model default, not left blank
    assert trials.cpu_threads.tolist() == trials.threads.tolist() == [2] * 4
    assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()
    last = curves.sort_values("iteration").groupby("trial_id").last()
    merged = trials.merge(last, left_on="trial_id", right_index=True, suffixes=("", "_c"))
    assert (merged.final_mode_entropy == merged.mode_entropy).all()
    assert trials.final_image_entropies.map(len).eq(300).all()
    assert checkpoints_per_trial(tmp_path / "r", "grid") == [2] * 4  # of two evaluations each

    # Run again, the finished study only opens its tables and compacts them once more.
    again = run_ok(cluster, "study", "run", str(study), "--storage", str(tmp_path / "r"))
    assert "resuming study grid" in again and "study grid: 4 finished" in again
    for table in ("trials.parquet", "curves.parquet"):
        assert (tmp_path / "r" / "grid" / table).is_file(), table
    pd.testing.assert_frame_equal(tables(tmp_path / "r", "grid")[0], trials)


def test_a_grid_over_two_datasets_measures_each_trial_with_its_datasets_evaluator(
    cluster, tmp_path
):
    study = write_study(
        tmp_path,
        "two",
        dataset=["mnist5k", "stacked-mnist5k"],
        models=["vae"],
        iterations=20,
        search={"grid": {"seed": [0]}},
    )
    output = run_ok(cluster, "study", "run", str(study), "--storage", str(tmp_path / "r"))
    assert "best by final mode_entropy on stacked-mnist5k (ln 1000" in output
    trials = tables(tmp_path / "r", "two")[0].set_index("dataset")
    assert set(trials.status) == {"finished"} and len(trials) == 2
    assert trials.final_class_histogram.map(len).to_dict() == {
        "mnist5k": 10,
        "stacked-mnist5k": 1000,
    }
    assert trials.real_modes_covered.to_dict() == {"mnist5k": 10, "stacked-mnist5k": 1000}


def test_optuna_study_searches_two_objectives(cluster, tmp_path):
    space = {"lam": {"low": 0.1, "high": 10.0, "log": True}, "d": {"low": 0.0, "high": 1.0}}
    objectives = {"mode_entropy": "max", "mean_image_entropy": "min"}
    database = f"sqlite:///{tmp_path / 'optuna.db'}"  # an Optuna database, not the journal
    search = {"trials": 3, "objectives": objectives, "space": space, "storage": database}
    study = write_study(tmp_path, "opt", models=["cvaegan"], search={"optuna": search})
    output = run_ok(cluster, "study", "run", str(study), "--storage", str(tmp_path / "r"))
    assert f"optuna: watch the search live with `optuna-dashboard {database}`" in output
    trials, curves = tables(tmp_path / "r", "opt")
    assert len(trials) == 3 and set(trials.status) == {"finished"}
    assert trials.lam.between(0.1, 10.0).all() and trials.d.between(0.0, 1.0).all()
    assert trials.lam.nunique() == 3
    assert len(curves) == 6
    assert not (tmp_path / "r" / "opt" / "optuna.journal").exists()
    optuna_trials = optuna.load_study(study_name="opt", storage=database).trials
    assert sorted(t.params["lam"] for t in optuna_trials) == sorted(trials.lam)
    assert sorted(t.values[0] for t in optuna_trials) == sorted(trials.final_mode_entropy)


def test_optuna_replicates_train_each_suggestion_on_seeds(cluster, tmp_path):
    search = {
        "optuna": {
            "trials": 2,
            "replicates": 2,
            "objectives": {"mode_entropy": "max"},
            "space": {"lam": {"low": 0.1, "high": 10.0, "log": True}},
        }
    }
    study = write_study(tmp_path, "reps", models=["cvaegan"], search=search)
    run_ok(cluster, "study", "run", str(study), "--storage", str(tmp_path / "r"))
    trials, _ = tables(tmp_path / "r", "reps")
    assert len(trials) == 4 and set(trials.status) == {"finished"}
    by_suggestion = trials.groupby("suggestion")
    assert by_suggestion.ngroups == 2
    assert all(sorted(group.seed) == [0, 1] for _, group in by_suggestion)
    assert (by_suggestion.lam.nunique() == 1).all() and trials.lam.nunique() == 2


def test_a_trial_that_cannot_be_allocated_fails_at_once_while_the_rest_finish(cluster, tmp_path):
    # 30M images of 784 float32 pixels: a 94 GB batch, more than this machine has (24 GiB).
    study = write_study(
        tmp_path,
        "fails",
        models=["vae"],
        max_failures=2,
        search={"grid": {"batch_size": [16, 30_000_000]}},
    )
    process = gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path / "r"))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1, output[-3000:]  # a failed trial: exit status 1
    trials, _ = tables(tmp_path / "r", "fails")
    by_batch = trials.set_index("batch_size")
    assert by_batch.loc[16, "status"] == "finished"
    failed = by_batch.loc[30_000_000]
    assert failed.status == "failed" and failed.retries == 0  # not retried max_failures times
    assert failed.error.startswith("not retried (a batch or model that cannot be allocated)")
    assert "\n" not in failed.error
    assert "1 failed" in output and "1 finished" in output and failed.error in output


OPTUNA_SEARCH = {
    "optuna": {
        "trials": 4,
        "objectives": {"mode_entropy": "max"},
        "space": {"lam": {"low": 0.1, "high": 10.0, "log": True}},
    }
}


@pytest.mark.parametrize(
    "models,search,resume",
    [
        (["gan", "vae"], {"grid": {"seed": [0, 1]}}, "run"),
        (["cvaegan"], OPTUNA_SEARCH, "resume"),
    ],
    ids=["grid-run-again", "optuna-resume-by-name"],
)
def test_killed_driver_resumes_without_rerunning_finished_trials(
    cluster, tmp_path, models, search, resume
):
    study = write_study(tmp_path, "resume", models=models, concurrency=1, search=search)
    storage = tmp_path / "r"
    driver = gvae(cluster, "study", "run", str(study), "--storage", str(storage))
    trials_file = storage / "resume" / "trials.parquet"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if trials_file.exists() and (pd.read_parquet(trials_file).status == "finished").any():
            break
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = pd.read_parquet(trials_file)
    finished_before = before[before.status == "finished"].set_index("trial_id")
    assert 1 <= len(finished_before) < 4

    journal = storage / "resume" / "optuna.journal"
    if "optuna" in search:  # and the machine went down as Optuna wrote a line
        with journal.open("ab") as cut_short:
            cut_short.write(b'{"op_code": 4, "worker_id": "w", "trial_id"')
    again = ["run", str(study)] if resume == "run" else ["resume", "resume"]
    output = run_ok(cluster, "study", *again, "--storage", str(storage))
    assert "resuming study resume" in output
    trials, curves = tables(storage, "resume")
    assert len(trials) == 4 and trials.trial_id.is_unique
    assert set(trials.status) == {"finished"}
    assert not curves.duplicated(["trial_id", "iteration"]).any() and len(curves) == 8
    kept = trials.set_index("trial_id").loc[finished_before.index]
    assert (kept.wall_seconds == finished_before.wall_seconds).all()  # not re-run
    assert checkpoints_per_trial(storage, "resume") == [2] * 4  # Tune keeps the last two
    if "optuna" in search:  # the restored searcher goes on suggesting new points
        assert trials.lam.nunique() == 4 and trials.lam.between(0.1, 10.0).all()
        assert f"optuna: {journal} ended in a line cut short" in output
        searched = optuna.load_study(study_name="resume", storage=journal_storage(str(journal)))
        states = [t.state.name for t in searched.trials]
        assert states.count("COMPLETE") == 4 and "RUNNING" not in states, states


def test_a_crashed_trial_resumes_from_its_last_checkpoint(cluster, tmp_path):
    study = write_study(
        tmp_path,
        "crash",
        models=["vae"],
        iterations=400,
        eval_every=100,
        max_failures=2,
        search={"grid": {"seed": [0]}},
    )
    driver = gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path / "r"))
    curves_file = tmp_path / "r" / "crash" / "curves.parquet"
    killed = False
    deadline = time.monotonic() + 240
    while not killed and time.monotonic() < deadline:
        if curves_file.exists() and len(pd.read_parquet(curves_file)) >= 1:
            for process in cluster.trial_processes():
                process.kill()  # the trial's worker dies as in a crash or a lost node
                killed = True
        time.sleep(0.2)
    output, _ = driver.communicate(timeout=300)
    assert killed and driver.returncode == 0, output[-2000:]
    # One line that names the cause: the worker died.
    (retry,) = [line for line in output.splitlines() if " retrying " in line]
    assert retry.endswith(
        "retrying vae seed=0  The actor is dead because its worker process has died. (failure 1)"
    ), retry
    trials, curves = tables(tmp_path / "r", "crash")
    row = trials.iloc[0]
    assert row.status == "finished" and row.retries == 1
    assert curves.iteration.tolist() == [100, 200, 300, 400]
    assert checkpoints_per_trial(tmp_path / "r", "crash") == [2]
    # Tune's error files of the failed attempt go once the trial finishes; `retries` counts it.
    assert not list((tmp_path / "r" / "crash" / "tune").glob("*/error.*"))

    # Resumed from a checkpoint, the trial ends exactly where an uninterrupted run ends.
    torch.set_num_threads(int(row.threads))
    record = pq.read_table(tmp_path / "r" / "crash" / "trials.parquet").to_pylist()[0]
    config = TrialConfig.from_dict({f: record[f] for f in TrialConfig.__dataclass_fields__})
    straight = run_trial(config, log=lambda _: None).curve[-1]
    assert row.final_mode_entropy == straight["mode_entropy"]
    assert row.final_recon_loss == straight["recon_loss"]


def test_gpu_trials_on_a_cluster_without_gpus_stop_with_the_fix(cluster, tmp_path):
    study = write_study(
        tmp_path, "gpu", models=["vae"], search={"grid": {"seed": [0]}}, resources={"gpus": 1}
    )
    process = gvae(
        cluster, "study", "run", str(study), "--storage", str(tmp_path / "r"), "--gpu-wait", "1"
    )
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output[-2000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("gvae: error: resources.gpus:") and "set resources.gpus: 0" in last
    assert not (tmp_path / "r" / "gpu" / "trials.parquet").exists()


def test_study_status_reads_the_tables(cluster, tmp_path):
    study = write_study(tmp_path, "status", models=["vae"], search={"grid": {"seed": [0]}})
    run_ok(cluster, "study", "run", str(study), "--storage", str(tmp_path / "r"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gvae.cli",
            "study",
            "status",
            "status",
            "--storage",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert out.returncode == 0 and "study status: 1 finished" in out.stdout
