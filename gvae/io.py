"""Crash-safe writes: a reader sees the old file or the new one, never a torn one.

Paths are local paths or URIs that pyarrow's filesystems understand (s3://, gs://, ...). A write
goes to a temporary name beside the target and is then moved over it (a rename on local disks).
A write that fails removes its temporary file; a full disk raises StorageFull, naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gvae.errors import GvaeError

try:  # POSIX only; elsewhere `exclusive` holds no lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# errno values that mean "no room left" rather than a broken path or a lost connection.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageFull(OSError):
    """A write found no space left; `location` is the path or URI that could not be written."""

    def __init__(self, location: str) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", location)
        self.location = location


CHECKPOINT_FILE = "checkpoint.pt"  # what a checkpoint folder holds (gvae.trainer writes it)


def is_full(error: BaseException) -> bool:
    """Whether the error (or one it was raised from) means the storage is full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and (
            seen.errno in FULL_ERRNOS or "No space left on device" in str(seen)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a local path or a URI, keeping a URI's query (endpoint_override=)."""
    if "://" not in location:
        return str(Path(location, *parts))
    split = urlsplit(location)
    path = "/".join([split.path.rstrip("/"), *parts])
    return urlunsplit((split.scheme, split.netloc, path, split.query, split.fragment))


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI or a local path (relative to the working directory); S3
    retries every request for minutes (RetryingS3FileSystem)."""
    text = str(location)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    fs, path = pafs.FileSystem.from_uri(text)  # parses and checks the URI's options
    if isinstance(fs, pafs.S3FileSystem):
        fs = RetryingS3FileSystem(s3_options(fs))
    return fs, path


# Attempts of one S3 request before it fails. The AWS SDK under pyarrow waits between them with a
# backoff that doubles from 25 ms; against a frozen server each attempt also waits out its own
# timeout. Measured so: 3 attempts gave up after 10 s, 12 after 148 s, so 13 span about
# S3_RETRY_MINUTES of a store that stalls or refuses connections (a restarting MinIO, a network
# blip). An error the store answers with (no such bucket, access denied) is not retried.
S3_ATTEMPTS = int(os.environ.get("GVAE_S3_ATTEMPTS", "13"))
S3_RETRY_MINUTES = 4


def s3_options(fs: pafs.S3FileSystem) -> dict[str, Any]:
    """The constructor arguments of an S3 filesystem, as its pickling gives them."""
    _, (options,) = fs.__reduce__()
    return {key: value for key, value in options.items() if key != "retry_strategy"}


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with S3_ATTEMPTS attempts per request, also where it arrives
    pickled: Tune hands its storage filesystem to every trial by pickling it, and pyarrow's
    pickling drops the retry strategy (apache/arrow GH-47348; tests/test_compat.py fails when
    that is fixed, and this class can then go)."""

    def __init__(self, options: dict[str, Any]) -> None:
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
        super().__init__(**options, retry_strategy=retry)
        self.options = options

    def __reduce__(self) -> tuple[Any, ...]:
        return RetryingS3FileSystem, (self.options,)


def _write_atomic(location: str | Path, data: bytes) -> None:
    fs, path = resolve(location)
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(tmp) as stream:
            stream.write(data)
        fs.move(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # gone already, or the storage is unreachable
            fs.delete_file(tmp)
        if isinstance(error, OSError) and is_full(error):
            raise StorageFull(str(location)) from error
        raise


def readable_checkpoint(directory: str | Path) -> bool:
    """Whether a checkpoint folder's checkpoint.pt (a zip archive, as torch.save writes it) is
    whole: one cut short by a crash or a bad copy fails in torch.load with a long traceback."""
    try:
        with zipfile.ZipFile(Path(directory) / CHECKPOINT_FILE) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def probe_writable(folder: str | Path) -> None:
    """Raise OSError unless the local `folder` can be made and a file written in it; either way
    it leaves the disk as it found it (the probe file and every folder it made are removed)."""
    path = Path(folder).absolute()
    missing = []
    for part in [path, *path.parents]:
        if os.path.lexists(part):
            break
        missing.append(part)
    made: list[Path] = []
    try:
        for part in reversed(missing):
            part.mkdir()
            made.append(part)
        probe = path / f".gvae-write-probe-{uuid.uuid4().hex}"
        try:
            with open(probe, "xb") as stream:  # "x": never touches an existing file
                stream.write(b"gvae")
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    finally:
        for part in reversed(made):
            with contextlib.suppress(OSError):  # another process put something in it meanwhile
                part.rmdir()


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """A table whose columns are the union of the rows' keys (missing values become null)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return pa.table({column: [row.get(column) for row in rows] for column in columns})


def write_parquet(location: str | Path, rows: list[dict[str, Any]]) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(rows_to_table(rows), sink)
    _write_atomic(location, sink.getvalue().to_pybytes())


def write_json(location: str | Path, data: Any) -> None:
    _write_atomic(location, (json.dumps(data, indent=2, default=str) + "\n").encode())


def write_bytes(location: str | Path, data: bytes) -> None:
    _write_atomic(location, data)


def read_bytes(location: str | Path) -> bytes | None:
    """The file's bytes, or None when there is no such file."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.readall()


class _AtomicFile(io.RawIOBase):
    """A file written under a temporary name and renamed over `path` when closed whole; after a
    failed write (a full disk) closing removes it and leaves the old file as it was."""

    def __init__(self, path: str) -> None:
        super().__init__()
        parent, name = os.path.split(path)
        self.path = path
        self.tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.failed = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except BaseException:
            self._discard()  # now: the caller may never close a stream whose write failed
            raise

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        if not self.file.closed:  # IOBase.close() flushes after the file is closed
            try:
                self.file.flush()
            except BaseException:
                self._discard()
                raise

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self.failed:
                self.file.close()
                os.replace(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise
        finally:
            super().close()

    def _discard(self) -> None:
        self.failed = True
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """pyarrow's local filesystem, except that the files directly in the folder `whole_in` are
    written whole or not at all.

    Ray Tune overwrites its experiment state in place; on a disk that fills up mid-write that
    leaves a cut-short state that a resume cannot read. Given to Tune's driver as its
    `storage_filesystem` (AtomicWhereMade) with the experiment folder as `whole_in`, this keeps
    the last whole version of each file a resume reads back (Tune reads the `.json` and `.pkl`
    files at the top of that folder: ray/tune/execution/experiment_state.py). The trials'
    folders below it, whose files Tune copies again at each snapshot of its state (thousands in
    a study of many trials), are written natively: through Python, the copy took ten times as
    long and held the interpreter lock the driver needs meanwhile.
    """

    def __init__(self, whole_in: str) -> None:
        self.fs = pafs.LocalFileSystem()
        self.whole_in = whole_in.rstrip("/")

    def get_type_name(self) -> str:
        return "gvae-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def equals(self, other: Any) -> bool:
        return isinstance(other, AtomicLocalHandler) and other.whole_in == self.whole_in

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to empty the root directory")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self.fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as out:
            while chunk := source.read(1 << 24):
                out.write(chunk)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        if os.path.dirname(path) != self.whole_in:
            return self.fs.open_output_stream(path)
        return pa.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.fs.open_append_stream(path)


class AtomicWhereMade(pafs.PyFileSystem):
    """The AtomicLocalHandler's filesystem in the process that made it, and pyarrow's own local
    filesystem in every process it is sent to.

    Given to Ray Tune as its storage, it writes Tune's experiment state and the searcher's whole
    or not at all, while trials, which Tune sends it to, copy their checkpoints natively: pyarrow
    calls a Python filesystem from its I/O threads, which in a busy trial took 40 to 200 ms per
    10 MB checkpoint against 5 ms natively. A checkpoint cut short needs no whole write: Tune's
    state names a checkpoint only once the trial's report of it has returned, and a trial that
    finds its checkpoint unreadable starts over.
    """

    def __reduce__(self) -> tuple:
        return (pafs.LocalFileSystem, ())


def atomic_local_filesystem(whole_in: str) -> pafs.FileSystem:
    """pyarrow's local filesystem, writing the files directly in `whole_in` whole
    (AtomicLocalHandler) in this process."""
    return AtomicWhereMade(AtomicLocalHandler(whole_in))


def check_reachable(uri: str) -> None:
    """Before a command uses a study on an object store: one that does not answer is a wrong
    endpoint or a store that is down rather than a stall, so pyarrow's own few attempts, then one
    line (the study's own requests are retried for minutes). What a store that answers says is
    left to the command."""
    if "://" not in uri:
        return
    fs, path = pafs.FileSystem.from_uri(uri)
    try:
        fs.get_file_info(path)
    except OSError as error:
        if unreachable(str(error)):
            raise GvaeError(
                f"storage: cannot reach {uri}: {first_line(error)}; check endpoint_override and "
                "that the store is running (docs/cluster.md)"
            ) from None


# How the AWS SDK under pyarrow reports a store that never answered (it stalled, refused the
# connection, or could not be resolved), as against one that answered with an error.
UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Timeout was reached", "Couldn't connect")


def unreachable(error_text: str) -> bool:
    return any(marker in error_text for marker in UNREACHABLE)


def first_line(error: OSError) -> str:
    """A storage error's first line: the AWS SDK under pyarrow adds its details below it."""
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else repr(error)


@contextlib.contextmanager
def exclusive(lock_path: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Run the body holding an inter-process lock on `lock_path` (made if missing), for work
    that processes on one machine would otherwise do at once on the same files; `on_wait` is
    called when another process holds it."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
