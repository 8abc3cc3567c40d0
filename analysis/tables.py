"""Tables of a study as DataFrames: Table 1, per-image entropy, Optuna's best trials, failures.

Every function takes the trials table (one row per trial, as `gvae.study.results` writes it) and
returns a new DataFrame; nothing here reads files or draws.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats  # a dependency of mlxtend, which gvae requires

from gvae.config import MODEL_NAMES, TrialConfig

CONFIDENCE = 0.95
# An image whose predicted class distribution has entropy below this (in nats) counts as
# "low entropy": the classifier is sure which digit it shows (ln 10 = 2.303 is total doubt).
LOW_ENTROPY_THRESHOLD = 0.5
# The paper's Table 1 (mode entropy of 10k samples); it has no constrained VAE-GAN row.
PAPER_MODE_ENTROPY = {"gan": 0.0, "wgan": 2.280, "vae": 2.266, "vaegan": 2.263}
REAL_DATA = "real data"

CONFIG_COLUMNS = [field.name for field in dataclasses.fields(TrialConfig)]
# Config columns that never define a group: seeds are what a group averages over, and the rest
# say where a trial ran, not what it trained.
NOT_GROUPING = {"model", "seed", "device", "cpu_threads", "graph", "data_root"}
STOPPED_STATUSES = ("failed", "diverged", "stopped", "running", "pending")


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials that trained all their iterations (the only ones averaged anywhere)."""
    return trials[trials["status"] == "finished"]


def model_order(models: Sequence[str]) -> list[str]:
    """Models in the paper's order (gan, wgan, vae, vaegan, cvaegan), unknown ones last."""
    rank = {name: index for index, name in enumerate(MODEL_NAMES)}
    return sorted(set(models), key=lambda model: (rank.get(model, len(rank)), model))


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, int]:
    """(mean, half-width of the t-distribution confidence interval, n) of `values`.

    The half-width is NaN for fewer than two values: one seed says nothing about the spread.
    """
    array = np.asarray([value for value in values if not pd.isna(value)], dtype=float)
    n = len(array)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(array.mean())
    if n < 2:
        return mean, math.nan, 1
    quantile = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1))
    return mean, quantile * float(array.std(ddof=1)) / math.sqrt(n), n


def varying_config(trials: pd.DataFrame) -> list[str]:
    """Config columns (besides model and seed) that differ between trials of the same model."""
    columns = [c for c in CONFIG_COLUMNS if c in trials and c not in NOT_GROUPING]
    if trials.empty:
        return []
    counts = trials.groupby("model")[columns].nunique(dropna=False)
    return [column for column in columns if (counts[column] > 1).any()]


def table1(trials: pd.DataFrame) -> pd.DataFrame:
    """Table 1: final mode and mean image entropy per model, mean and 95% CI over seeds.

    Only finished trials count. Trials of one model that differ in another setting (λ, d, lr, ...)
    form separate rows, named in the `setting` column. The last row is the real data's reference.
    """
    done = finished(trials)
    settings = varying_config(done)
    rank = {model: index for index, model in enumerate(model_order(done["model"]))}
    rows = []
    for keys, group in done.groupby(["model", *settings], dropna=False):
        model = keys[0]
        row = {"model": model, "setting": _setting(settings, keys[1:])}
        row.update(_mean_ci_columns(group))
        # The paper's figures are for 10 MNIST digits, not Stacked MNIST's 1,000 modes.
        stacked = "dataset" in group and str(group["dataset"].iloc[0]).startswith("stacked")
        row["paper_mode_entropy"] = math.nan if stacked else PAPER_MODE_ENTROPY.get(model, math.nan)
        rows.append(row)
    rows.sort(key=lambda row: rank[row["model"]])  # stable: settings stay in groupby order
    rows += [_real_data_row(group, setting) for setting, group in real_data_groups(trials)]
    table = pd.DataFrame(rows)
    table["n_seeds"] = table["n_seeds"].astype("Int64")
    return table


def _setting(keys: Sequence[str], values: Sequence[object]) -> str:
    return ", ".join(f"{key}={_short(value)}" for key, value in zip(keys, values, strict=True))


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _mean_ci_columns(group: pd.DataFrame) -> dict[str, float]:
    row: dict[str, float] = {"n_seeds": int(group["seed"].nunique())}
    for metric in ("mode_entropy", "mean_image_entropy"):
        mean, half_width, _ = mean_ci(group[f"final_{metric}"])
        row[f"{metric}_mean"] = mean
        row[f"{metric}_ci95"] = half_width
    return row


def real_data_groups(trials: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The setting of each real-data row and the trials that hold its scores: one row, or one
    per dataset in a study over several (each has its own images and evaluator)."""
    if "dataset" not in trials or trials["dataset"].nunique() < 2:
        return [("held-out images", trials)]
    return [
        (f"held-out images, dataset={name}", group) for name, group in trials.groupby("dataset")
    ]


def _real_data_row(trials: pd.DataFrame, setting: str) -> dict[str, object]:
    """The evaluator's scores of the held-out real images: what a perfect generator would get."""

    def first(column: str) -> float:
        values = trials[column].dropna() if column in trials else pd.Series(dtype=float)
        return float(values.iloc[0]) if len(values) else math.nan

    return {
        "model": REAL_DATA,
        "setting": setting,
        "n_seeds": math.nan,
        "mode_entropy_mean": first("real_mode_entropy"),
        "mode_entropy_ci95": math.nan,
        "mean_image_entropy_mean": first("real_mean_image_entropy"),
        "mean_image_entropy_ci95": math.nan,
        "paper_mode_entropy": math.nan,
    }


def image_entropies(trials: pd.DataFrame, model: str) -> np.ndarray:
    """Per-image entropies of the last evaluation of every finished trial of `model`."""
    done = finished(trials)
    lists = done.loc[done["model"] == model, "final_image_entropies"].dropna()
    if not len(lists):
        return np.array([])
    return np.concatenate([np.asarray(values, dtype=float) for values in lists])


def low_entropy_share(values: np.ndarray, threshold: float = LOW_ENTROPY_THRESHOLD) -> float:
    """Share of images the classifier is sure about (entropy below `threshold` nats)."""
    return float((values < threshold).mean()) if len(values) else math.nan


def image_entropy_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per model: how many images, their mean and median entropy, the share of low-entropy ones."""
    rows = []
    for model in model_order(finished(trials)["model"]):
        values = image_entropies(trials, model)
        rows.append(
            {
                "model": model,
                "n_images": len(values),
                "mean_entropy": float(values.mean()) if len(values) else math.nan,
                "median_entropy": float(np.median(values)) if len(values) else math.nan,
                "threshold": LOW_ENTROPY_THRESHOLD,
                "share_low_entropy": low_entropy_share(values),
            }
        )
    return pd.DataFrame(rows)


def objective_columns(objectives: Sequence[object]) -> dict[str, str]:
    """{trials-table column: "max" | "min"} for a spec's objectives (Objective(metric, mode))."""
    return {f"final_{o.metric}": o.mode for o in objectives}  # type: ignore[attr-defined]


def pareto_front(trials: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The rows no other row dominates, for `objectives` = {column: "max" | "min"}.

    A row is dominated when another is at least as good on every objective and better on one.
    Rows with a missing objective are left out; equal rows all stay. With one objective the front
    is the best row(s). Returned sorted by the first objective, best first.
    """
    columns = list(objectives)
    rows = trials.dropna(subset=columns)
    # Flip "min" objectives so that larger is better everywhere.
    signs = np.array([1.0 if objectives[c] == "max" else -1.0 for c in columns])
    scores = rows[columns].to_numpy(dtype=float) * signs
    at_least = (scores[:, None, :] >= scores[None, :, :]).all(axis=2)  # [i, j]: i >= j everywhere
    better = (scores[:, None, :] > scores[None, :, :]).any(axis=2)
    dominated = (at_least & better).any(axis=0)
    front = rows[~dominated]
    first = columns[0]
    return front.sort_values(first, ascending=objectives[first] == "min", kind="stable")


def failures(trials: pd.DataFrame) -> pd.DataFrame:
    """Every trial that did not finish, with its status, how far it got and why it stopped."""
    columns = ["trial_id", "model", "seed", "status", "iterations_done", "diverged_at"]
    columns += ["retries", "error"]
    rows = trials[trials["status"] != "finished"]
    present = [c for c in columns if c in rows]
    listed = rows[present].sort_values(["status", "trial_id"]).reset_index(drop=True)
    if "diverged_at" in listed:  # a float column only because it holds NaN
        listed["diverged_at"] = listed["diverged_at"].astype("Int64")
    return listed


def status_counts(trials: pd.DataFrame) -> dict[str, int]:
    """{status: number of trials}, finished first."""
    counts = trials["status"].value_counts()
    order = ["finished", *STOPPED_STATUSES]
    ranked = sorted(counts.index, key=lambda s: (order.index(s) if s in order else len(order), s))
    return {status: int(counts[status]) for status in ranked}


def trial_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials table without its per-image arrays and sample grids: one readable row each."""
    arrays = ["final_samples_png", "final_sample_labels", "final_image_entropies"]
    arrays += ["final_class_histogram"]
    return trials.drop(columns=[c for c in arrays if c in trials])
