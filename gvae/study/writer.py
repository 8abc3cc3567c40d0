"""Writes that leave Tune's event loop: the recorder's fragment writes run on a thread of their own.

Tune calls its callbacks on the one thread that also starts trials, so every millisecond a
callback spends writing is a millisecond a worker that just finished a trial waits for its next
one (and on S3 a write is an upload). The recorder hands each write to a `BackgroundWriter` and
returns; the writer runs them in order and replaces a write that has not started with a newer one
of the same file, since every write holds the whole of that file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable


class BackgroundWriter:
    """Runs jobs in submission order on one thread.

    `flush` returns once every submitted job has run. The first error a job raises stops the
    writer: its pending jobs are dropped and the next `submit` or `flush` raises that error, on
    the caller's thread. The thread exists only while there is work, and it is not a daemon, so
    the interpreter finishes the pending jobs before it exits.
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, Callable[[], None]] = {}
        self._changed = threading.Condition()
        self._running = False  # a thread is working through _pending
        self._error: BaseException | None = None

    def submit(self, key: Hashable, job: Callable[[], None]) -> None:
        """Run `job` after those submitted before it, in place of a pending job of the same key."""
        with self._changed:
            self._raise_error()
            self._pending[key] = job
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name="gvae-writer").start()

    def flush(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: not self._running)
            self._raise_error()

    def _work(self) -> None:
        while True:
            with self._changed:
                if not self._pending or self._error is not None:
                    self._pending.clear()
                    self._running = False
                    self._changed.notify_all()
                    return
                key = next(iter(self._pending))
                job = self._pending.pop(key)
            try:
                job()
            except BaseException as error:  # raised again on the caller's thread
                with self._changed:
                    self._error = error

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error
