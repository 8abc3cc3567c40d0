"""Crash-safe writes: a reader sees the old file or the new one, never a torn one.

Paths are local paths or URIs that pyarrow's filesystems understand (s3://, gs://, ...). A write
goes to a temporary name beside the target and is then moved over it (a rename on local disks).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI or a local path (relative to the working directory)."""
    text = str(location)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def _write_atomic(location: str | Path, data: bytes) -> None:
    fs, path = resolve(location)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as stream:
        stream.write(data)
    fs.move(tmp, path)


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
