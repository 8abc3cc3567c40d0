"""An Optuna study seen by suggestion: the mean of its seed replicates, with intervals.

With `search.optuna.replicates: K`, each Optuna suggestion is trained on K seeds and the trials
table has one row per seed run, tagged with the `suggestion` it belongs to. The Pareto front, the
best choice, the convergence of the search and the parameter importances are all taken over the
suggestion means, which is what Optuna itself was told. Studies without replicates have one trial
per suggestion, so the same code reads them too.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pyarrow.fs as pafs

from analysis import tables
from gvae.study.folder import JOURNAL, journal_storage
from gvae.study.results import ResultsStore

SUGGESTION = "suggestion"


def with_suggestion(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials with a `suggestion` column; a trial without one is its own suggestion."""
    column = trials[SUGGESTION] if SUGGESTION in trials else pd.Series(None, index=trials.index)
    return trials.assign(**{SUGGESTION: column.fillna(trials["trial_id"])})


def suggestion_means(
    trials: pd.DataFrame, objectives: Mapping[str, str], searched: list[str]
) -> pd.DataFrame:
    """One row per suggestion with a finished seed: its searched parameters, the number of seeds
    `n`, and per objective column the mean and the 95% t-interval half-width (`<column>_ci`).

    Rows are in the order Optuna suggested them: by when their first seed started (`started_at`),
    else by trial id.
    """
    done = with_suggestion(tables.finished(trials))
    rows = []
    for suggestion, group in done.groupby(SUGGESTION, sort=True):
        row: dict[str, Any] = {SUGGESTION: suggestion, "model": group["model"].iloc[0]}
        row["started_at"] = group["started_at"].min() if "started_at" in group else None
        row.update({key: group[key].iloc[0] for key in searched if key in group})
        row["seeds"] = ",".join(str(int(seed)) for seed in sorted(group["seed"]))
        for column in objectives:
            mean, half_width, n = tables.mean_ci(group[column])
            row.update({column: mean, f"{column}_ci": half_width, "n": n})
        rows.append(row)
    means = pd.DataFrame(rows)
    if means.empty or means["started_at"].isna().all():
        return means.drop(columns="started_at", errors="ignore")
    return means.sort_values("started_at", kind="stable").drop(columns="started_at")


def pareto_of_means(means: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The suggestions no other suggestion dominates on the means (the best ones, one objective)."""
    if means.empty:
        return means
    if len(objectives) > 1:
        return tables.pareto_front(means, objectives)
    ((column, mode),) = objectives.items()
    return means.dropna(subset=[column]).sort_values(column, ascending=mode == "min").head(10)


def best_so_far(means: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The best mean of each objective among the first k suggestions, for k = 1, 2, ..."""
    frame = pd.DataFrame({"suggestions": np.arange(1, len(means) + 1)})
    for column, mode in objectives.items():
        values = means[column].to_numpy(dtype=float)
        running = np.fmax.accumulate(values) if mode == "max" else np.fmin.accumulate(values)
        frame[f"best_{column}"] = running
    return frame


def importances(
    means: pd.DataFrame, objectives: Mapping[str, str], space: Mapping[str, Any]
) -> pd.DataFrame:
    """Optuna's parameter importances of each objective over the suggestion means.

    Rows: parameters; columns: objectives. Empty when there are too few suggestions or nothing
    varied (importances need at least two completed suggestions that differ).
    """
    import optuna

    from gvae.study.spec import Range

    params = [key for key in space if key in means]
    usable = means.dropna(subset=list(objectives))
    if len(usable) < 2 or not params or all(usable[p].nunique() < 2 for p in params):
        return pd.DataFrame()
    distributions = {key: _distribution(space[key], Range) for key in params}
    study = optuna.create_study(
        directions=["maximize" if m == "max" else "minimize" for m in objectives.values()]
    )
    for _, row in usable.iterrows():
        study.add_trial(
            optuna.trial.create_trial(
                params={key: _plain(row[key]) for key in params},
                distributions=distributions,
                values=[float(row[c]) for c in objectives],
            )
        )
    columns = {}
    for index, (column, mode) in enumerate(objectives.items()):
        # Optuna's default evaluator (PED-ANOVA) explains low target values: negate maxima.
        sign = -1.0 if mode == "max" else 1.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
            scores = optuna.importance.get_param_importances(
                study, target=lambda trial, i=index, s=sign: s * trial.values[i]
            )
        columns[column] = pd.Series(scores)
    return pd.DataFrame(columns).reindex(params).fillna(0.0)


def _distribution(value: Any, range_type: type) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(value, range_type):
        if value.integer:
            return IntDistribution(int(value.low), int(value.high), log=value.log)
        return FloatDistribution(value.low, value.high, log=value.log)
    return CategoricalDistribution(list(value))


def _plain(value: Any) -> Any:
    """numpy scalars as Python values, which Optuna's distributions compare against."""
    return value.item() if isinstance(value, np.generic) else value


def seeds_of(trials: pd.DataFrame, suggestion: str) -> pd.DataFrame:
    """The finished seed trials of `suggestion` (a full id, or its unique ending such as 00003)."""
    done = with_suggestion(tables.finished(trials))
    ids = done[SUGGESTION].astype(str)
    return done[(ids == suggestion) | ids.str.endswith(f"_{suggestion}")].sort_values("seed")


def ideal_corner_choice(front: pd.DataFrame, reference: pd.DataFrame, objectives: Mapping) -> int:
    """Position in `front` of the row nearest the ideal corner, each objective scaled to [0, 1]
    over `reference` (1 = best)."""
    distance = np.zeros(len(front))
    for column, mode in objectives.items():
        low, high = reference[column].min(), reference[column].max()
        if high > low:
            scaled = ((front[column] - low) / (high - low)).to_numpy(dtype=float)
        else:
            scaled = np.ones(len(front))
        distance += ((1 - scaled) if mode == "max" else scaled) ** 2
    return int(np.argmin(np.where(np.isnan(distance), math.inf, distance)))


def optuna_study(
    store: ResultsStore, name: str, database: str | None = None
) -> optuna.Study | None:
    """The Optuna study a study's search kept in `database` (its `search.optuna.storage`) or
    else in its journal, or None when it has none."""
    if database is not None:
        return optuna.load_study(study_name=name, storage=database)
    if not store.exists(JOURNAL):
        return None
    local = store.path(JOURNAL)
    if not store.local:  # a copy on this disk, which Optuna reads as the study is used
        local = f"{tempfile.mkdtemp(prefix='gvae-optuna-')}/{JOURNAL}"
        pafs.copy_files(store.path(JOURNAL), local, source_filesystem=store.fs)
    storage = journal_storage(local)
    return optuna.load_study(study_name=name, storage=storage)
