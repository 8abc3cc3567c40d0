"""Faults a cluster produces, on a real Ray cluster with real subprocess drivers: SIGTERM, a
second crash, a corrupt checkpoint, a corrupt table, a moved study folder."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
from ray import tune

from gvae.study import compat
from tests.test_faults import LONG, finish, gvae, rows, wait_for
from tests.test_study import tables, write_study

pytestmark = pytest.mark.slow

FOUR = {"grid": {"seed": [0, 1, 2, 3]}}
TRACEBACKS = ("Traceback", "FileNotFoundError", "Error handling checkpoint")


def killed_after(driver: subprocess.Popen, storage: Path, name: str, finished: int) -> None:
    """Kill the driver (SIGKILL) once `finished` trials have finished."""
    wait_for(lambda: (rows(storage, name).status == "finished").sum() >= finished)
    driver.send_signal(signal.SIGKILL)
    driver.wait()


def run_to_the_end(cluster, name: str, storage: Path) -> str:
    code, output = finish(gvae(cluster, "study", "resume", name, "--storage", str(storage)))
    assert code == 0, output[-3000:]
    return output


def test_sigterm_saves_the_state_prints_the_line_and_exits_130(cluster, tmp_path):
    study = write_study(tmp_path, "term", models=["vae"], search=FOUR, **LONG)
    driver = gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path))
    wait_for(lambda: (rows(tmp_path, "term").status == "finished").sum() >= 1)
    driver.send_signal(signal.SIGTERM)  # as `ray job stop`, Kubernetes and Slurm stop a driver
    code, output = finish(driver, timeout=30)  # within a scheduler's grace period
    assert code == 130, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("gvae: interrupted: study term has "), last
    done = int(last.split(" has ")[1].split()[0])
    assert done >= 1

    # Tune's state was saved: the resume begins with the finished trials done.
    output = run_to_the_end(cluster, "term", tmp_path)
    first = next(line for line in output.splitlines() if line.startswith("["))
    assert int(first[1:].split("/")[0]) >= done, first
    trials, curves = tables(tmp_path, "term")
    assert len(trials) == 4 and set(trials.status) == {"finished"}
    assert len(curves) == 16 and not curves.duplicated(["trial_id", "iteration"]).any()


def test_a_second_crash_loses_no_finished_trial(cluster, tmp_path):
    study = write_study(tmp_path, "twice", models=["vae"], search=FOUR, **LONG)
    run = ["study", "run", str(study), "--storage", str(tmp_path)]
    killed_after(gvae(cluster, *run), tmp_path, "twice", finished=1)
    killed_after(gvae(cluster, *run), tmp_path, "twice", finished=3)  # the resume, killed too
    output = run_to_the_end(cluster, "twice", tmp_path)
    for text in TRACEBACKS:
        assert text not in output, output[-3000:]
    trials, curves = tables(tmp_path, "twice")
    assert len(trials) == 4 and set(trials.status) == {"finished"}
    assert (trials.iterations_done == 1000).all()
    assert len(curves) == 16 and not curves.duplicated(["trial_id", "iteration"]).any()


def checkpoint_files(storage: Path, name: str, trial_id: str) -> list[Path]:
    return sorted((storage / name / "tune").glob(f"train_trial_{trial_id}_*/checkpoint_*/*.pt"))


def named_checkpoints(storage: Path, name: str) -> dict[str, Path]:
    """The checkpoint of each unfinished trial that the experiment state Tune last saved names:
    Tune saves it every 10 s or so, so a trial's first checkpoints may not be named yet."""
    try:
        analysis = tune.ExperimentAnalysis(str(storage / name / "tune"))
    except (ValueError, OSError):  # not saved yet, or caught mid-write
        return {}
    named = {}
    for trial in analysis.trials:
        checkpoint = analysis.get_last_checkpoint(trial)
        if trial.status != "TERMINATED" and checkpoint is not None:
            named[trial.trial_id] = Path(checkpoint.path)
    return named


def named_checkpoint(storage: Path, name: str) -> Path | None:
    return next(iter(named_checkpoints(storage, name).values()), None)


def test_a_corrupt_or_vanished_checkpoint_is_told_in_one_line_and_the_trial_starts_over(
    cluster, tmp_path
):
    # Long enough for Tune to save its state meanwhile; both trials at once.
    long = {**LONG, "iterations": 4000, "concurrency": 2}
    study = write_study(tmp_path, "cut", models=["vae"], search={"grid": {"seed": [0, 1]}}, **long)
    driver = gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path))

    def each_named_after_its_second() -> bool:  # so Tune's state keeps two of each trial's
        named = named_checkpoints(tmp_path, "cut")
        return len(named) == 2 and all(p.name >= "checkpoint_000001" for p in named.values())

    wait_for(each_named_after_its_second)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    cut, gone = sorted(rows(tmp_path, "cut").trial_id)
    # Each checkpoint Tune keeps, so that the one its saved state names, whichever, is cut short
    # for one trial and gone for the other (removed by hand, or by a storage lifecycle rule).
    # The first's older ones are gone too, as when Tune deleted them before its last save: Tune
    # deletes them again once the trial registers newer ones, and would log a traceback.
    named = named_checkpoints(tmp_path, "cut")[cut]
    for folder in {path.parent for path in checkpoint_files(tmp_path, "cut", cut)}:
        if folder.name < named.name:  # Tune's state lists the one before the named one
            shutil.rmtree(folder)
    for path in checkpoint_files(tmp_path, "cut", cut):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for folder in {path.parent for path in checkpoint_files(tmp_path, "cut", gone)}:
        shutil.rmtree(folder)

    output = run_to_the_end(cluster, "cut", tmp_path)
    notes = [line for line in output.splitlines() if " note " in line]
    assert len(notes) == 1 and "cannot be read; the trial starts over" in notes[0], output[-3000:]
    assert f"_{cut}_" in notes[0], notes[0]
    told = [line for line in output.splitlines() if "is gone, and no other is left" in line]
    assert len(told) == 1 and told[0].startswith(f"trial {gone}: "), output[-3000:]
    assert told[0].endswith("; it starts over"), told[0]
    assert "Traceback" not in output and "PytorchStreamReader" not in output
    assert "Could not fetch metrics" not in output, output[-3000:]
    assert "Could not recover" not in output, output[-3000:]
    trials, curves = tables(tmp_path, "cut")
    assert set(trials.status) == {"finished"} and trials.retries.tolist() == [0, 0]
    for trial_id in (cut, gone):
        curve = curves[curves.trial_id == trial_id].iteration.tolist()
        assert curve == list(range(250, 4001, 250)), (trial_id, curve)


@pytest.mark.parametrize("table", ["trials", "curves", "schema"])
def test_a_corrupt_table_fragment_is_named_in_one_line_and_rebuilt(cluster, tmp_path, table):
    study = write_study(tmp_path, "frag", models=["vae"], search={"grid": {"seed": [0, 1]}}, **LONG)
    driver = gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path))
    killed_after(driver, tmp_path, "frag", finished=1)
    before_trials, before_curves = tables(tmp_path, "frag")
    finished = before_trials[before_trials.status == "finished"].trial_id.iloc[0]
    folder = tmp_path / "frag" / f"{'curves' if table == 'curves' else 'trials'}.parquet"
    cut = folder / ("00-schema.parquet" if table == "schema" else f"part-{finished}.parquet")
    cut.write_bytes(cut.read_bytes()[:10])

    for command in (["study", "status", "frag"], ["report", "frag"]):
        done = subprocess.run(
            [sys.executable, "-m", "gvae.cli", *command, "--storage", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = done.stderr.strip().splitlines()
        if table == "schema" or (table == "curves" and command[0] == "study"):
            continue  # no rows in the schema file, and status reads no curves
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
        assert str(cut) in lines[0], lines[0]
        assert f"`gvae study repair frag --storage {tmp_path}`" in lines[0], lines[0]

    output = run_to_the_end(cluster, "frag", tmp_path)
    assert "Traceback" not in output, output[-3000:]
    trials, curves = tables(tmp_path, "frag")
    assert len(trials) == 2 and set(trials.status) == {"finished"}
    assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()
    kept = trials.set_index("trial_id").loc[finished]
    assert kept.final_image_entropies is not None and len(kept.final_image_entropies) == 300


def test_gvae_study_repair_rebuilds_a_deleted_table(cluster, tmp_path):
    study = write_study(tmp_path, "lost", models=["vae"], search={"grid": {"seed": [0, 1]}})
    code, output = finish(gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path)))
    assert code == 0, output[-3000:]
    straight, straight_curves = tables(tmp_path, "lost")

    def repair() -> None:
        command = ["study", "repair", "lost", "--storage", str(tmp_path)]
        done = subprocess.run(
            [sys.executable, "-m", "gvae.cli", *command],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    # The curves alone lost: they come back, and the trials table is left as it was.
    (tmp_path / "lost" / "curves.parquet").unlink()
    repair()
    trials, curves = tables(tmp_path, "lost")
    pd.testing.assert_frame_equal(curves, straight_curves)
    pd.testing.assert_frame_equal(trials, straight)

    (tmp_path / "lost" / "trials.parquet").unlink()
    (tmp_path / "lost" / "curves.parquet").unlink()
    repair()
    trials, curves = tables(tmp_path, "lost")
    columns = [c for c in straight.columns if c not in ("wall_seconds", "retries")]
    pd.testing.assert_frame_equal(
        trials[columns].sort_values("trial_id").reset_index(drop=True),
        straight[columns].sort_values("trial_id").reset_index(drop=True),
    )
    assert len(curves) == len(straight_curves)


def test_a_moved_study_folder_resumes_where_it_is_now(cluster, tmp_path):
    study = write_study(tmp_path, "mv", models=["vae"], search={"grid": {"seed": [0, 1]}}, **LONG)
    old, new = tmp_path / "old", tmp_path / "new"
    driver = gvae(cluster, "study", "run", str(study), "--storage", str(old))
    killed_after(driver, old, "mv", finished=1)
    shutil.move(old, new)  # copied to another disk, or synced down from S3

    output = run_to_the_end(cluster, "mv", new)
    assert "interrupted" not in output, output[-3000:]
    assert not old.exists()
    trials, curves = tables(new, "mv")
    assert len(trials) == 2 and set(trials.status) == {"finished"}
    assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()


def test_a_checkpoint_tune_removed_after_its_last_saved_state_leaves_the_newest(cluster, tmp_path):
    # Tune keeps the last two checkpoints of a trial: it removes an older one once a newer one
    # is registered, before its saved state names the newer one.
    long = {**LONG, "iterations": 4000}
    study = write_study(tmp_path, "gone", models=["vae"], search={"grid": {"seed": [0]}}, **long)
    driver = gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path))

    def named_and_another() -> bool:
        named = named_checkpoint(tmp_path, "gone")
        others = {p.parent for p in checkpoint_files(tmp_path, "gone", "*")} - {named}
        return named is not None and bool(others)

    wait_for(named_and_another)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    named = named_checkpoint(tmp_path, "gone")
    shutil.rmtree(named)
    newest = max(p.parent for p in checkpoint_files(tmp_path, "gone", "*"))

    output = run_to_the_end(cluster, "gone", tmp_path)
    (line,) = [line for line in output.splitlines() if f"checkpoint {named} is gone" in line]
    assert f"it resumes from its newest, {newest}, " in line, line
    assert "Could not recover" not in output and "Traceback" not in output, output[-3000:]
    trials, curves = tables(tmp_path, "gone")
    assert trials.status.tolist() == ["finished"] and trials.retries.tolist() == [0]
    assert curves.iteration.tolist() == list(range(250, 4001, 250))
    assert len({p.parent for p in checkpoint_files(tmp_path, "gone", "*")}) == 2  # as Tune keeps


def test_a_damaged_tune_state_is_refused_in_one_line_and_no_result_is_dropped(cluster, tmp_path):
    study = write_study(tmp_path, "state", models=["vae"], search={"grid": {"seed": [0, 1]}})
    code, output = finish(gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path)))
    assert code == 0, output[-3000:]
    experiment = tmp_path / "state" / "tune"
    (state,) = experiment.glob("experiment_state-*.json")
    fs = pafs.LocalFileSystem()
    assert compat.experiment_states(fs, str(experiment)) == [str(state)]
    assert compat.readable_experiment_state(fs, str(state))  # what Tune writes, read as Tune does
    straight = tables(tmp_path, "state")[0].sort_values("trial_id").reset_index(drop=True)

    def refused(expected: str) -> None:
        code, output = finish(gvae(cluster, "study", "resume", "state", "--storage", str(tmp_path)))
        assert code == 2, output[-3000:]
        last = output.strip().splitlines()[-1]
        assert last.startswith(f"gvae: error: study: {expected}"), last
        trials = tables(tmp_path, "state")[0].sort_values("trial_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(
            trials, straight.sort_values("trial_id").reset_index(drop=True)
        )
        assert sorted(experiment.glob("experiment_state-*.json")) == [state]  # none begun anew

    # Tune cannot restore its searcher's state: it would begin the study over under new ids.
    (searcher_state,) = experiment.glob("basic-variant-state-*.json")
    intact = searcher_state.read_bytes()
    searcher_state.write_bytes(intact[:50])
    refused(f"Tune could not restore state from its saved state in {experiment} (its error")
    searcher_state.write_bytes(intact)

    # Its experiment state cut short: refused before Ray starts.
    state.write_bytes(state.read_bytes()[:100])
    refused(f"Tune's saved state {state} is damaged and cannot be read; restore it from a copy")
