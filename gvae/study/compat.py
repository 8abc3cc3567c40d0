"""The few places where gvae relies on Ray behaviour that has no public API, each with its reason.

tests/test_compat.py fails the day the installed Ray stops behaving as these rely on; then the
workaround goes (or changes) with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

# `ray.init` logs its SIGTERM warning through this logger (ray/_private/worker.py).
RAY_WORKER_LOGGER = "ray._private.worker"


@contextlib.contextmanager
def off_main_thread_ray_init() -> Iterator[None]:
    """Around `ray.init` on a thread other than the main one (gvae.study.ray_start starts a local
    Ray while the driver loads torch and the data).

    Off the main thread Ray installs no SIGTERM handler and warns that it did not, on every
    study. gvae handles SIGTERM itself (gvae.commands.study: SIGTERM interrupts the study as
    Ctrl-C does), so the warning says nothing a user can act on. Ray has no option to start
    without it (its handler moved into ray.init, main thread only, in ray-project/ray PR 39482;
    issue 58283 discusses handlers off the main thread), so its logger is held at ERROR while
    ray.init runs there.
    """
    if threading.current_thread() is threading.main_thread():
        yield
        return
    logger = logging.getLogger(RAY_WORKER_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quiet_tune_output(verbose: bool) -> None:
    """Keep Tune's console output to what a user acts on; gvae.study.progress prints the rest.

    Tune's newer output engine prints its header and a reporter of its own even at verbosity 0;
    `RAY_AIR_NEW_OUTPUT=0` (documented among Tune's environment variables) selects the plain
    engine, which prints nothing at verbosity 0 (ray-project/ray issue 36949 tracks the two
    engines). Tune's INFO lines (state snapshots) are shown with --verbose only.

    Tune warns when trials checkpoint faster than it snapshots its state; a checkpoint at every
    evaluation of many short trials is the point here, and the warning itself names
    `TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0` as the way to turn it off.
    """
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("ray.tune").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
