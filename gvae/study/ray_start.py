"""Starting or joining Ray for a study's driver.

This module imports Ray and gvae.study.compat (which the command imports first anyway), not
torch, so `gvae study run` can make its RayStart before the slow imports (torch, the data) and bad
input found meanwhile never starts Ray.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import psutil
import ray

from gvae.study import compat, reaper

# Ray's daemons a driver's own local Ray runs as its children.
DAEMONS = ("gcs_server", "raylet")


class RayStart:
    """The Ray a study runs on: a local instance this process starts, or the cluster at `address`
    ($RAY_ADDRESS when not given), or the Ray this process already runs."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.started_here = False
        self.daemons: list[psutil.Process] = []
        self.terminated = False  # a SIGTERM came while the study ran

    @classmethod
    def begin(cls, address: str | None = None) -> RayStart:
        """The Ray the study will run on; nothing starts until `wait`."""
        return cls(address)

    def wait(self, log: Callable[[str], None]) -> None:
        """Ray is up once this returns (started here, joined, or already running)."""
        if ray.is_initialized():
            return
        if self.address:
            log(f"joining the Ray cluster at {self.address}")
        context = ray.init(address=self.address, log_to_driver=False)
        if not self.address:
            self.started_here = True
            self.daemons = _daemons()
            reaper.start(context.address_info["session_dir"])
        resources = ray.cluster_resources()
        log(
            f"ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs"
        )

    def exit_if_stranded(self, line: str, saved_state: Callable[[], list[tuple] | None]) -> None:
        """After a SIGTERM: exit 130 with `line` when the local Ray this driver started stopped
        with it, once Tune has saved its state (gvae.study.compat.exit_when_ray_stopped)."""
        self.terminated = True
        if self.daemons:
            compat.exit_when_ray_stopped(self.daemons, line, saved_state)

    def close(self) -> None:
        """Stop the local Ray `wait` started, once the study is done or will not run: at once,
        rather than in Ray's exit hook. Nothing to do for any other Ray."""
        self.daemons.clear()  # stopped on purpose now: the driver is not stranded
        if self.started_here:
            ray.shutdown()
            self.started_here = False


def _daemons() -> list[psutil.Process]:
    """The local Ray daemons among this process's children (one may end as they are listed)."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.name() in DAEMONS:
                found.append(child)
    return found
