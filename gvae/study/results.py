"""A study's record: the trials and curves Parquet tables, one fragment per trial.

Tables live at `<storage>/<study>/trials.parquet` and `curves.parquet`, where storage is a local
folder or any URI pyarrow's filesystems understand (s3://, gs://, ...). Only `pyarrow.fs`
operations are used, so every layout below works the same on S3.

While a study runs, a table is a dataset folder of that name:

    trials.parquet/00-schema.parquet       zero rows: the union of every fragment's columns
    trials.parquet/part-<trial_id>.parquet  all rows of one trial, rewritten when they change

Recording an event rewrites the fragment of that one trial, so its cost does not depend on how
many trials the study has, and on S3 it is one small upload. The zero-row schema file sorts
first, and pyarrow (hence `pandas.read_parquet`) takes a folder's schema from its first file:
readers see every column, and fragments written before a column existed read it as null. When
the study ends, `compact` turns the folder back into one file of the same name.

Crash safety: a fragment appears whole (a rename on local disks, a single PUT on object stores).
The two multi-step changes, compacting a folder into a file and splitting a file (the old layout,
or a finished study that runs again) into a folder, go through a hidden sibling that holds every
row until the step is complete; `open` finishes or redoes an interrupted one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gvae.errors import GvaeError
from gvae.io import join, resolve, write_parquet

TRIALS = "trials.parquet"
CURVES = "curves.parquet"
REPRODUCTIONS = "reproductions.parquet"
SCHEMA_FILE = "00-schema.parquet"  # sorts before every `part-` fragment
ROW_GROUP_ROWS = 1024  # rows per row group of a compacted table
FRAGMENT_READERS = 8  # fragments read at once (reading a table, compacting it)
FRAGMENT_WINDOW = 64  # fragments held in memory at once
READ_ATTEMPTS = 5  # reads of a table that changed under them (see ResultsStore.read_table)
READ_RETRY_SECONDS = 0.1  # the wait before the second attempt; it grows by as much each time

T = TypeVar("T")


def study_uri(storage: str, name: str) -> str:
    """Absolute URI or path of a study's folder; relative local paths resolve against the cwd."""
    if "://" in storage:
        return join(storage, name)  # keeps a query such as ?endpoint_override=
    return str((Path(storage) / name).resolve())


def fragment_name(trial_id: str) -> str:
    return f"part-{trial_id}.parquet"


class ResultsStore:
    """Reads a study folder's tables (one file or a dataset folder) and writes its files."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = resolve(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.bytes_written = 0  # what this store has uploaded or written, for benchmarks and tests

    def location(self, table: str) -> str:
        return join(self.uri, table)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def kind(self, name: str) -> pafs.FileType:
        return self.fs.get_file_info(self.path(name)).type

    def exists(self, name: str) -> bool:
        return self.kind(name) in (pafs.FileType.File, pafs.FileType.Directory)

    def read_table(self, table: str, columns: list[str] | None = None) -> pa.Table | None:
        """The table (a file or a dataset folder) as Arrow, or None when there is none yet.

        Safe while a driver writes it. On object stores, which replace files but cannot rename
        them atomically, a fragment replaced while it is read comes back invalid and is read
        again (`read_parquet_whole`). A fragment gone between the listing and its read (the table
        was compacted, or a lost trial's rows removed) starts the read over, and a compaction
        midway is read from the complete file it moves in place, a split midway from the file
        it splits.
        """
        return retried(lambda: self._read_table_once(table, columns), FileNotFoundError)

    def _read_table_once(self, table: str, columns: list[str] | None) -> pa.Table | None:
        split = split_name(table)  # every row, while a split fills the folder (or was cut short)
        if self.kind(split) == pafs.FileType.File:
            return self._read_file(split, columns)
        kind = self.kind(table)
        if kind == pafs.FileType.NotFound:
            compacted = compacted_name(table)  # complete, and about to be moved to `table`
            if self.kind(compacted) == pafs.FileType.File:
                table, kind = compacted, pafs.FileType.File
            elif self.kind(table) != pafs.FileType.NotFound:  # the move happened meanwhile
                raise FileNotFoundError(self.path(compacted))
        if kind == pafs.FileType.File:
            return self._read_file(table, columns)
        if kind != pafs.FileType.Directory:
            return None
        folder = self.path(table)
        fragments = self.fragment_paths(table)
        try:
            schema = read_parquet_whole(self.fs, f"{folder}/{SCHEMA_FILE}").schema
        except FileNotFoundError:
            if fragments:  # the folder is being removed by a compaction: read again
                raise
            return None  # created, its schema file not written yet
        names = [c for c in columns if c in schema.names] if columns else schema.names
        target = pa.schema([schema.field(name) for name in names])
        tables = [conform(t, target) for t in read_fragments(self.fs, fragments, names)]
        return pa.concat_tables(tables) if tables else target.empty_table()

    def _read_file(self, name: str, columns: list[str] | None) -> pa.Table:
        try:
            return pq.read_table(self.path(name), columns=columns, filesystem=self.fs)
        except pa.ArrowInvalid:
            raise UnreadableTable(self.path(name)) from None

    def fragment_paths(self, table: str) -> list[str]:
        """The `part-` files of a table's folder, in file-name (trial id) order."""
        selector = pafs.FileSelector(self.path(table), allow_not_found=True)
        return sorted(
            info.path
            for info in self.fs.get_file_info(selector)
            if info.base_name.startswith("part-") and info.base_name.endswith(".parquet")
        )

    def read(self, table: str, columns: list[str] | None = None) -> pd.DataFrame:
        """The table as a DataFrame (empty when it does not exist yet)."""
        arrow = self.read_table(table, columns)
        return pd.DataFrame() if arrow is None else arrow.to_pandas()

    def read_rows(self, table: str) -> list[dict[str, Any]]:
        arrow = self.read_table(table)
        return [] if arrow is None else arrow.to_pylist()

    def write(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Replace a whole single-file table (small tables such as reproductions)."""
        write_parquet(self.location(table), rows)

    def put(self, name: str, table: pa.Table, fragment: bool = False) -> None:
        """Write `table` as the Parquet file `name`, appearing whole or not at all.

        A `fragment` (one trial's rows, rewritten at each of its events) is written without
        dictionaries and column statistics, which serve large files only: 1.1 ms instead of
        1.9 ms for a trial row with 10,000 image entropies."""
        sink = pa.BufferOutputStream()
        if fragment:
            pq.write_table(table, sink, use_dictionary=False, write_statistics=False)
        else:
            pq.write_table(table, sink)
        data = sink.getvalue()
        path = self.path(name)
        if self.local:  # a rename is atomic on local disks; objects appear whole on close anyway
            parent, base = path.rsplit("/", 1)
            tmp = f"{parent}/.{base}.{uuid.uuid4().hex}.tmp"
            with self.fs.open_output_stream(tmp) as stream:
                stream.write(data)
            self.fs.move(tmp, path)
        else:
            with self.fs.open_output_stream(path) as stream:
                stream.write(data)
        self.bytes_written += data.size

    def delete(self, name: str) -> None:
        kind = self.kind(name)
        if kind == pafs.FileType.File:
            self.fs.delete_file(self.path(name))
        elif kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(name))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns and types (missing ones null)."""
    if table.schema.equals(schema):
        return table
    arrays = []
    for field in schema:
        index = table.schema.get_field_index(field.name)
        if index < 0:
            arrays.append(pa.nulls(table.num_rows, field.type))
        elif table.schema.field(index).type != field.type:
            arrays.append(table.column(index).cast(field.type))
        else:
            arrays.append(table.column(index))
    return pa.table(arrays, schema=schema)


class FragmentedTable:
    """One table written as one fragment per trial, of a schema declared by gvae.study.tables
    (see the module docstring). Any process may write a trial's fragment; only the driver
    splits and compacts."""

    def __init__(self, store: ResultsStore, name: str, schema: pa.Schema) -> None:
        self.store = store
        self.name = name
        self.schema = schema
        self._compacted = compacted_name(name)
        self._split = split_name(name)

    def open_for_writing(self) -> None:
        """Finish an interrupted compaction or split, turn a compacted table back into
        fragments, and write the schema file: the declared columns, then any an earlier run
        wrote that are no longer declared (readers keep seeing them)."""
        store = self.store
        if store.kind(self._compacted) == pafs.FileType.File:  # the compacted file is complete
            store.delete(self.name)
            store.fs.move(store.path(self._compacted), store.path(self.name))
        store.delete(f"{self._compacted}.partial")
        if store.kind(self._split) == pafs.FileType.File:
            store.delete(self.name)
        elif store.kind(self.name) == pafs.FileType.File:
            store.fs.move(store.path(self.name), store.path(self._split))
        elif store.kind(self.name) == pafs.FileType.Directory:
            self._widen(self._folder_schema())
            return
        else:
            self._create_folder()
            return
        self._split_from(self._split)

    def _create_folder(self) -> None:
        """A new table folder, which appears with its schema file in it: `pd.read_parquet` of
        an empty folder would see a table without columns. On local disks it is filled under a
        hidden name and renamed (an object store has no folders to see empty)."""
        store = self.store
        if not store.local:
            store.fs.create_dir(store.path(self.name), recursive=True)
            self._widen(None)
            return
        staging = f".{self.name}.new"
        store.delete(staging)
        store.fs.create_dir(store.path(staging), recursive=True)
        store.put(f"{staging}/{SCHEMA_FILE}", self.schema.empty_table())
        store.fs.move(store.path(staging), store.path(self.name))

    def _folder_schema(self) -> pa.Schema | None:
        """The schema file's columns; None when it is missing or cut short (it is rewritten)."""
        try:
            return pq.read_schema(self.store.path(self._schema_file), filesystem=self.store.fs)
        except (FileNotFoundError, pa.ArrowInvalid):
            return None

    @property
    def _schema_file(self) -> str:
        return f"{self.name}/{SCHEMA_FILE}"

    def _widen(self, found: pa.Schema | None) -> None:
        if found is not None:
            extra = [field for field in found if field.name not in self.schema.names]
            self.schema = pa.schema([*self.schema, *extra])
        self.store.put(self._schema_file, self.schema.empty_table())

    def _split_from(self, source: str) -> None:
        """Rewrite a single-file table (at `source`) as a folder of per-trial fragments; one that
        cannot be read is dropped (its rows are rebuilt from the trials' checkpoints)."""
        store = self.store
        try:
            table = pq.read_table(store.path(source), filesystem=store.fs)
        except pa.ArrowInvalid:
            table = self.schema.empty_table()
        store.fs.create_dir(store.path(self.name), recursive=True)
        self._widen(table.schema)
        by_trial: dict[str, list[dict[str, Any]]] = {}
        for row in table.to_pylist():
            by_trial.setdefault(row["trial_id"], []).append(row)
        for trial_id, rows in by_trial.items():
            self.write_trial(trial_id, rows)
        store.delete(source)

    def read_trial(self, trial_id: str) -> list[dict[str, Any]]:
        """The rows of one trial's fragment ([] when it has none)."""
        path = self.store.path(f"{self.name}/{fragment_name(trial_id)}")
        try:
            return read_parquet_whole(self.store.fs, path).to_pylist()
        except FileNotFoundError:
            return []

    def write_trial(self, trial_id: str, rows: list[dict[str, Any]]) -> None:
        """Replace every row of one trial (no rows: remove the trial)."""
        path = f"{self.name}/{fragment_name(trial_id)}"
        if not rows:
            self.store.delete(path)
            return
        self.store.put(path, pa.Table.from_pylist(rows, schema=self.schema), fragment=True)

    def compact(self) -> None:
        """Merge the folder into one file of the same name, trial by trial in trial-id order.

        Fragments are read a window at a time, in file-name order (trial ids), so memory holds
        a window and one row group, not the table.
        """
        store = self.store
        if store.kind(self.name) != pafs.FileType.Directory:
            return
        schema = self._folder_schema() or self.schema
        files = store.fragment_paths(self.name)
        partial = f"{self._compacted}.partial"
        with (
            store.fs.open_output_stream(store.path(partial)) as stream,
            pq.ParquetWriter(stream, schema) as writer,
        ):
            pending: list[pa.Table] = []
            for fragment in read_fragments(store.fs, files):
                pending.append(conform(fragment, schema))
                if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                    pending = []
            if pending or not files:
                rows = pa.concat_tables(pending) if pending else schema.empty_table()
                writer.write_table(rows, row_group_size=ROW_GROUP_ROWS)
        store.bytes_written += store.fs.get_file_info(store.path(partial)).size
        store.fs.move(store.path(partial), store.path(self._compacted))
        store.delete(self.name)
        store.fs.move(store.path(self._compacted), store.path(self.name))


def compacted_name(table: str) -> str:
    """The hidden sibling that holds a table's compacted file until it is moved in place."""
    return f".{table}.compacted"


def split_name(table: str) -> str:
    """The hidden sibling that holds a single-file table while it is split into fragments."""
    return f".{table}.split"


class UnreadableTable(GvaeError):
    """A table's file that is no Parquet file (cut short by a crash, a full disk, a bad copy)."""

    def __init__(self, path: str) -> None:
        self.path = path
        parts = path.rstrip("/").split("/")
        table = next((i for i, part in enumerate(parts) if part.endswith(".parquet")), len(parts))
        study = parts[table - 1] if table > 0 else "NAME"
        # A local path names its storage; an object store's path lacks the URI's scheme.
        storage = "/".join(parts[: table - 1]) if path.startswith("/") else "URI"
        options = f"{study} --storage {storage}"
        super().__init__(
            f"storage: {path} cannot be read as Parquet; `gvae study repair {options}` (or "
            f"`gvae study resume {options}`) rebuilds the tables from the trials' checkpoints"
        )


def readable_parquet(store: ResultsStore, path: str) -> bool:
    """Whether the file at `path` is a Parquet file whose footer can be read."""
    try:
        pq.read_metadata(path, filesystem=store.fs)
    except pa.ArrowInvalid:
        return False
    return True


def read_parquet_whole(
    fs: pafs.FileSystem, path: str, columns: list[str] | None = None
) -> pa.Table:
    """A small Parquet file, read into memory and parsed there; `columns` it lacks are left out
    (a fragment written before they existed).

    On object stores the read learns the size first, then fetches the bytes: a file replaced in
    between comes back as no valid Parquet file, and is read again (see ResultsStore.read_table).
    Raises FileNotFoundError when the file is gone."""

    def parse() -> pq.ParquetFile:
        with fs.open_input_stream(path) as stream:
            return pq.ParquetFile(pa.BufferReader(stream.readall()))

    # A file gone (an OSError too) stays gone: the caller decides what that means.
    try:
        parquet = retried(parse, (pa.ArrowInvalid, OSError), but_not=FileNotFoundError)
    except pa.ArrowInvalid:
        raise UnreadableTable(path) from None
    present = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
    return parquet.read(columns=present)


def read_fragments(
    fs: pafs.FileSystem, paths: list[str], columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """The fragments, in the order given, read by several threads: a read waits on the disk or,
    on object stores, on a round trip per file, and pyarrow reads without the GIL. A window of
    them is held in memory at a time."""
    with ThreadPoolExecutor(FRAGMENT_READERS) as pool:
        for start in range(0, len(paths), FRAGMENT_WINDOW):
            window = paths[start : start + FRAGMENT_WINDOW]
            yield from pool.map(lambda path: read_parquet_whole(fs, path, columns), window)


def retried(
    call: Callable[[], T],
    errors: type[BaseException] | tuple[type[BaseException], ...],
    but_not: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> T:
    """`call()`, called again after a growing pause when it raises one of `errors` (other than
    `but_not`), up to READ_ATTEMPTS times in all: a read that met a table the driver changed."""
    for attempt in range(1, READ_ATTEMPTS):
        try:
            return call()
        except but_not:
            raise
        except errors:
            time.sleep(READ_RETRY_SECONDS * attempt)
    return call()
