"""Fidelity and diversity per model (Table 2) and Stacked MNIST beside published numbers.

Like `analysis.tables`, every function takes the trials table and returns a new DataFrame.
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.tables import (
    REAL_DATA,
    _setting,
    finished,
    mean_ci,
    model_order,
    real_data_groups,
    varying_config,
)

# Table 2's metrics, each with the direction that is better.
FIDELITY_METRICS = {
    "modes_covered": "max",
    "kl_to_uniform": "min",
    "classifier_score": "max",
    "precision": "max",
    "recall": "max",
    "density": "max",
    "coverage": "max",
    "frechet_distance": "min",
}

# Stacked MNIST, modes covered (of 1,000) and KL(histogram || uniform) from PacGAN (Lin et al.
# 2018) Table 2; ALI, Unrolled GAN and VEEGAN as PacGAN quotes them from the VEEGAN paper. Other
# architectures, training lengths and classifiers than ours.
PUBLISHED_STACKED_MNIST = (
    ("DCGAN", 99.0, 3.40),
    ("ALI", 16.0, 5.40),
    ("Unrolled GAN", 48.7, 4.32),
    ("VEEGAN", 150.0, 2.95),
    ("PacDCGAN2", 1000.0, 0.06),
)
PUBLISHED = "published (PacGAN Table 2)"


def metric_table(trials: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per model and setting: `<metric>_mean`, `<metric>_ci95` over the seeds of finished trials
    (final evaluation), then the real data's row for the metrics it has."""
    done = finished(trials)
    settings = varying_config(done)
    rank = {model: index for index, model in enumerate(model_order(done["model"]))}
    rows = []
    for keys, group in done.groupby(["model", *settings], dropna=False):
        row: dict[str, object] = {"model": keys[0], "setting": _setting(settings, keys[1:])}
        row["n_seeds"] = int(group["seed"].nunique())
        for metric in metrics:
            column = f"final_{metric}"
            values = group[column] if column in group else pd.Series(dtype=float)
            row[f"{metric}_mean"], row[f"{metric}_ci95"], _ = mean_ci(values)
        rows.append(row)
    rows.sort(key=lambda row: rank[row["model"]])
    for setting, group in real_data_groups(trials):
        real: dict[str, object] = {"model": REAL_DATA, "setting": setting}
        for metric in metrics:
            real[f"{metric}_mean"] = _first(group, f"real_{metric}")
            real[f"{metric}_ci95"] = math.nan
        rows.append(real)
    return pd.DataFrame(rows)


def table2(trials: pd.DataFrame) -> pd.DataFrame:
    """Table 2: mode counts, classifier score, precision/recall, density/coverage, Frechet."""
    return metric_table(trials, list(FIDELITY_METRICS))


def stacked_mnist_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Modes covered and KL to uniform: ours per model, the real data, then published numbers."""
    ours = metric_table(trials, ["modes_covered", "kl_to_uniform"])
    ours.insert(0, "source", "this study")
    published = pd.DataFrame(
        [
            {
                "source": PUBLISHED,
                "model": name,
                "setting": "",
                "modes_covered_mean": modes,
                "kl_to_uniform_mean": kl,
            }
            for name, modes, kl in PUBLISHED_STACKED_MNIST
        ]
    )
    return pd.concat([ours, published], ignore_index=True)


def _first(trials: pd.DataFrame, column: str) -> float:
    values = trials[column].dropna() if column in trials else pd.Series(dtype=float)
    return float(values.iloc[0]) if len(values) else math.nan
