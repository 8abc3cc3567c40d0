"""Starting or joining Ray for a study's driver.

This module imports Ray and gvae.study.compat (which the command imports first anyway), not
torch, so `gvae study run` can make its RayStart before the slow imports (torch, the data) and bad
input found meanwhile never starts Ray.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import ray

from gvae.study import compat, reaper


class RayStart:
    """The Ray a study runs on: a local instance this process starts, or the cluster at `address`
    ($RAY_ADDRESS when not given), or the Ray this process already runs."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.started_here = False

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
        local = contextlib.nullcontext() if self.address else compat.sigterm_spared_daemons()
        with local:
            context = ray.init(address=self.address, log_to_driver=False)
        if not self.address:
            self.started_here = True
            reaper.start(context.address_info["session_dir"])
        resources = ray.cluster_resources()
        log(
            f"ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs"
        )

    def close(self) -> None:
        """Stop the local Ray `wait` started, once the study is done or will not run: at once,
        rather than in Ray's exit hook. Nothing to do for any other Ray."""
        if self.started_here:
            ray.shutdown()
            self.started_here = False
