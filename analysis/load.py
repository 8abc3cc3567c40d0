"""Read a study folder (`<storage>/<name>/`) into DataFrames."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from gvae.errors import GvaeError
from gvae.study.folder import load_saved_spec
from gvae.study.results import CURVES, TRIALS, ResultsStore, study_uri
from gvae.study.spec import StudySpec


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
    spec, _ = load_saved_spec(storage, name)
    store = ResultsStore(study_uri(storage, name))
    trials = store.read(TRIALS)
    if trials.empty:
        raise GvaeError(f"name: study {name!r} has no recorded trials yet; run or resume it first")
    return Study(name=name, spec=spec, trials=trials, curves=store.read(CURVES), store=store)
