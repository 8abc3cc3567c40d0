"""Crash-safe writes: a reader sees the old file or the new one, never a torn one.

Paths are local paths or URIs that pyarrow's filesystems understand (s3://, gs://, ...). A write
goes to a temporary name beside the target and is then moved over it (a rename on local disks).
A write that fails removes its temporary file; a full disk raises StorageFull, naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# errno values that mean "no room left" rather than a broken path or a lost connection.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageFull(OSError):
    """A write found no space left; `location` is the path or URI that could not be written."""

    def __init__(self, location: str) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", location)
        self.location = location


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
    """(filesystem, path) for a URI or a local path (relative to the working directory)."""
    text = str(location)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).resolve())


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
