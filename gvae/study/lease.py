"""One driver per study: a lease file in the study folder that its driver keeps alive.

The driver that holds the lease rewrites `driver.lease` every `ttl / 4` seconds with a new expiry
time. A second driver refuses the study while the lease is live. A driver that died without
releasing it frees the study at once for drivers on its own host (its pid is gone) and after
`ttl` seconds for the others; `--force` takes the lease over at once (the driver that loses it
stops as if interrupted). Plain files through pyarrow's
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
from gvae.io import join, read_bytes, resolve, write_bytes

LEASE_FILE = "driver.lease"
# Long enough that a slow write to remote storage never lets a live lease lapse.
DEFAULT_TTL_SECONDS = 60.0
TTL_ENV = "GVAE_LEASE_SECONDS"


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # UTC, as people read it
    token: str  # tells two drivers with the same host and pid (containers) apart
    expires: float  # time.time() after which the lease is free

    def describe(self) -> str:
        return f"the driver on host {self.host}, pid {self.pid}, started {self.started}"

    def alive(self) -> bool:
        """Within its lease, and, when it ran on this host, its process still there (a driver
        killed here frees the study at once; one on another host, when its lease lapses)."""
        if self.expires <= time.time():
            return False
        if self.host != socket.gethostname():
            return True
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
        self.name = name
        self.log = log
        self.ttl = float(os.environ.get(TTL_ENV, DEFAULT_TTL_SECONDS))
        self.token = uuid.uuid4().hex
        started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.me = Holder(socket.gethostname(), os.getpid(), started, self.token, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        self._write()
        holder = self.holder()
        if holder is None or holder.token != self.token:  # another driver wrote at the same time
            who = holder.describe() if holder else "another driver"
            raise GvaeError(f"study: {self.name} was taken by {who} as this driver started")
        self._thread = threading.Thread(target=self._beat, name="gvae-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and free the study, unless another driver took it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.holder()
        if holder is not None and holder.token == self.token:
            fs, path = resolve(self.location)
            fs.delete_file(path)

    def holder(self) -> Holder | None:
        data = read_bytes(self.location)
        record = json.loads(data) if data else {}
        return Holder(**record) if record else None

    def _write(self) -> None:
        holder = Holder(**{**asdict(self.me), "expires": time.time() + self.ttl})
        write_bytes(self.location, json.dumps(asdict(holder)).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                holder = self.holder()
                if holder is not None and holder.token != self.token:
                    self.log(f"study {self.name} was taken over by {holder.describe()}; stopping")
                    os.kill(os.getpid(), signal.SIGINT)  # stop as Ctrl-C does: state is saved
                    return
                self._write()
            except OSError:
                pass  # storage briefly unreachable or full: try again at the next beat
