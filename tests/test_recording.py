"""The study tables at scale: one fragment per trial while running, compacted at the end.

Real studies on a real Ray cluster (straight through against killed and resumed), and the tables
written as trials and Tune's callbacks would write them, where only the tables are under test.
"""

from __future__ import annotations

import io
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from gvae.evaluation import load_or_train_evaluator
from gvae.study.outcome import DIVERGED_MEMBERS_KEY, Outcome, Status
from gvae.study.progress import ConsoleProgress
from gvae.study.results import CURVES, TRIALS
from gvae.study.spec import parse_study
from gvae.study.tables import StudyTables, Tables, compact, member_rows
from tests.raycluster import LocalRayCluster
from tests.test_study import gvae, run_ok, tables, write_study

# Columns that measure time or name the run, not the trial's outcome.
WALL_TIME = ["trial_id", "started_at", "wall_seconds", "iterations_per_second", "eval_seconds"]


@pytest.fixture(scope="module")
def evaluator_trained(mnist5k):
    """Train the session's evaluator here, outside the drivers' time limit (minutes under load)."""
    load_or_train_evaluator(mnist5k, log=lambda _: None)


def comparable(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The table without wall-time columns, rows in key order, lists as tuples (comparable)."""
    frame = frame.drop(columns=[c for c in WALL_TIME if c in frame.columns])
    frame = frame.map(lambda v: tuple(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)
    return frame.sort_values(keys).reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.parametrize("pack", [1, 2], ids=["trials", "packs"])
def test_killed_and_resumed_study_records_the_same_tables_as_a_straight_run(
    pack, cluster, evaluator_trained, tmp_path
):
    study = write_study(
        tmp_path,
        "same",
        models=["gan", "vae"],
        concurrency=1,
        search={"grid": {"seed": [0, 1]}},
        resources={"cpus": 1, "pack": pack},  # 2: each model's seeds as one pack (Tune trial)
    )
    straight_output = run_ok(cluster, "study", "run", str(study), "--storage", str(tmp_path / "a"))
    storage = tmp_path / "b"
    run_killed_and_resumed(cluster, study, storage)
    assert_same_tables(tmp_path / "a", storage, "same")

    # Compacted: one file per table, every trial exactly once, every evaluation exactly once.
    for folder in (tmp_path / "a" / "same", storage / "same"):
        assert (folder / TRIALS).is_file() and (folder / CURVES).is_file()
        trials, curves = tables(folder.parent, "same")
        assert sorted(zip(trials.model, trials.seed, strict=True)) == [
            ("gan", 0),
            ("gan", 1),
            ("vae", 0),
            ("vae", 1),
        ]
        assert trials.trial_id.is_unique and set(trials.status) == {"finished"}
        assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()
        assert set(curves.trial_id) == set(trials.trial_id)

    # What a person reads: one line per Tune trial (a pack's one) and no Tune tables; the
    # counts are of the tables' trials, a pack's members each once.
    runs = 4 // pack
    lines = straight_output.splitlines()
    ended = [line for line in lines if " finished " in line and line.startswith("[")]
    models = sorted(line.split()[2] for line in ended)
    assert len(ended) == runs and models == ["gan"] * (runs // 2) + ["vae"] * (runs // 2)
    assert [line.split()[0] for line in ended] == [f"[{k * pack}/4]" for k in range(1, runs + 1)]
    assert not any("╭" in line or "│" in line for line in lines)
    assert any(line.startswith("[4/4] 4 done  0 running  0 pending") for line in lines)


def run_killed_and_resumed(cluster: LocalRayCluster, study: Path, storage: Path) -> None:
    """Run the study, kill its driver once a trial has finished, and run it again to the end."""
    driver = gvae(cluster, "study", "run", str(study), "--storage", str(storage))
    trials_path = storage / study.stem / TRIALS
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if trials_path.is_dir() and (pd.read_parquet(trials_path).status == "finished").any():
            break  # read while the study runs: a dataset folder that pandas reads whole
        time.sleep(0.3)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert trials_path.is_dir(), "a killed driver does not compact"
    run_ok(cluster, "study", "run", str(study), "--storage", str(storage))


def assert_same_tables(straight_storage: Path, resumed_storage: Path, name: str) -> None:
    """Both tables equal but for wall times and the ids Tune gave the trials (and packs)."""
    straight, straight_curves = tables(straight_storage, name)
    resumed, resumed_curves = tables(resumed_storage, name)
    ids = ["pack"] if "pack" in straight else []
    pd.testing.assert_frame_equal(
        comparable(straight.drop(columns=ids), ["model", "seed"]),
        comparable(resumed.drop(columns=ids), ["model", "seed"]),
    )
    keys = ["model", "seed", "iteration"]
    straight_curves = straight_curves.merge(straight[["trial_id", "seed"]], on="trial_id")
    resumed_curves = resumed_curves.merge(resumed[["trial_id", "seed"]], on="trial_id")
    pd.testing.assert_frame_equal(
        comparable(straight_curves, keys), comparable(resumed_curves, keys)
    )


# The tables alone: trials' own writes and the driver's, as Tune would call them --------------


@dataclass
class FakeTrial:
    """What the driver's callbacks read of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    num_failures: int = 0
    status: str = "PENDING"
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None  # Tune's local error file; get_error reads storage
    metric_analysis: dict[str, dict[str, float]] = field(default_factory=dict)

    def get_error(self) -> str:
        return "Traceback ...\nRuntimeError: worker died"


def study_tables(folder: Path, total: int = 4) -> StudyTables:
    spec = parse_study(
        {
            "name": "s",
            "dataset": "mnist5k",
            "models": ["vae"],
            "iterations": 60,
            "eval_every": 20,
            "search": {"grid": {"seed": [0]}},
        }
    )
    return StudyTables(Tables.of(spec, str(folder), {"gvae_version": "1"}), total)


def trial(index: int) -> FakeTrial:
    return FakeTrial(f"abcde_{index:05d}", {"model": "vae", "iterations": 60, "seed": index})


def write_trial(tables: StudyTables, fake: FakeTrial, evaluations: int = 3) -> list[int]:
    """What a trial writes (its start, each evaluation, its end); the bytes of each write."""
    (rows,) = member_rows(fake.trial_id, fake.config)
    store, written = tables.store, []

    def write() -> None:
        before = store.bytes_written
        rows.write(tables.tables, store, {"node": "n"}, {"wall_seconds": 1.0, "started_at": 0.0})
        written.append(store.bytes_written - before)

    write()
    for k in range(1, evaluations + 1):
        point = {"iteration": 20 * k, "mode_entropy": 2.0 - 1 / k, "mean_image_entropy": 0.5}
        rows.curve.append({**point, "class_histogram": [0.1] * 10, "recon_loss": 100.0 / k})
        write()
    if evaluations * 20 == fake.config["iterations"]:
        rows.status = Status.FINISHED
        rows.arrays = {"image_entropies": [0.25] * 1000, "sample_labels": [3] * 100}
        write()
    return written


def test_a_trials_writes_cost_the_same_whatever_the_size_of_the_study(tmp_path):
    def last_trial_bytes(count: int) -> list[int]:
        tables = study_tables(tmp_path / str(count), count)
        tables.prepare()
        for index in range(count - 1):
            write_trial(tables, trial(index))
        return write_trial(tables, trial(count - 1))

    small, large = last_trial_bytes(3), last_trial_bytes(60)
    assert len(small) == 5 and all(written > 0 for written in small)
    assert large == small  # the same writes, the same bytes, whatever came before


def test_a_compacted_study_that_continues_is_split_into_fragments_and_compacted_again(tmp_path):
    tables = study_tables(tmp_path)
    tables.prepare()
    for index in range(3):
        write_trial(tables, trial(index))
    write_trial(tables, trial(3), evaluations=1)  # still running when the driver was killed
    compact(tables.store, tables.tables)
    assert (tmp_path / TRIALS).is_file() and len(pd.read_parquet(tmp_path / TRIALS)) == 4
    before = pd.read_parquet(tmp_path / TRIALS)

    resumed = study_tables(tmp_path)
    resumed.prepare()
    assert (tmp_path / TRIALS).is_dir()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / TRIALS), before)
    write_trial(resumed, trial(3))
    ended = [replace(trial(i), status="TERMINATED") for i in range(4)]
    resumed.on_experiment_end(trials=ended[:3])  # a trial not yet created: not complete
    assert (tmp_path / TRIALS).is_dir()
    resumed.on_experiment_end(trials=ended)
    after = pd.read_parquet(tmp_path / TRIALS)
    curves = pd.read_parquet(tmp_path / CURVES)
    assert (tmp_path / TRIALS).is_file() and list(after.trial_id) == [
        trial(i).trial_id for i in range(4)
    ]
    assert set(after.status) == {"finished"} and len(curves) == 12
    pd.testing.assert_frame_equal(after.iloc[:3], before.iloc[:3])  # ended trials untouched
    assert after.final_image_entropies.map(len).tolist() == [1000] * 4


def test_an_interrupted_compaction_is_finished_by_the_next_run(tmp_path):
    tables = study_tables(tmp_path)
    tables.prepare()
    for index in range(2):
        write_trial(tables, trial(index))
    rows = pd.read_parquet(tmp_path / TRIALS)
    # The driver died after the compacted file was complete, before it replaced the folder.
    pq.write_table(pq.read_table(tmp_path / TRIALS), tmp_path / ".trials.parquet.compacted")
    study_tables(tmp_path).prepare()
    assert not (tmp_path / ".trials.parquet.compacted").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / TRIALS), rows)


def test_a_reader_gets_every_row_while_a_compaction_or_a_split_is_midway(tmp_path):
    tables = study_tables(tmp_path)
    tables.prepare()
    for index in range(3):
        write_trial(tables, trial(index))
    store = tables.store
    rows = store.read(TRIALS)
    folder, compacted = tmp_path / TRIALS, tmp_path / ".trials.parquet.compacted"
    compact(store, tables.tables)
    # A compaction midway: the folder is gone, the complete file not yet moved in place.
    (tmp_path / TRIALS).rename(compacted)
    pd.testing.assert_frame_equal(store.read(TRIALS), rows)
    # A split midway: the file moved aside, the folder holding one trial's fragment so far.
    compacted.rename(tmp_path / ".trials.parquet.split")
    folder.mkdir()
    one = pq.read_table(tmp_path / ".trials.parquet.split").slice(0, 1)
    pq.write_table(one.schema.empty_table(), folder / "00-schema.parquet")
    pq.write_table(one, folder / f"part-{trial(0).trial_id}.parquet")
    pd.testing.assert_frame_equal(store.read(TRIALS), rows)


def test_a_diverged_a_failed_and_a_stopped_trial_are_recorded_and_printed(tmp_path):
    tables = study_tables(tmp_path, total=4)
    tables.prepare()
    out = io.StringIO()  # not a terminal: plain lines, the progress line at the end
    progress = ConsoleProgress(4, params=("model", "seed"), stream=out, log_every=3600)
    progress.setup()
    ok, diverged, failed, stopped = trials = [trial(0), trial(1), trial(2), trial(3)]

    write_trial(tables, ok)
    ok.last_result = {"iteration": 60, "mode_entropy": 1.9, "time_total_s": 1.0}
    (rows,) = member_rows(diverged.trial_id, diverged.config)
    rows.status, rows.error, rows.diverged_at = Status.DIVERGED, "losses not finite", 7
    rows.write(tables.tables, tables.store, {}, {"wall_seconds": 0.1, "started_at": 0.0})
    outcome = Outcome(Status.DIVERGED, "losses not finite", 7)
    diverged.last_result = {**outcome.result(), "time_total_s": 0.1}
    write_trial(tables, failed, evaluations=1)  # then its worker died, retries and all
    failed.last_result, failed.num_failures = {"time_total_s": 2.0}, 2
    write_trial(tables, stopped, evaluations=1)  # then ASHA stopped it
    stopped.last_result = {"iteration": 20, "mode_entropy": 1.2, "time_total_s": 0.5}
    for fake in (ok, diverged, stopped):
        for callback in (tables, progress):
            callback.on_trial_result(0, trials, fake, fake.last_result)
            callback.on_trial_complete(0, trials, fake)
        fake.status = "TERMINATED"
    tables.on_trial_error(0, trials, failed)
    progress.on_trial_error(0, trials, failed)
    progress.on_experiment_end(trials)

    rows = pd.read_parquet(tmp_path / TRIALS).set_index("trial_id")
    assert rows.loc[diverged.trial_id, ["status", "diverged_at", "iterations_done"]].tolist() == [
        "diverged",
        7,
        6,
    ]
    assert rows.loc[failed.trial_id, ["status", "error", "retries"]].tolist() == [
        "failed",
        "RuntimeError: worker died",
        2,
    ]
    assert rows.loc[stopped.trial_id, ["status", "iterations_done"]].tolist() == ["stopped", 20]
    assert rows.loc[ok.trial_id, "status"] == "finished"
    lines = out.getvalue().splitlines()
    assert lines[:4] == [
        "[1/4] finished vae seed=0  mode_entropy 1.900  1.0 s",
        "[2/4] diverged vae seed=1  losses not finite at iteration 7  0.1 s",
        "[3/4] stopped vae seed=3  mode_entropy 1.200  0.5 s",
        "[4/4] failed vae seed=2  RuntimeError: worker died  2.0 s",
    ]
    assert len(lines) == 5 and lines[4].startswith(
        "[4/4] 2 done  0 running  0 pending  1 failed  1 diverged  0s elapsed  done  "
        "best mode_entropy 1.900 (vae seed=0)"
    )


def test_a_resumed_run_makes_the_rows_agree_with_tunes_saved_state(tmp_path):
    tables = study_tables(tmp_path)
    tables.prepare()
    known, lost, ended, errored = trial(0), trial(1), trial(2), trial(3)
    for fake in (known, lost, ended, errored):
        write_trial(tables, fake, evaluations=1)  # each running when the driver was killed
    # Tune's snapshot: `lost` started after it; `ended` was stopped by the scheduler and
    # `errored` failed for good before it, after their last writes.
    ended.status, ended.last_result = "TERMINATED", {"iteration": 20}
    errored.status = "ERROR"
    resumed = study_tables(tmp_path)
    resumed.prepare()
    resumed.on_step_begin(iteration=0, trials=[known, ended, errored])
    rows = pd.read_parquet(tmp_path / TRIALS).set_index("trial_id")
    assert sorted(rows.index) == sorted(t.trial_id for t in (known, ended, errored))
    assert rows.status.to_dict() == {
        known.trial_id: "running",
        ended.trial_id: "stopped",
        errored.trial_id: "failed",
    }
    assert lost.trial_id not in set(pd.read_parquet(tmp_path / CURVES).trial_id)


def test_a_grid_starts_its_longest_trials_first():
    from gvae.study.search import longest_first
    from gvae.study.spec import load_study

    spec = load_study("studies/quick.yaml")
    order = [point["model"] for point in longest_first(spec, {"mnist5k": 784})]
    # WGAN: 5 critic steps + 1 generator step per iteration; VAE-GANs train three nets.
    seeds = len(spec.grid["seed"])
    assert order == [m for m in ("wgan", "vaegan", "cvaegan", "gan", "vae") for _ in range(seeds)]

    # Stacked MNIST's images hold three digits: its trials first.
    spec = load_study("studies/constraint.yaml")
    points = longest_first(spec, {"mnist5k": 784, "stacked-mnist5k": 3 * 784})
    assert [point["dataset"] for point in points] == ["stacked-mnist5k"] * 10 + ["mnist5k"] * 10


def test_the_eta_counts_down_between_trial_ends(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    progress = ConsoleProgress(5, params=("model", "seed"), stream=io.StringIO())
    progress.setup()
    first = trial(0)
    first.status = "TERMINATED"
    first.last_result = {"iteration": 60, "time_total_s": 60.0}
    now[0] += 60.0
    progress.on_trial_complete(0, [first], first)  # one of five ended after 60 s
    assert progress.progress_line().endswith("1m00s elapsed  ETA 4m00s")
    now[0] += 90.0  # none ended since: the estimate counts down instead of growing
    assert progress.progress_line().endswith("2m30s elapsed  ETA 2m30s")
    now[0] += 600.0
    assert progress.progress_line().endswith("12m30s elapsed  ETA 0s")


def test_the_progress_counts_a_packs_members_as_the_tables_do():
    out = io.StringIO()
    progress = ConsoleProgress(5, params=("model", "seeds", "seed"), stream=out, log_every=0)
    progress.setup()
    config = {"model": "vae", "iterations": 60}
    pack = FakeTrial("abcde_00000", {**config, "seeds": "0,1"}, status="RUNNING")
    lone = FakeTrial("abcde_00001", {**config, "seed": 2}, status="RUNNING")
    trials = [pack, lone]  # and a pack of 2 the searcher has not created yet
    progress.on_step_begin(0, trials)
    progress.on_step_end(0, trials)
    assert out.getvalue().startswith("[0/5] 0 done  3 running  2 pending  0 failed  0 diverged")

    pack.last_result = Outcome(Status.DIVERGED, "every member diverged", 7).result()
    progress.on_trial_complete(0, trials, pack)
    pack.status = "TERMINATED"
    lone.last_result = {"iteration": 60, "mode_entropy": 1.5}
    progress.on_trial_complete(0, trials, lone)
    lone.status = "TERMINATED"
    later = FakeTrial("abcde_00002", {**config, "seeds": "3,4"}, status="TERMINATED")
    # One of its members diverged while the other trained on to the end.
    later.last_result = {"iteration": 60, "mode_entropy": 1.7, DIVERGED_MEMBERS_KEY: 1}
    trials.append(later)
    progress.on_trial_complete(0, trials, later)
    progress.on_experiment_end(trials)
    lines = out.getvalue().splitlines()[1:]
    assert [line.split("  ")[0] for line in lines[:3]] == [
        "[2/5] diverged vae seeds=0,1",
        "[3/5] finished vae seed=2",
        "[5/5] finished vae seeds=3,4",
    ]
    assert lines[2].endswith("mode_entropy 1.700  (1 of 2 members diverged)"), lines[2]
    assert lines[3].startswith("[5/5] 2 done  0 running  0 pending  0 failed  3 diverged")

    # Resumed, the study counts the ended trials of its earlier run the same way.
    resumed = ConsoleProgress(5, params=("model", "seeds", "seed"), stream=io.StringIO())
    resumed.setup()
    resumed.on_step_begin(0, trials)
    resumed._draw(trials)
    assert resumed.progress_line().startswith("[5/5] 2 done  0 running  0 pending  0 failed  3 d")


def test_a_resumed_studys_progress_keeps_the_best_of_its_earlier_run():
    progress = ConsoleProgress(3, objective=("frechet_distance", "min"), stream=io.StringIO())
    progress.setup()
    ended, diverged, fresh = trial(0), trial(1), trial(2)
    ended.status = diverged.status = "TERMINATED"
    ended.metric_analysis = {"frechet_distance": {"max": 40.0, "min": 12.5, "last": 12.5}}
    nan = float("nan")
    diverged.metric_analysis = {"frechet_distance": {"max": nan, "min": nan, "last": nan}}
    progress.on_step_begin(0, [ended, diverged, fresh])
    assert progress.best == (12.5, "vae seed=0")
    fresh.last_result = {"iteration": 20, "frechet_distance": 20.0}
    progress.on_trial_result(0, [ended, diverged, fresh], fresh, fresh.last_result)
    assert progress.progress_line().endswith("best frechet_distance 12.500 (vae seed=0)")
