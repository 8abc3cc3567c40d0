"""One driver per study: a lease file in the study folder that its driver keeps alive.

The driver that holds the lease rewrites `driver.lease` every `ttl / 4` seconds with a new expiry
time. A second driver refuses the study while the lease is live. A driver that died without
releasing it frees the study at once for drivers on its own host (its pid is gone) and after
`ttl` seconds for the others. `--force` takes the lease over from a live one: the driver that
loses it stops as if interrupted and leaves `driver.handover` when it has stopped, and the new
driver starts only then (or once the old one's pid is gone from this host, or its lease has
lapsed), so two drivers never run the study at once: the old one would go on saving and pruning
checkpoints that the new one's restored state points at. Plain files through pyarrow's
filesystems, so it works the same on local folders, shared mounts and S3. Expiry compares wall
clocks: hosts that share a study should keep them in sync (NTP).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from gvae.errors import GvaeError
from gvae.io import S3_RETRY_MINUTES, join, read_bytes, resolve, write_bytes

LEASE_FILE = "driver.lease"
HANDOVER_FILE = "driver.handover"  # written by a driver that stopped because it was taken over
POLL_SECONDS = 0.25
# Long enough that a slow write to remote storage never lets a live lease lapse.
DEFAULT_TTL_SECONDS = 60.0
TTL_ENV = "GVAE_LEASE_SECONDS"
STALL_NOTICE_SECONDS = 10.0  # a heartbeat's write waited this long: the storage is told stalled


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # UTC, as people read it
    token: str  # tells two drivers with the same host and pid (containers) apart
    expires: float  # time.time() after which the lease is free

    def describe(self) -> str:
        return f"the driver on host {self.host}, pid {self.pid}, started {self.started}"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Within its lease, and, when it ran on this host, its process still there (a driver
        killed here frees the study at once; one on another host, when its lease lapses)."""
        return self.expires > time.time() and (not self.on_this_host() or self.process_exists())

    def process_exists(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process
        return True


class StudyLease:
    """`with StudyLease(uri, name).held(force):` runs the body as the study's only driver."""

    def __init__(self, study_uri: str, name: str, log: Callable[[str], None] = print) -> None:
        self.location = join(study_uri, LEASE_FILE)
        self.handover = join(study_uri, HANDOVER_FILE)
        self.name = name
        self.log = log
        self.ttl = float(os.environ.get(TTL_ENV, DEFAULT_TTL_SECONDS))
        self.token = uuid.uuid4().hex
        started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.me = Holder(socket.gethostname(), os.getpid(), started, self.token, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.study_uri = study_uri
        self.stalled = False  # a heartbeat has waited on the storage past STALL_NOTICE_SECONDS

    def acquire(self, force: bool = False) -> None:
        """Take the lease, or raise GvaeError naming the live driver that holds it."""
        holder = self.holder()
        if holder is not None and holder.token != self.token and holder.alive():
            if not force:
                raise GvaeError(
                    f"study: {self.name} is already being run by {holder.describe()}; wait for "
                    f"it to end, or pass --force if that driver is dead (its lease lapses "
                    f"{self.ttl:g} s after its last heartbeat)"
                )
            self.log(f"--force: taking study {self.name} over from {holder.describe()}")
        else:
            holder = None  # nobody to wait for
        self._write()
        current = self.holder()
        if current is None or current.token != self.token:  # another driver wrote at the same time
            who = current.describe() if current else "another driver"
            raise GvaeError(f"study: {self.name} was taken by {who} as this driver started")
        self._thread = threading.Thread(target=self._beat, name="gvae-lease", daemon=True)
        self._thread.start()
        if holder is not None:
            self._wait_until_stopped(holder)

    def release(self) -> None:
        """Stop the heartbeat and free the study, unless another driver took it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.holder()
        if holder is not None and holder.token == self.token:
            fs, path = resolve(self.location)
            fs.delete_file(path)
        elif holder is not None:  # taken over: tell the new driver this one has stopped
            write_bytes(self.handover, json.dumps({"token": self.token}).encode())

    def holder(self) -> Holder | None:
        """Who holds the lease; None when nobody does, or its file is damaged (written whole,
        it was damaged from outside): a live holder rewrites it within a heartbeat."""
        data = read_bytes(self.location)
        try:
            return Holder(**json.loads(data)) if data else None
        except (ValueError, TypeError):
            return None

    def _wait_until_stopped(self, old: Holder) -> None:
        """Wait for the driver this one took the study from to stop: its handover note, its pid
        gone from this host, or (on another host, where a dead driver leaves no note) its lease
        lapsed. A live driver stops within a heartbeat plus the time Tune takes to save."""
        give_up = max(old.expires, time.time() + self.ttl)  # elsewhere: its lease lapses first
        while not self._stopped(old):
            if time.time() > give_up:  # its pid still here after a whole lease: it hangs
                self.release()
                raise GvaeError(
                    f"study: {old.describe()} did not stop within {self.ttl:g} s of --force; "
                    f"kill that process (kill -9 {old.pid}), then run again"
                )
            time.sleep(POLL_SECONDS)

    def _stopped(self, old: Holder) -> bool:
        if self._handed_over_by(old):
            return True
        if old.on_this_host():
            return not old.process_exists()
        return old.expires <= time.time()

    def _handed_over_by(self, old: Holder) -> bool:
        """Whether `old` left its handover note (which this removes)."""
        data = read_bytes(self.handover)
        if not data or json.loads(data).get("token") != old.token:
            return False
        fs, path = resolve(self.handover)
        fs.delete_file(path)
        return True

    def _write(self) -> None:
        holder = Holder(**{**asdict(self.me), "expires": time.time() + self.ttl})
        write_bytes(self.location, json.dumps(asdict(holder)).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            # The heartbeat is the driver's steady write: a store that stalls shows here first.
            notice = threading.Timer(STALL_NOTICE_SECONDS, self._say_stalled)
            notice.daemon = True
            notice.start()
            try:
                holder = self.holder()
                if holder is not None and holder.token != self.token:
                    self.log(f"study {self.name} was taken over by {holder.describe()}; stopping")
                    os.kill(os.getpid(), signal.SIGINT)  # stop as Ctrl-C does: state is saved
                    return
                self._write()
            except OSError:
                pass  # storage briefly unreachable or full: try again at the next beat
            finally:
                notice.cancel()
                if self.stalled:
                    self.stalled = False
                    self.log(f"storage: {self.study_uri} answers again")

    def _say_stalled(self) -> None:
        self.stalled = True
        self.log(
            f"storage: {self.study_uri} has not answered for {STALL_NOTICE_SECONDS:g} s; "
            f"its requests are retried for up to {S3_RETRY_MINUTES} minutes"
        )
