"""Faults real searches and clusters meet, on a real Ray cluster with real subprocess drivers:
diverged Optuna trials, requests no node can meet, two drivers on one study, Ctrl-C, a full disk.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
import psutil
import pyarrow.fs as pafs
import pytest
import torch

from gvae.io import StorageFull, atomic_local_filesystem, write_parquet
from gvae.study.folder import JOURNAL, journal_storage
from gvae.study.lease import StudyLease
from gvae.study.trainable import permanent_failure
from tests.raycluster import LocalRayCluster
from tests.test_study import tables, write_study

pytestmark = pytest.mark.slow

# lr 1e12 makes the VAE's loss infinite within a few steps: a trial that diverges.
DIVERGING_SPACE = {"lr": [0.001, 1.0e12]}


def gvae(cluster: LocalRayCluster, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A driver in its own process, joined to the test's cluster."""
    command = [sys.executable, "-m", "gvae.cli", *args, "--address", cluster.address]
    return subprocess.Popen(
        command,
        env={**cluster.env, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def wait_for(predicate, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def rows(storage: Path, name: str) -> pd.DataFrame:
    path = storage / name / "trials.parquet"
    return pd.read_parquet(path) if path.exists() else pd.DataFrame({"status": []})


def optuna_states(storage: Path, name: str) -> list[str]:
    """The states Optuna recorded, read by Optuna from the study's journal."""
    journal = journal_storage(str(storage / name / JOURNAL))
    study = optuna.load_study(study_name=name, storage=journal)
    return sorted(trial.state.name for trial in study.trials)


# 1. Diverged trials under Optuna ---------------------------------------------------------------


def test_diverged_optuna_trials_fail_in_optuna_and_the_study_goes_on(cluster, tmp_path):
    study = write_study(
        tmp_path,
        "optdiv",
        models=["vae"],
        search={
            "optuna": {
                "trials": 4,
                "objectives": {"mode_entropy": "max"},
                "space": DIVERGING_SPACE,
            }
        },
        scheduler={"asha": {"metric": "mode_entropy", "mode": "max"}},
    )
    code, output = finish(gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path)))
    assert code == 0, output[-3000:]
    trials, _ = tables(tmp_path, "optdiv")
    assert len(trials) == 4 and set(trials.status) <= {"finished", "stopped", "diverged"}
    diverged = trials[trials.status == "diverged"]
    assert len(diverged) >= 1 and (diverged.lr == 1.0e12).all()
    assert (trials[trials.status != "diverged"].lr == 0.001).all()
    # Optuna learned each diverged trial failed; it was given no invented value.
    states = optuna_states(tmp_path, "optdiv")
    assert states.count("FAIL") == len(diverged) and len(states) == 4
    assert "did not include the specified metric" not in output


# 2. Requests no node can meet ------------------------------------------------------------------

ONE = {"grid": {"seed": [0]}}
THREE_SEEDS = {"grid": {"seed": [0, 1, 2]}}


@pytest.mark.parametrize("joined", [False, True], ids=["local-ray", "cluster"])
def test_more_cpus_than_any_node_has_stop_at_once_with_the_fix(cluster, tmp_path, joined):
    study = write_study(tmp_path, "cpus", models=["vae"], resources={"cpus": 64}, search=ONE)
    command = [sys.executable, "-m", "gvae.cli", "study", "run", str(study)]
    command += ["--storage", str(tmp_path)]
    if joined:  # on a cluster: after the autoscaler wait (1 s here)
        command += ["--address", cluster.address, "--resource-wait", "1"]
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("gvae: error: resources.cpus: a trial asks for 64 CPUs but the ")
    assert "set resources.cpus: 2 or less" in last
    assert not (tmp_path / "cpus").exists()  # nothing half-written, not even the folder


def test_ctrl_c_before_the_study_began_exits_130_and_leaves_no_folder(cluster, tmp_path):
    study = write_study(tmp_path, "early", models=["vae"], resources={"cpus": 64}, search=ONE)
    run = ("study", "run", str(study), "--storage", str(tmp_path))
    driver = gvae(cluster, *run, "--resource-wait", "120")  # for a node that never comes
    seen = []
    for line in driver.stdout:  # the driver waits here, before the study begins
        seen.append(line)
        if line.startswith("waiting for the autoscaler"):
            break
    assert (tmp_path / "early" / "driver.lease").exists(), "".join(seen)
    driver.send_signal(signal.SIGINT)
    code, output = finish(driver)
    assert code == 130, output
    last = output.strip().splitlines()[-1]
    assert last == (
        "gvae: interrupted before study early began; nothing was recorded, and "
        "`gvae study run FILE` starts it"
    )
    assert not (tmp_path / "early").exists()


@pytest.mark.parametrize(("key", "value"), [("device", "cuda"), ("graph", "on")])
def test_cuda_trials_without_gpus_are_refused_before_ray_starts(tmp_path, key, value):
    study = write_study(tmp_path, "cuda", models=["vae"], fixed={key: value}, search=ONE)
    command = [sys.executable, "-m", "gvae.cli", "study", "run", str(study)]
    out = subprocess.run(
        [*command, "--storage", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"gvae: error: fixed.{key}: trials ask for a CUDA device but resources.gpus is 0, so Ray "
        f"gives them no GPU; set resources.gpus: 1 (or a fraction such as 0.5), or {key}: auto"
    ]
    assert "ray:" not in out.stdout  # Ray never started
    assert not (tmp_path / "cuda").exists()


# 3. Two drivers on one study -------------------------------------------------------------------

# Trials long enough (several seconds each, one at a time) that a signal or a second driver lands
# while the second one runs, even on an idle machine.
LONG = {"iterations": 1000, "eval_every": 250, "concurrency": 1}


def test_a_second_driver_is_refused_until_the_first_is_gone(cluster, tmp_path):
    study = write_study(tmp_path, "twin", models=["vae"], search={"grid": {"seed": [0, 1]}}, **LONG)
    run = ["study", "run", str(study), "--storage", str(tmp_path)]
    first = gvae(cluster, *run)
    wait_for(lambda: "running" in set(rows(tmp_path, "twin").status))
    code, output = finish(gvae(cluster, *run))
    assert code == 2, output[-2000:]
    last = output.strip().splitlines()[-1]
    pattern = (
        r"gvae: error: study: twin is already being run by the driver on host (\S+), pid (\d+), "
        r"started (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC); wait for it to end, or pass --force "
        r"if that driver is dead"
    )
    match = re.match(pattern, last)
    assert match and int(match[2]) == first.pid, last
    assert match[1] == os.uname().nodename

    first.send_signal(signal.SIGKILL)  # dies without releasing the lease
    first.wait()
    # Its lease has not lapsed, but its pid is gone on this host: no --force needed.
    code, output = finish(gvae(cluster, *run))
    assert code == 0, output[-3000:]
    trials, curves = tables(tmp_path, "twin")
    assert len(trials) == 2 and set(trials.status) == {"finished"}
    assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()
    assert not (tmp_path / "twin" / "driver.lease").exists()  # released at the end


def test_force_takes_a_study_over_and_the_first_driver_stops(cluster, tmp_path):
    study = write_study(
        tmp_path, "takeover", models=["vae"], search={"grid": {"seed": [0, 1]}}, **LONG
    )
    run = ["study", "run", str(study), "--storage", str(tmp_path)]
    first = gvae(cluster, *run, env={"GVAE_LEASE_SECONDS": "4"})
    wait_for(lambda: "running" in set(rows(tmp_path, "takeover").status))
    second = gvae(cluster, *run, "--force")
    code, output = finish(first)
    assert code == 130, output[-3000:]  # stopped as by Ctrl-C when its lease was taken
    assert "study takeover was taken over by the driver on host" in output
    code, output = finish(second)
    assert code == 0, output[-3000:]
    assert "--force: taking study takeover over from the driver on host" in output
    trials, curves = tables(tmp_path, "takeover")
    assert len(trials) == 2 and set(trials.status) == {"finished"}
    assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()


def test_force_waits_until_the_driver_it_took_the_study_from_has_stopped(tmp_path):
    # The old driver goes on saving and pruning checkpoints until it has stopped; the new one must
    # not restore the study's state before then.
    first = StudyLease(str(tmp_path), "handover", log=lambda _: None)
    first.acquire()  # a live driver of this process, heartbeat every 15 s
    second = StudyLease(str(tmp_path), "handover", log=lambda _: None)
    taking = threading.Thread(target=second.acquire, kwargs={"force": True})
    taking.start()
    time.sleep(1.0)
    assert taking.is_alive()  # waiting for the first to stop
    assert second.holder().token == second.token  # yet the study is already the second's
    first.release()  # stopped: leaves its handover note
    taking.join(timeout=5)
    assert not taking.is_alive()
    assert not (tmp_path / "driver.handover").exists()  # read and removed
    second.release()
    assert second.holder() is None


# 6. Exit codes and Ctrl-C ----------------------------------------------------------------------


def test_ctrl_c_exits_130_with_how_far_it_got_and_the_command_that_continues(cluster, tmp_path):
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = write_study(
        tmp_path,
        "sigint",
        models=["vae"],
        search={"grid": {"seed": [0, 1]}},
        tracking={"mlflow": {"tracking_uri": mlflow_uri}},
        **LONG,
    )
    driver = gvae(cluster, "study", "run", str(study), "--storage", str(tmp_path))
    wait_for(lambda: "finished" in set(rows(tmp_path, "sigint").status))
    driver.send_signal(signal.SIGINT)
    code, output = finish(driver)
    assert code == 130, output[-3000:]
    last = output.strip().splitlines()[-1]
    prefix = "gvae: interrupted: study sigint has 1 of 2 trials done (1 finished); `"
    assert last.startswith(prefix) and last.endswith("` continues it"), last
    resume = shlex.split(last[len(prefix) : -len("` continues it")])
    assert resume[:4] == ["gvae", "study", "resume", "sigint"]
    assert resume[4:] == ["--storage", str(tmp_path.resolve()), "--address", cluster.address]
    for hidden in ("Tuner.restore", "Failed to fetch metrics", "Traceback"):
        assert hidden not in output

    command = [sys.executable, "-m", "gvae.cli", *resume[1:]]
    again = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    trials, curves = tables(tmp_path, "sigint")
    assert len(trials) == 2 and set(trials.status) == {"finished"}
    assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()

    # MLflow: the trial the interrupt stopped went on in the run it began in.
    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("sigint").experiment_id
    runs = client.search_runs([experiment])
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        trial_id = next(t for t in trials.trial_id if run.data.tags["trial_name"].endswith(t))
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "mode_entropy")]
        assert sorted(set(steps)) == curves[curves.trial_id == trial_id].iteration.tolist()


# 5. A full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB tmpfs: room for one VAE checkpoint (about 10 MB) and the tables, not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_one_line_and_resume_finishes(cluster, small_disk, tmp_path):
    study = write_study(tmp_path, "full", models=["vae"], search={"grid": {"seed": [0, 1]}}, **LONG)
    code, output = finish(gvae(cluster, "study", "run", str(study), "--storage", str(small_disk)))
    assert code == 2, output[-3000:]
    last = output.strip().splitlines()[-1]
    resume = f"gvae study resume full --storage {small_disk} --address {cluster.address}"
    assert re.fullmatch(
        rf"gvae: error: storage: no space left on device writing {small_disk}/full\S*; free "
        rf"space there, then `{re.escape(resume)}` continues the study",
        last,
    ), last
    assert "Traceback" not in output and "OSError" not in output, output[-6000:]
    leftovers = [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    before = pd.read_parquet(small_disk / "full" / "trials.parquet")

    # Room again: the printed command finishes every trial, no row lost or duplicated.
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    command = [sys.executable, "-m", "gvae.cli", *shlex.split(resume)[1:]]
    again = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    trials, curves = tables(small_disk, "full")
    assert len(trials) == 2 and set(trials.status) == {"finished"}
    assert set(before.trial_id) <= set(trials.trial_id)
    assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()


# Which errors are retried -----------------------------------------------------------------------


def raised(action) -> BaseException:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the error itself is what is tested
        return error
    raise AssertionError("no error")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_a_missing_cuda_driver_is_not_retried():
    error = raised(lambda: torch.zeros(1, device="cuda"))
    reason = permanent_failure(error)
    assert reason is not None and reason.startswith("not retried (")


def test_allocation_failures_are_not_retried_and_lost_workers_are():
    # 30M x 784 float32: a 94 GB request, refused at once by this 24 GiB machine.
    error = raised(lambda: torch.empty(30_000_000, 784))
    assert permanent_failure(error).startswith(
        "not retried (a batch or model that cannot be allocated): "
    )
    assert permanent_failure(ConnectionError("node 10.0.0.3 died")) is None
    assert permanent_failure(OSError(28, "No space left on device")) is None  # stops the study


def test_failed_writes_leave_the_old_file_and_no_temporary_file(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)])
    if made.returncode != 0:
        pytest.skip("cannot mount a small filesystem here")
    try:
        write_parquet(mount / "t.parquet", [{"a": 1}])
        with pytest.raises(StorageFull) as full:  # 2 MB of random bytes on a 1 MB disk
            write_parquet(mount / "t.parquet", [{"a": 2, "b": os.urandom(2 << 20)}])
        assert full.value.location == str(mount / "t.parquet")
        source = tmp_path / "checkpoint.pt"
        source.write_bytes(os.urandom(2 << 20))
        with pytest.raises(OSError, match="No space left on device"):  # as Tune copies files
            pafs.copy_files(
                str(source),
                str(mount / "state.json"),
                destination_filesystem=atomic_local_filesystem(str(mount)),
            )
        assert sorted(p.name for p in mount.iterdir()) == ["t.parquet"]
        assert pd.read_parquet(mount / "t.parquet").a.tolist() == [1]  # the old table, whole
        # Sent to a trial, the filesystem is pyarrow's own: trials copy checkpoints natively.
        sent = pickle.loads(pickle.dumps(atomic_local_filesystem(str(mount))))
        assert type(sent) is pafs.LocalFileSystem
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def own_ray_gvae(*args: str, env: dict | None = None, **popen: Any) -> subprocess.Popen:
    """A gvae command in a process of its own that starts a Ray of its own (no RAY_ADDRESS)."""
    own = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "gvae.cli", *args]
    return subprocess.Popen(command, env={**own, **(env or {})}, **popen)


def test_a_killed_driver_leaves_no_ray_process_and_no_ray_session_folder(tmp_path):
    # A driver with a Ray of its own, killed as the OOM killer or `kill -9` would kill it.
    ray_temp = Path(tempfile.mkdtemp(prefix="gvae-ray-", dir="/tmp"))  # short: Ray's sockets
    study = write_study(
        tmp_path, "orphans", models=["vae"], iterations=100_000, eval_every=1000, search=ONE
    )
    driver = own_ray_gvae(
        *("study", "run", str(study), "--storage", str(tmp_path)),
        env={"RAY_TMPDIR": str(ray_temp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: "running" in set(rows(tmp_path, "orphans").status))
        ray = psutil.Process(driver.pid).children(recursive=True)
        names = {process.name() for process in ray}
        assert {"raylet", "gcs_server"} <= names and "ray::DashboardAgent" in names, names
        assert list(ray_temp.glob("ray/session_2*"))
        driver.kill()
        driver.wait()
        _, alive = psutil.wait_procs(ray, timeout=30)
        assert not alive, [process.name() for process in alive]
        assert not list(ray_temp.glob("ray/session_2*"))
    finally:
        driver.kill()
        shutil.rmtree(ray_temp, ignore_errors=True)


def test_a_sigterm_to_the_drivers_whole_group_exits_130_in_time_and_resume_finishes(tmp_path):
    # `kill -- -PGID`, systemd and Slurm's scancel signal every process of the job: were the
    # local Ray the driver started to stop with it, Ray's core would end the driver first.
    study = write_study(
        tmp_path, "group", models=["vae"], iterations=1500, eval_every=100, search=THREE_SEEDS
    )  # on 2 CPUs: the third trial has not started when the signal comes
    output_text = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    driver = own_ray_gvae(
        *("study", "run", str(study), "--storage", str(tmp_path)),
        **output_text,
        start_new_session=True,  # a process group of its own, as a job's
    )
    try:
        wait_for(lambda: list((tmp_path / "group" / "tune").glob("*/checkpoint_*")))
        signalled = time.monotonic()
        os.killpg(driver.pid, signal.SIGTERM)
        code, output = finish(driver, timeout=60)
        assert time.monotonic() - signalled < 30  # before Slurm or Kubernetes kill it
        assert code == 130, output
        assert f"`gvae study resume group --storage {tmp_path}` continues" in output
        assert "Failed to fetch metrics" not in output  # Tune's warning of the unstarted trial
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    code, output = finish(
        own_ray_gvae("study", "resume", "group", "--storage", str(tmp_path), **output_text)
    )
    assert code == 0, output
    assert list(rows(tmp_path, "group").status) == ["finished"] * 3, output


def test_the_reaper_ends_ray_once_a_killed_driver_is_a_zombie_its_parent_never_waits_for(tmp_path):
    # A driver killed while its parent (a supervisor, a profiler) has not waited for it stays a
    # zombie: it has ended, and what it started must still be ended and its session removed.
    session = tmp_path / "session_2026-01-01_00-00-00_0_1"
    (session / "logs").mkdir(parents=True)
    spawn_and_sleep = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    driver = subprocess.Popen([sys.executable, "-c", spawn_and_sleep])
    started = [driver]
    try:
        wait_for(lambda: psutil.Process(driver.pid).children())
        child = psutil.Process(driver.pid).children()[0]
        reaper = subprocess.Popen(
            [sys.executable, "-m", "gvae.study.reaper", str(driver.pid), str(session)]
        )
        started.append(reaper)
        time.sleep(2)  # the reaper notes the driver's child
        os.kill(driver.pid, signal.SIGKILL)  # and nobody waits for the driver
        assert reaper.wait(timeout=30) == 0
        assert psutil.Process(driver.pid).status() == psutil.STATUS_ZOMBIE
        assert not child.is_running()
        assert not session.exists()
    finally:
        for process in started:
            process.kill()
            process.wait()
