"""Read a study folder (`<storage>/<name>/`) into DataFrames."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from gvae.errors import GvaeError
from gvae.io import check_reachable
from gvae.study.results import CURVES, TRIALS, ResultsStore, study_uri
from gvae.study.spec import StudySpec, parse_study, read_yaml

# The driver's SPEC_FILE; not imported from gvae.study.driver, which pulls in Ray (seconds).
SPEC_FILE = "study.yaml"


@dataclass
class Study:
    """One study's spec and tables: `trials` has a row per trial, `curves` a row per evaluation."""

    name: str
    spec: StudySpec
    trials: pd.DataFrame
    curves: pd.DataFrame
    store: ResultsStore


def load_study(name: str, storage: str = "results") -> Study:
    """The study `name` under `storage` (a folder or a URI such as s3://bucket/gvae)."""
    store = ResultsStore(study_uri(storage, name))
    check_reachable(store.uri)
    if not store.exists(SPEC_FILE):
        raise GvaeError(
            f"name: no study named {name!r} under {storage}; pass --storage or run "
            "`gvae study run FILE` first"
        )
    with store.fs.open_input_stream(f"{store.root}/{SPEC_FILE}") as stream:
        spec = parse_study(read_yaml(stream.readall().decode()))
    trials = store.read(TRIALS)
    if trials.empty:
        raise GvaeError(f"name: study {name!r} has no recorded trials yet; run or resume it first")
    return Study(name=name, spec=spec, trials=trials, curves=store.read(CURVES), store=store)
