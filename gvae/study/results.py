"""A study's record: the trials and curves Parquet tables, written by the driver alone.

Tables live at `<storage>/<study>/trials.parquet` and `curves.parquet`, where storage is a local
folder or any URI pyarrow's filesystems understand (s3://, gs://, ...); see gvae.io for why a
crash never leaves a torn table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gvae.io import join, resolve, write_parquet

TRIALS = "trials.parquet"
CURVES = "curves.parquet"
REPRODUCTIONS = "reproductions.parquet"


def study_uri(storage: str, name: str) -> str:
    """Absolute URI or path of a study's folder; relative local paths resolve against the cwd."""
    if "://" in storage:
        return join(storage, name)  # keeps a query such as ?endpoint_override=
    return str((Path(storage) / name).resolve())


class ResultsStore:
    """Reads and rewrites the Parquet tables of one study folder."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = resolve(uri)

    def location(self, table: str) -> str:
        return join(self.uri, table)

    def exists(self, table: str) -> bool:
        return self.fs.get_file_info(f"{self.root}/{table}").type == pafs.FileType.File

    def read(self, table: str) -> pd.DataFrame:
        """The table as a DataFrame (empty when it does not exist yet)."""
        if not self.exists(table):
            return pd.DataFrame()
        return pq.read_table(f"{self.root}/{table}", filesystem=self.fs).to_pandas()

    def read_rows(self, table: str) -> list[dict[str, Any]]:
        if not self.exists(table):
            return []
        return pq.read_table(f"{self.root}/{table}", filesystem=self.fs).to_pylist()

    def write(self, table: str, rows: list[dict[str, Any]]) -> None:
        write_parquet(self.location(table), rows)
