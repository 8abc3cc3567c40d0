"""Starting or joining Ray for a study's driver.

A local Ray takes seconds to start, and so does the driver's own setup (importing torch, loading
the data and the evaluator); `RayStart.begin` starts a local Ray on a thread so that the two
overlap. This module imports Ray alone, so `gvae study run` can call it before the slow imports.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import ray

from gvae.study import compat


class RayStart:
    """The Ray a study runs on: a local instance this process starts, or the cluster at `address`
    ($RAY_ADDRESS when not given), or the Ray this process already runs."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS")
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # the thread's ray.init returned
        self._release = threading.Event()  # the thread may end: its Ray is down
        self._error: BaseException | None = None

    @classmethod
    def begin(cls, address: str | None = None) -> RayStart:
        """Start a local Ray on a thread now, when this process is to start one; `wait` joins it."""
        start = cls(address)
        if not start.address and not ray.is_initialized():
            start._thread = threading.Thread(
                target=start._start_and_hold, name="gvae-ray", daemon=True
            )
            start._thread.start()
        return start

    def wait(self, log: Callable[[str], None]) -> None:
        """Ray is up once this returns (started here, joined, or already running)."""
        if self._thread is not None:
            self._ready.wait()
        elif ray.is_initialized():
            return
        elif self.address:
            log(f"joining the Ray cluster at {self.address}")
            ray.init(address=self.address, log_to_driver=False)
        else:
            self._init_local()
        if self._error is not None:
            raise self._error
        resources = ray.cluster_resources()
        log(
            f"ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs"
        )

    def close(self) -> None:
        """Stop the local Ray `begin` started (once it is up) and wait until it is down: when
        the study is done, or will not run. Nothing to do for any other Ray."""
        if self._thread is None:
            return
        self._ready.wait()
        self._release.set()
        self._thread.join()
        self._thread = None

    def _start_and_hold(self) -> None:
        """ray.init on this thread, which then holds that Ray until `close` and stops it: Ray's
        processes are set to die with the thread that started them (PR_SET_PDEATHSIG), not
        with the process."""
        self._init_local()
        self._ready.set()
        if self._error is None:
            self._release.wait()
            ray.shutdown()

    def _init_local(self) -> None:
        try:
            with compat.off_main_thread_ray_init():
                ray.init(log_to_driver=False)
        except BaseException as error:  # raised again by wait, on the driver's thread
            self._error = error
