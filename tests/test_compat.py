"""What gvae.study.compat relies on in the installed Ray: each test fails the day Ray changes it,
and the workaround then goes (or changes) with it."""

from __future__ import annotations

import inspect
import math
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import optuna
import pyarrow.fs as pafs
import pytest
from ray import tune
from ray.tune import Experiment
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch as RayOptunaSearch

from gvae.io import AtomicLocalHandler, RetryingS3FileSystem, resolve
from gvae.study import compat
from gvae.study.folder import journal_storage


def test_the_plain_output_engine_is_chosen_by_tunes_environment_variable(monkeypatch):
    from ray.tune.experimental.output import get_air_verbosity

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")  # Tune's default; restored after the test
    assert get_air_verbosity(0) is not None  # the new engine, which prints its header
    compat.quiet_tune_output(verbose=False)
    assert get_air_verbosity(0) is None  # the plain one, silent at verbosity 0


def test_tune_reads_the_snapshot_warning_threshold_compat_sets():
    from ray.tune.execution import experiment_state

    variable = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"
    assert variable in inspect.getsource(experiment_state)


def test_tune_still_fails_a_trial_whose_named_checkpoint_is_gone():
    # What compat.FallBackToNewestCheckpoint works around: Tune deletes a trial's older
    # checkpoint when a newer one is registered, snapshots its state only at the next step
    # (`num_to_keep` checkpoints after the last snapshot), and refuses to restore from a
    # checkpoint that is gone. The day one of these changes, the workaround is looked at again.
    from ray.tune.execution import tune_controller
    from ray.tune.trainable import Trainable

    assert "Could not recover from checkpoint as it does not exist" in inspect.getsource(
        Trainable.restore
    )
    assert "sync_every_n_trial_checkpoints=self._trial_checkpoint_config.num_to_keep" in (
        inspect.getsource(tune_controller)
    )


def tell_nan(searcher_class: type) -> str:
    """The state Optuna records for a trial that ended with a NaN objective."""
    storage = optuna.storages.InMemoryStorage()
    searcher = searcher_class(
        space={"lam": tune.uniform(0.0, 1.0)},
        metric="mode_entropy",
        mode="max",
        study_name="s",
        storage=storage,
    )
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"mode_entropy": math.nan})
    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    return trial.state.name


def test_tunes_optuna_search_leaves_a_nan_trial_running_and_compats_fails_it():
    assert tell_nan(RayOptunaSearch) == "RUNNING"  # Optuna refused COMPLETE with NaN
    assert tell_nan(compat.OptunaSearch) == "FAIL"


def test_a_restored_optuna_search_writes_the_journal_where_the_study_is_now(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    space = {"lam": tune.uniform(0.0, 1.0)}
    first = compat.OptunaSearch(
        space=space, metric="m", mode="max", study_name="s", journal=str(old / "j")
    )
    first.suggest("t0")
    first.save(str(tmp_path / "searcher.pkl"))
    old.rename(new)  # the study folder moved, as a user may move or sync it

    restored = compat.OptunaSearch(
        space=space, metric="m", mode="max", study_name="s", journal=str(new / "j")
    )
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("t0", {"m": 0.5})
    restored.suggest("t1")
    study = optuna.load_study(study_name="s", storage=journal_storage(str(new / "j")))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    assert not old.exists()


def test_a_restored_optuna_search_on_a_database_fails_the_suggestions_its_state_lacks(tmp_path):
    # A driver killed after Optuna made a suggestion, before Tune saved the searcher's state:
    # the resumed searcher never hears of it, so Optuna's RUNNING trial is failed, not left.
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = {"lam": tune.uniform(0.0, 1.0)}

    def searcher() -> compat.OptunaSearch:
        storage = optuna.storages.RDBStorage(url)
        return compat.OptunaSearch(
            space=space, metric="m", mode="max", study_name="s", storage=storage
        )

    first = searcher()
    first.suggest("t0")
    first.save(str(tmp_path / "searcher.pkl"))
    first.suggest("t1")  # after the snapshot: lost with the driver
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("t0", {"m": 0.5})
    study = optuna.load_study(study_name="s", storage=url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]


def journal_search(journal: str, mirror: tuple | None = None) -> compat.OptunaSearch:
    """An Optuna search kept in `journal` on this disk, copied to `mirror` (filesystem, path)."""
    space = {"lam": tune.uniform(0.0, 1.0)}
    return compat.OptunaSearch(
        space=space, metric="m", mode="max", study_name="s", journal=journal, mirror=mirror
    )


def test_a_journal_kept_on_the_drivers_disk_reaches_its_mirror_with_each_saved_state(tmp_path):
    local, mirror = tmp_path / "driver" / "j", tmp_path / "study" / "j"
    local.parent.mkdir()
    mirror.parent.mkdir()
    search = journal_search(str(local), (pafs.LocalFileSystem(), str(mirror)))
    search.suggest("t0")
    assert not mirror.exists()  # written only with a saved state
    search.save_to_dir(str(tmp_path), session_str="x")
    search.suggest("t1")
    study = optuna.load_study(study_name="s", storage=journal_storage(str(mirror)))
    assert [t.state.name for t in study.trials] == ["RUNNING"]  # as of the saved state


class WitnessHandler(AtomicLocalHandler):
    """A local filesystem that notes, at each file it writes, whether `watched` exists yet."""

    def __init__(self, watched: str) -> None:
        super().__init__(whole_in=os.path.dirname(watched))
        self.watched, self.seen = watched, []

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        self.seen.append(os.path.exists(self.watched))
        return super().open_output_stream(path, metadata)


def test_the_journal_reaches_its_mirror_before_the_searcher_state_that_knows_it(tmp_path):
    # Tune uploads a saved state in the background, and an upload still running can carry the
    # next save's state: the mirror must hold the journal before that state exists.
    local, mirror, state = tmp_path / "j", tmp_path / "mirror", tmp_path / "searcher.pkl"
    witness = WitnessHandler(str(state))
    search = journal_search(str(local), (pafs.PyFileSystem(witness), str(mirror)))
    search.suggest("t0")
    search.save(str(state))
    assert witness.seen == [False] and state.exists()


def limited_search(journal: str) -> ConcurrencyLimiter:
    return ConcurrencyLimiter(journal_search(journal), max_concurrent=1)


def test_a_searcher_restored_from_a_save_older_than_its_trials_hears_how_they_ended(tmp_path):
    # Tune's background upload can carry a trial that ended beside a searcher that never heard
    # of it: restored, the searcher waits for that trial for good.
    journal, saved = str(tmp_path / "j"), str(tmp_path / "searcher.pkl")
    first = limited_search(journal)
    first.suggest("t0")
    state = first.get_state()
    first.save(saved)
    restored = limited_search(journal)
    restored.set_state(state)
    restored.restore(saved)
    assert restored.suggest("t1") is None  # the limit's slot is still t0's

    ended = SimpleNamespace(trial_id="t0", status="TERMINATED", last_result={"m": 0.5})
    catch_up = compat.CatchUpSearcher(restored)
    catch_up.on_step_begin(iteration=0, trials=[ended])
    catch_up.on_step_begin(iteration=1, trials=[ended])  # once, at the first step
    restored.on_trial_complete("t0", {"m": 0.9})  # told already: ignored
    assert restored.suggest("t1") is not None
    study = optuna.load_study(study_name="s", storage=journal_storage(journal))
    assert [(t.state.name, t.value) for t in study.trials] == [("COMPLETE", 0.5), ("RUNNING", None)]


def first_trial_after_a_resume(generator_class: type, tmp_path, **target) -> str:
    """Where the first trial of a grid generator restored from a saved state is stored when the
    experiment saved under old/ resumes under new/."""
    experiment = Experiment(
        "tune",
        run=lambda config: None,
        config={"x": tune.choice([1, 2])},
        storage_path=str(tmp_path / "old"),
        num_samples=2,
    )
    first = generator_class(points_to_evaluate=[{"x": 1}, {"x": 2}], **target)
    first.add_configurations([experiment])
    first.next_trial()
    first.save_to_dir(str(tmp_path), session_str="s")
    restored = generator_class(points_to_evaluate=[{"x": 1}, {"x": 2}], **target)
    restored.restore_from_dir(str(tmp_path))
    return restored.next_trial().storage.storage_fs_path


def test_a_restored_grid_creates_trials_where_the_experiment_was_and_compats_where_it_is(tmp_path):
    old = first_trial_after_a_resume(BasicVariantGenerator, tmp_path)
    assert old == str(tmp_path / "old")  # Tune's: the experiment's first place
    new = first_trial_after_a_resume(
        compat.VariantGenerator,
        tmp_path,
        storage_path=str(tmp_path / "new"),
        filesystem=pafs.LocalFileSystem(),
    )
    assert new == str(tmp_path / "new")


def test_ray_init_on_the_main_thread_installs_a_sigterm_handler_that_compat_overrides():
    probe = (
        "import signal, ray\n"
        "from gvae.study import compat\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "rays = signal.getsignal(signal.SIGTERM)\n"
        "with compat.sigterm_interrupts():\n"
        "    ours = signal.getsignal(signal.SIGTERM)\n"
        "print(rays not in (signal.SIG_DFL, None), ours is not rays,"
        " signal.getsignal(signal.SIGTERM) is rays)\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True True True"


SPARED_PROBE = """
import os, signal, psutil, ray
from gvae.study import compat
with compat.sigterm_spared_daemons():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
print("driver", signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set()))
@ray.remote
def worker_mask():
    return signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set())
print("worker", ray.get(worker_mask.remote()))
for process in psutil.Process().children(recursive=True):
    if process.name() in ("raylet", "gcs_server"):
        os.kill(process.pid, signal.SIGTERM)  # as a SIGTERM to the whole group would
print("alive", ray.get(worker_mask.remote()))
ray.shutdown()
"""


def test_a_local_rays_daemons_and_workers_keep_sigterm_blocked_so_a_group_sigterm_spares_them():
    # compat.sigterm_spared_daemons relies on Ray's daemons and workers keeping the signal mask
    # they inherit: the day one of them unblocks SIGTERM, this fails.
    done = subprocess.run(
        [sys.executable, "-c", SPARED_PROBE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()[-3:]
    assert lines == ["driver False", "worker True", "alive True"], done.stdout


def test_pyarrow_pickles_an_s3_filesystem_without_its_retry_strategy_and_gvaes_keeps_it():
    # gvae.io.RetryingS3FileSystem exists for this (apache/arrow GH-47348): the day pyarrow's
    # pickle keeps the retry strategy, the first assertion fails and that class can go.
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=20)
    plain = pafs.S3FileSystem(endpoint_override="127.0.0.1:9", scheme="http", retry_strategy=retry)
    _, (options,) = plain.__reduce__()
    assert "retry_strategy" not in options
    fs, _ = resolve("s3://bucket/study?endpoint_override=127.0.0.1:9&scheme=http")
    restored = pickle.loads(pickle.dumps(fs))
    assert isinstance(restored, RetryingS3FileSystem)
    assert restored.options == fs.options and restored.options["endpoint_override"] == "127.0.0.1:9"


SIGTERM_PROBE = """
import os, signal, sys
from gvae.study import compat
if sys.argv[1] == "ignored":  # as for a job a script starts in the background
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:  # a handler of its own, as Tune's run installs
    signal.signal(signal.SIGINT, lambda *_: print("sigint handler"))
try:
    with compat.sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        print("went on")
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize(
    "sigint, expected",
    [("ignored", "interrupted"), ("handled", "sigint handler went on")],
)
def test_sigterm_runs_what_ctrl_c_would_even_where_sigint_is_ignored(sigint, expected):
    command = [sys.executable, "-c", SIGTERM_PROBE, sigint]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert " ".join(done.stdout.split("\n")).strip() == expected
