"""The study tables at scale: one fragment per trial while running, compacted at the end.

Real studies on a real Ray cluster (straight through against killed and resumed), and the
recorder driven by simulated Tune events where only the recorder is under test.
"""

from __future__ import annotations

import io
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from ray import tune

from gvae.evaluation import load_or_train_evaluator
from gvae.study.checkpoints import delete_older_checkpoints, newest_checkpoint
from gvae.study.progress import ConsoleProgress
from gvae.study.recorder import ParquetRecorder
from gvae.study.results import CURVES, TRIALS, ResultsStore
from gvae.study.trainable import move_arrays_into_checkpoint
from gvae.trainer import CHECKPOINT_FILE
from tests.raycluster import LocalRayCluster
from tests.test_study import gvae, run_ok, tables, write_study

# Columns that measure time or name the run, not the trial's outcome.
WALL_TIME = ["trial_id", "started_at", "wall_seconds", "iterations_per_second", "eval_seconds"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray_cluster = LocalRayCluster(tmp_path_factory.mktemp("ray"))
    try:
        ray_cluster.start_head(num_cpus=2)
        yield ray_cluster
    finally:
        ray_cluster.stop()


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

    # What a person reads: one line per Tune trial (a pack's one) and no Tune tables.
    runs = 4 // pack
    lines = straight_output.splitlines()
    ended = [line for line in lines if " finished " in line and line.startswith("[")]
    models = sorted(line.split()[2] for line in ended)
    assert len(ended) == runs and models == ["gan"] * (runs // 2) + ["vae"] * (runs // 2)
    assert ended[-1].startswith(f"[{runs}/{runs}] finished ")
    assert not any("╭" in line or "│" in line for line in lines)
    assert any(
        line.startswith(f"[{runs}/{runs}] {runs} done  0 running  0 pending") for line in lines
    )


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


# Simulated events: the recorder alone --------------------------------------------------------


@dataclass
class FakeTrial:
    """What the recorder reads of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    num_failures: int = 0
    status: str = "PENDING"
    last_result: dict[str, Any] = field(default_factory=dict)

    def get_error(self) -> str:
        return "Traceback ...\nRuntimeError: worker died"


def run_events(recorder: ParquetRecorder, trial: FakeTrial, evaluations: int = 3) -> list[int]:
    """A trial's events (start, results, complete); the bytes the store wrote for each."""
    store = recorder.store
    written = []

    def event(hook: str, **kwargs: Any) -> None:
        before = store.bytes_written
        getattr(recorder, hook)(iteration=0, trials=[], trial=trial, **kwargs)
        recorder.flush()
        written.append(store.bytes_written - before)

    event("on_trial_start")
    for k in range(1, evaluations + 1):
        result = {
            "iteration": 20 * k,
            "mode_entropy": 2.0 - 1 / k,
            "mean_image_entropy": 0.5 + 1 / k,
            "class_histogram": [0.1] * 10,
            "recon_loss": 100.0 / k,
            "kl_loss": 3.0,
            "time_total_s": float(k),
        }
        event("on_trial_result", result=result)
    # The final evaluation's arrays come in its checkpoint, as from gvae.study.trainable.
    arrays = {"image_entropies": [0.25] * 1000, "sample_labels": [3] * 100, "samples_png": "iV"}
    folder = Path(store.uri) / "checkpoints" / trial.trial_id
    folder.mkdir(parents=True, exist_ok=True)
    move_arrays_into_checkpoint(arrays, folder)
    event("on_checkpoint", checkpoint=tune.Checkpoint.from_directory(folder))
    event("on_trial_complete")
    return written


def trial(index: int) -> FakeTrial:
    return FakeTrial(f"abcde_{index:05d}", {"model": "vae", "iterations": 60, "seed": index})


def test_bytes_written_per_event_do_not_grow_with_the_number_of_trials(tmp_path):
    def last_trial_bytes(count: int) -> list[int]:
        recorder = ParquetRecorder(ResultsStore(str(tmp_path / str(count))), "s", {"v": "1"})
        for index in range(count - 1):
            run_events(recorder, trial(index))
        return run_events(recorder, trial(count - 1))

    small, large = last_trial_bytes(3), last_trial_bytes(60)
    assert len(small) == 6 and all(written > 0 for written in small)
    assert large == small  # the same events write the same bytes, whatever came before


def test_a_study_recorded_in_the_single_file_layout_resumes_into_fragments(tmp_path):
    store = ResultsStore(str(tmp_path))
    recorder = ParquetRecorder(store, "s", {"v": "1"})
    for index in range(3):
        run_events(recorder, trial(index))
    recorder.on_trial_start(iteration=0, trials=[], trial=trial(3))  # still running when killed
    recorder.compact()  # what the old layout looked like: one file per table
    assert (tmp_path / TRIALS).is_file() and len(pd.read_parquet(tmp_path / TRIALS)) == 4
    before = pd.read_parquet(tmp_path / TRIALS)

    resumed = ParquetRecorder(ResultsStore(str(tmp_path)), "s", {"v": "1"})
    resumed.on_step_begin(iteration=0, trials=[trial(i) for i in range(4)])
    run_events(resumed, trial(3))
    during = pd.read_parquet(tmp_path / TRIALS)
    assert (tmp_path / TRIALS).is_dir() and during.trial_id.is_unique and len(during) == 4
    resumed.on_experiment_end(trials=[])
    after = pd.read_parquet(tmp_path / TRIALS)
    curves = pd.read_parquet(tmp_path / CURVES)
    assert (tmp_path / TRIALS).is_file() and list(after.trial_id) == [
        trial(i).trial_id for i in range(4)
    ]
    assert set(after.status) == {"finished"} and len(curves) == 12
    pd.testing.assert_frame_equal(after.iloc[:3], before.iloc[:3])  # ended trials untouched
    assert after.final_image_entropies.map(len).tolist() == [1000] * 4


def test_an_interrupted_compaction_is_finished_by_the_next_run(tmp_path):
    store = ResultsStore(str(tmp_path))
    recorder = ParquetRecorder(store, "s", {"v": "1"})
    for index in range(2):
        run_events(recorder, trial(index))
    rows = pd.read_parquet(tmp_path / TRIALS)
    # The driver died after the compacted file was complete, before it replaced the folder.
    pq.write_table(pq.read_table(tmp_path / TRIALS), tmp_path / ".trials.parquet.compacted")
    ParquetRecorder(ResultsStore(str(tmp_path)), "s", {"v": "1"})
    assert (tmp_path / TRIALS).is_file() and not (tmp_path / ".trials.parquet.compacted").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / TRIALS), rows)


def test_a_reader_gets_every_row_while_a_compaction_or_a_split_is_midway(tmp_path):
    store = ResultsStore(str(tmp_path))
    recorder = ParquetRecorder(store, "s", {"v": "1"})
    for index in range(3):
        run_events(recorder, trial(index))
    rows = store.read(TRIALS)
    folder, compacted = tmp_path / TRIALS, tmp_path / ".trials.parquet.compacted"
    recorder.compact()
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


def test_a_diverged_and_a_failed_trial_are_recorded_and_printed(tmp_path):
    recorder = ParquetRecorder(ResultsStore(str(tmp_path)), "s", {"v": "1"})
    out = io.StringIO()  # not a terminal: plain lines, the progress line at the end
    progress = ConsoleProgress(3, params=("model", "seed"), stream=out, log_every=3600)
    progress.setup()
    ok, diverged, failed = trials = [trial(0), trial(1), trial(2)]

    run_events(recorder, ok)
    ok.last_result = {"iteration": 60, "mode_entropy": 1.9, "time_total_s": 1.0}
    progress.on_trial_result(0, trials, ok, ok.last_result)
    progress.on_trial_complete(0, trials, ok)
    diverged.last_result = {
        "diverged_at": 7,
        "diverged_error": "losses not finite",
        "time_total_s": 0.1,
    }
    failed.last_result = {"time_total_s": 2.0}
    for callback in (recorder, progress):
        callback.on_trial_result(0, trials, diverged, diverged.last_result)
        callback.on_trial_complete(0, trials, diverged)
        callback.on_trial_error(0, trials, failed)
    progress.on_experiment_end(trials)
    recorder.flush()

    rows = pd.read_parquet(tmp_path / TRIALS).set_index("trial_id")
    assert rows.loc[diverged.trial_id, ["status", "diverged_at", "iterations_done"]].tolist() == [
        "diverged",
        7,
        6,
    ]
    assert rows.loc[failed.trial_id, ["status", "error"]].tolist() == [
        "failed",
        "RuntimeError: worker died",
    ]
    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        "[1/3] finished vae seed=0  mode_entropy 1.900  1.0 s",
        "[2/3] diverged vae seed=1  losses not finite at iteration 7  0.1 s",
        "[3/3] failed vae seed=2  RuntimeError: worker died  2.0 s",
    ]
    assert len(lines) == 4 and lines[3].startswith(
        "[3/3] 1 done  0 running  0 pending  1 failed  1 diverged  0s elapsed  done  "
        "best mode_entropy 1.900 (vae seed=0)"
    )


def test_a_grid_starts_its_longest_trials_first():
    from gvae.study.driver import longest_first
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


def test_a_trial_resumes_from_and_keeps_its_newest_complete_checkpoint(tmp_path):
    trial_folder = tmp_path / "train_trial_x"
    for index, complete in [(0, True), (1, True), (2, False)]:  # 2: its file never arrived
        folder = trial_folder / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / CHECKPOINT_FILE).write_bytes(b"state")
    restored = tune.Checkpoint.from_directory(trial_folder / "checkpoint_000000")
    newest = newest_checkpoint(restored)  # Tune's snapshot pointed at an older one
    assert Path(newest.path).name == "checkpoint_000001"
    assert newest_checkpoint(newest).path == newest.path

    deleted = delete_older_checkpoints(restored.filesystem, restored.path)
    assert sorted(Path(path).name for path in deleted) == ["checkpoint_000000", "checkpoint_000002"]
    assert [p.name for p in trial_folder.iterdir()] == ["checkpoint_000001"]
