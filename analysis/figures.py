"""The paper's figures from a study's tables, as matplotlib Figures.

Built on `matplotlib.figure.Figure` rather than pyplot: no global state, nothing to close, and
`fig.savefig` renders with Agg whatever backend a notebook uses (where `display(fig)` shows it).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

import matplotlib.image
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from analysis.fidelity import FIDELITY_METRICS
from analysis.tables import (
    LOW_ENTROPY_THRESHOLD,
    finished,
    image_entropies,
    low_entropy_share,
    model_order,
    pareto_front,
)

MAX_ENTROPY = math.log(10)  # ln 10: ten classes, evenly spread
MODEL_COLORS = {
    "gan": "tab:red",
    "wgan": "tab:orange",
    "vae": "tab:blue",
    "vaegan": "tab:green",
    "cvaegan": "tab:purple",
}
GRID_ROWS = 10  # the trainer's sample grid is 10 x 10
# The curves `mean_curves` draws, in this order, each with the direction that is better.
CURVE_METRICS = {"mode_entropy": "max", "mean_image_entropy": "min", **FIDELITY_METRICS}


def _color(model: str) -> str:
    return MODEL_COLORS.get(model, "tab:gray")


def max_entropy(trials: pd.DataFrame) -> float:
    """ln K for the K modes the study's histograms count (ln 10 for digits, ln 1000 for Stacked
    MNIST), read off the recorded class histograms."""
    histograms = trials.get("final_class_histogram", pd.Series(dtype=object)).dropna()
    return math.log(len(histograms.iloc[0])) if len(histograms) else MAX_ENTROPY


def mode_entropy_curves(curves: pd.DataFrame, trials: pd.DataFrame) -> Figure:
    """Fig. 3: mode entropy against iteration, a thin line per finished trial, the mean in bold."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    done = curves[curves["trial_id"].isin(finished(trials)["trial_id"])]
    for model in model_order(done["model"]):
        rows = done[done["model"] == model]
        for _, trial in rows.groupby("trial_id"):
            axes.plot(trial["iteration"], trial["mode_entropy"], color=_color(model), alpha=0.3)
        mean = rows.groupby("iteration")["mode_entropy"].mean()
        n = rows["trial_id"].nunique()
        axes.plot(mean.index, mean.values, color=_color(model), lw=2.2, label=f"{model} (n={n})")
    top = max_entropy(trials)
    label = f"ln {round(math.exp(top))} (all modes)"
    axes.axhline(top, color="black", ls=":", lw=1, label=label)
    axes.set(xlabel="iteration", ylabel="mode entropy (nats)", ylim=(-0.05, top + 0.1))
    axes.set_title("Mode entropy during training (thin: one trial; bold: mean over trials)")
    axes.legend(loc="lower right", fontsize="small")
    return figure


def mean_curves(curves: pd.DataFrame, trials: pd.DataFrame) -> Figure:
    """Every recorded metric against iteration, a panel each, with one line per model: its mean
    over the finished trials, so that the models compare at a glance."""
    done = curves[curves["trial_id"].isin(finished(trials)["trial_id"])]
    metrics = [m for m in CURVE_METRICS if m in done and done[m].notna().any()]
    columns = min(len(metrics), 4) or 1
    rows = math.ceil(len(metrics) / columns) or 1
    figure = Figure(figsize=(3.4 * columns, 2.7 * rows + 0.6), layout="constrained")
    models = model_order(done["model"])
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(rows, columns, index + 1)
        for model in models:
            mean = done[done["model"] == model].groupby("iteration")[metric].mean().dropna()
            axes.plot(mean.index, mean.values, "o-", ms=3, color=_color(model), label=model)
        better = "higher" if CURVE_METRICS[metric] == "max" else "lower"
        axes.set_title(f"{metric} ({better} is better)", fontsize="medium")
        axes.set_xlabel("iteration")
    if metrics:
        handles, labels = figure.axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside lower center", ncols=max(len(models), 1))
    figure.suptitle("Each model's mean over its finished trials, by iteration")
    return figure


def image_entropy_histograms(trials: pd.DataFrame) -> Figure:
    """Fig. 5: per model, the histogram of per-image entropies at the last evaluation."""
    models = model_order(finished(trials)["model"])
    # At least 6.5 inches wide: the title is cut off above one narrow panel.
    figure = Figure(figsize=(max(3.2 * len(models), 6.5), 3.2), layout="constrained")
    bins = np.linspace(0, max_entropy(trials), 24)
    for index, model in enumerate(models):
        axes = figure.add_subplot(1, len(models), index + 1)
        values = image_entropies(trials, model)
        axes.hist(values, bins=bins, color=_color(model), density=True)
        axes.axvline(LOW_ENTROPY_THRESHOLD, color="black", ls="--", lw=1)
        share = low_entropy_share(values)
        axes.set_title(f"{model}: {share:.0%} below {LOW_ENTROPY_THRESHOLD:g}", fontsize="medium")
        axes.set_xlabel("image entropy (nats)")
        if index == 0:
            axes.set_ylabel("density")
    figure.suptitle(
        f"Per-image entropy of generated samples (dashed: {LOW_ENTROPY_THRESHOLD:g} nats)"
    )
    return figure


def image_entropy_comparison(
    trials: pd.DataFrame, models: Sequence[str] = ("vaegan", "cvaegan")
) -> Figure | None:
    """Fig. 8: per-image entropy of `models` on one axes; None unless each has a finished trial."""
    values = {model: image_entropies(trials, model) for model in models}
    if any(len(v) == 0 for v in values.values()):
        return None
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    bins = np.linspace(0, max_entropy(trials), 24)
    for model, entropies in values.items():
        share = low_entropy_share(entropies)
        label = f"{model}: {share:.0%} below {LOW_ENTROPY_THRESHOLD:g} nats (n={len(entropies)})"
        axes.hist(
            entropies, bins, density=True, histtype="step", lw=2, color=_color(model), label=label
        )
    axes.axvline(LOW_ENTROPY_THRESHOLD, color="black", ls="--", lw=1)
    axes.set(xlabel="image entropy (nats)", ylabel="density")
    axes.set_title(" vs ".join(models) + ": per-image entropy")
    axes.legend(fontsize="small")
    return figure


def decode_grid(png_base64: str) -> np.ndarray:
    """The 10x10 sample grid a trial recorded (final_samples_png) as an image array."""
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(png_base64)), format="png")


def representative_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """One finished trial per model: the lowest seed (not the best one, so nothing is picked)."""
    done = finished(trials).dropna(subset=["final_samples_png"])
    chosen = done.sort_values(["seed", "trial_id"]).groupby("model", sort=False).head(1)
    order = {model: index for index, model in enumerate(model_order(chosen["model"]))}
    return chosen.sort_values("model", key=lambda column: column.map(order))


def sample_grids(trials: pd.DataFrame) -> Figure:
    """Figs. 2, 4 and 7: each model's last sample grid, every row labelled by the classifier."""
    chosen = representative_trials(trials)
    figure = Figure(figsize=(max(3.6 * len(chosen), 6.5), 4.0), layout="constrained")
    for index, (_, trial) in enumerate(chosen.iterrows()):
        axes = figure.add_subplot(1, len(chosen), index + 1)
        image = decode_grid(trial["final_samples_png"])
        axes.imshow(image, cmap="gray")
        labels = [] if trial["final_sample_labels"] is None else list(trial["final_sample_labels"])
        height = image.shape[0]
        rows = [labels[i : i + GRID_ROWS] for i in range(0, len(labels), GRID_ROWS)]
        axes.set_yticks([(i + 0.5) * height / GRID_ROWS for i in range(len(rows))])
        axes.set_yticklabels([" ".join(str(label) for label in row) for row in rows])
        axes.tick_params(axis="y", labelsize=7, length=0)
        axes.set_xticks([])
        axes.set_title(f"{trial['model']} (seed {trial['seed']}, {trial['trial_id']})", fontsize=9)
    figure.suptitle("Samples at the last evaluation; left: the classifier's label of each image")
    return figure


def landscape(
    trials: pd.DataFrame,
    x: str,
    y: str | None,
    metrics: Sequence[str],
    log_x: bool = False,
    log_y: bool = False,
) -> Figure:
    """Finished trials over the searched parameters, coloured by each metric (one panel each).

    With `y` None the metric itself is the vertical axis.
    """
    done = finished(trials)
    figure = Figure(figsize=(5.2 * len(metrics), 4.2), layout="constrained")
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        if y is None:
            axes.scatter(done[x], done[metric], color="tab:purple")
            axes.set(xlabel=x + (" (log scale)" if log_x else ""), ylabel=metric)
        else:
            points = axes.scatter(done[x], done[y], c=done[metric], cmap="viridis", s=40)
            figure.colorbar(points, ax=axes, label=metric)
            axes.set(xlabel=x + (" (log scale)" if log_x else ""), ylabel=y)
            if log_y:
                _log_scale(axes, "y")
        if log_x:
            _log_scale(axes, "x")
        axes.set_title(metric.removeprefix("final_"))
    return figure


def _log_scale(axes: Axes, which: str) -> None:
    """A log scale labelled 0.5, 1, 10: by default matplotlib labels the minor ticks of a short
    range, and the labels overlap."""
    getattr(axes, f"set_{which}scale")("log")
    axis = axes.xaxis if which == "x" else axes.yaxis
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def suggestion_front_figure(means: pd.DataFrame, objectives: Mapping[str, str]) -> Figure:
    """Each suggestion's seed mean with its 95% interval in both objectives, the front in red."""
    x, y = list(objectives)[:2]
    front = pareto_front(means.dropna(subset=[x, y]), {x: objectives[x], y: objectives[y]})
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for rows, color, label in ((means, "tab:gray", "suggestions"), (front, "tab:red", "front")):
        axes.errorbar(
            rows[x],
            rows[y],
            xerr=rows.get(f"{x}_ci"),
            yerr=rows.get(f"{y}_ci"),
            fmt="o",
            color=color,
            ecolor=color,
            alpha=0.8,
            capsize=2,
            label=f"{label} (n={len(rows)})",
        )
    for _, row in front.iterrows():
        name = str(row["suggestion"]).rsplit("_", 1)[-1]
        axes.annotate(name, (row[x], row[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes.set(
        xlabel=f"{x.removeprefix('final_')}, mean over seeds",
        ylabel=f"{y.removeprefix('final_')}, mean over seeds",
    )
    axes.set_title("Suggestions: seed means and 95% intervals")
    axes.legend(fontsize="small")
    return figure


def best_so_far_figure(best: pd.DataFrame) -> Figure:
    """The best seed mean of each objective against the number of suggestions tried."""
    columns = [c for c in best.columns if c.startswith("best_")]
    figure = Figure(figsize=(5 * len(columns), 3.6), layout="constrained")
    for index, column in enumerate(columns):
        axes = figure.add_subplot(1, len(columns), index + 1)
        axes.step(best["suggestions"], best[column], where="post", color="tab:purple")
        axes.plot(best["suggestions"], best[column], "o", color="tab:purple", markersize=3)
        axes.set(xlabel="suggestions tried", ylabel=column.replace("best_final_", "best "))
    return figure
