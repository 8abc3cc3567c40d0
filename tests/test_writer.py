"""The recorder's background writer: order, replaced writes, errors, and flushing before Tune's
experiment snapshot."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from gvae.study.recorder import ParquetRecorder
from gvae.study.results import TRIALS, ResultsStore
from gvae.study.writer import BackgroundWriter


def test_jobs_run_in_order_and_a_pending_job_is_replaced_by_a_newer_one_of_its_key():
    writer, done, gate = BackgroundWriter(), [], threading.Event()
    writer.submit("a", lambda: (gate.wait(5), done.append("a1")))  # holds the thread
    writer.submit("b", lambda: done.append("b1"))
    writer.submit("c", lambda: done.append("c1"))
    writer.submit("b", lambda: done.append("b2"))  # b1 has not started: b2 runs in its place
    gate.set()
    writer.flush()
    assert done == ["a1", "b2", "c1"]


def test_a_job_already_running_is_followed_by_the_newer_one_not_replaced():
    writer, done, started, gate = BackgroundWriter(), [], threading.Event(), threading.Event()
    writer.submit("a", lambda: (started.set(), gate.wait(5), done.append("a1")))
    assert started.wait(5)
    writer.submit("a", lambda: done.append("a2"))
    gate.set()
    writer.flush()
    assert done == ["a1", "a2"]


def test_a_failed_job_drops_the_pending_ones_and_raises_on_the_callers_next_call():
    writer, done, gate = BackgroundWriter(), [], threading.Event()

    def fail() -> None:
        gate.wait(5)
        raise OSError(28, "No space left on device")

    writer.submit("a", fail)
    writer.submit("b", lambda: done.append("b"))
    gate.set()
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    assert done == []
    writer.submit("c", lambda: done.append("c"))  # the error was raised once; writing goes on
    writer.flush()
    assert done == ["c"]


def test_the_writer_leaves_no_thread_behind_once_idle():
    writer = BackgroundWriter()
    writer.submit("a", lambda: time.sleep(0.05))
    writer.flush()
    time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "gvae-writer"]


class HeldStore(ResultsStore):
    """A store whose writes wait until `release` is set, as a slow upload to S3 would."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.release = threading.Event()

    def put(self, name, table, fragment=False):
        assert self.release.wait(10)
        super().put(name, table, fragment)


def test_hooks_return_before_the_write_and_tunes_snapshot_waits_for_it(tmp_path):
    store = HeldStore(str(tmp_path))
    recorder = ParquetRecorder(store, "s", {"v": "1"})
    trial = type("T", (), {"trial_id": "abcde_00000", "num_failures": 0})()
    trial.config = {"model": "vae", "iterations": 60, "seed": 0}
    recorder.on_trial_start(iteration=0, trials=[], trial=trial)  # returns with its write held
    assert not (tmp_path / TRIALS).exists() and store.bytes_written == 0
    threading.Timer(0.2, store.release.set).start()
    # Tune calls get_state on its callbacks while it snapshots the experiment state.
    assert recorder.get_state() is None
    rows = pd.read_parquet(tmp_path / TRIALS)
    assert rows.trial_id.tolist() == ["abcde_00000"] and rows.status.tolist() == ["running"]
