"""Ends what a driver's own Ray leaves behind once the driver is gone, however it ended.

A driver killed with `kill -9` (or by the OOM killer) cannot stop the local Ray it started: Ray's
agents run on as orphans for a minute or more, and every run leaves its session folder in Ray's
temp directory. So a driver that starts a local Ray also starts this watcher, in a session of its
own (a Ctrl-C of the driver's terminal does not reach it). While the driver lives, the watcher
notes the driver's descendants (Ray's daemons and agents, which rename themselves `ray::...`);
once the driver is gone it kills those still running and removes the session folder.

    python -m gvae.study.reaper DRIVER_PID SESSION_DIR
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

LOOK_SECONDS = 1.0  # how often the driver's descendants are noted while it lives


def start(session_dir: str) -> subprocess.Popen:
    """Watch this process and the Ray session it started."""
    command = [sys.executable, "-m", "gvae.study.reaper", str(os.getpid()), session_dir]
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def watch(driver_pid: int, session_dir: str) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        driver = None
    left: dict[int, psutil.Process] = {}
    while driver is not None and running(driver):
        with contextlib.suppress(psutil.Error):
            left.update((child.pid, child) for child in driver.children(recursive=True))
        with contextlib.suppress(psutil.TimeoutExpired):
            driver.wait(LOOK_SECONDS)
    left.pop(os.getpid(), None)  # the driver started this watcher too
    alive = [process for process in left.values() if process.is_running()]  # checks pid reuse
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    remove_session(session_dir)


def running(process: psutil.Process) -> bool:
    """Whether the process runs: a killed driver that its parent has not waited for yet (a
    zombie) has ended, and may stay a zombie for as long as that parent runs."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def remove_session(session_dir: str) -> None:
    """Remove a Ray session folder, and Ray's `session_latest` link when it points there."""
    folder = Path(session_dir)
    latest = folder.parent / "session_latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() and latest.resolve() == folder.resolve():
            latest.unlink()
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
