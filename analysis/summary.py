"""The end-of-study summary that `gvae study run` and `gvae study status` print."""

from __future__ import annotations

import math

import pandas as pd

from gvae.study.results import CURVES, TRIALS, ResultsStore
from gvae.study.spec import StudySpec

SUMMARY_COLUMNS = [
    *("trial_id", "model", "seed", "dataset", "status", "error", "diverged_at"),
    *("final_mode_entropy", "final_mean_image_entropy", "final_class_histogram"),
]


def summary_trials(store: ResultsStore) -> pd.DataFrame:
    """The columns of the trials table the summary shows (not the per-image arrays: 80 KB a
    trial)."""
    return store.read(TRIALS, SUMMARY_COLUMNS)


def summary_lines(trials: pd.DataFrame, store: ResultsStore, spec: StudySpec) -> list[str]:
    """A short end-of-study summary of `summary_trials`: counts by status, the best trials,
    the failures."""
    if trials.empty:
        return ["no trials recorded yet"]
    counts = trials["status"].value_counts().to_dict()
    lines = [f"study {spec.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    done = trials[trials["status"] == "finished"]
    for dataset, group in done.groupby("dataset"):  # mode entropies compare within a dataset
        best = group.sort_values("final_mode_entropy", ascending=False).head(5)
        modes = len(best.iloc[0]["final_class_histogram"])  # 10 digits, or 8 face modes
        where = f" on {dataset}" if len(spec.datasets) > 1 else ""
        lines.append(
            f"best by final mode_entropy{where} (ln {modes} = {math.log(modes):.3f} is the "
            "ceiling):"
        )
        for _, row in best.iterrows():
            lines.append(
                f"  {row['trial_id']}  {row['model']:8s} seed={row['seed']}  "
                f"mode_entropy {row['final_mode_entropy']:.3f}  "
                f"mean_image_entropy {row['final_mean_image_entropy']:.3f}"
            )
    for _, row in trials[trials["status"].isin(["failed", "diverged"])].iterrows():
        reason = row["error"] if row["status"] == "failed" else f"at it {row['diverged_at']:.0f}"
        lines.append(f"  {row['status']}: {row['trial_id']} {row['model']}: {reason}")
    lines.append(f"tables: {store.location(TRIALS)}, {store.location(CURVES)}")
    return lines
