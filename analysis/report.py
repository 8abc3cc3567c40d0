"""Assemble a study's report folder: `report.md` with PNG figures and CSV tables beside it, and
`report.html`, the same report as one self-contained page."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import constraint, document, fidelity, figures, suggestions, tables
from analysis.document import Block, Image, Table, number
from analysis.load import Study
from gvae.study.spec import Range

PAPER = "A Probe Towards Understanding GAN and VAE Models (2018)"


@dataclass
class Report:
    """What `write_report` wrote: the Markdown file and every table and figure beside it."""

    folder: Path
    files: list[Path] = field(default_factory=list)

    @property
    def markdown(self) -> Path:
        return self.folder / "report.md"

    @property
    def html(self) -> Path:
        return self.folder / "report.html"


def write_report(study: Study, folder: Path) -> Report:
    """Write the report of `study` into `folder` (created), replacing files of the same names."""
    folder.mkdir(parents=True, exist_ok=True)
    report = Report(folder)
    trials = study.trials
    lines: list[Block] = _header(study)

    lines += ["## Table 1: mode entropy and mean image entropy", ""]
    table1 = tables.table1(trials)
    _csv(report, "table1.csv", table1)
    lines += _table1_text(table1)
    lines += _table2_section(report, trials)
    stacked = trials[trials["dataset"].str.startswith("stacked-mnist")] if len(trials) else trials
    if len(stacked):
        lines += _stacked_mnist_section(report, stacked)
    lines += _constraint_section(report, trials)
    if tables.finished(trials).empty:
        lines += ["No trial has finished yet: nothing to plot (see the list below).", ""]
    else:
        lines += _figures(report, study)
        if study.spec.search_type == "optuna":
            lines += _optuna_section(report, study)

    lines += _failures_section(report, trials)
    _csv(report, "trials.csv", tables.trial_summary(trials))
    lines += ["All trials, without their arrays: [trials.csv](trials.csv).", ""]

    report.markdown.write_text(document.markdown(lines))
    report.html.write_text(document.html_page(lines, f"Study {study.name}"))
    report.files[:0] = [report.markdown, report.html]
    return report


def _figures(report: Report, study: Study) -> list[Block]:
    """Figs. 3, 5, 8, the models' mean curves and the sample grids (2, 4, 7), from the finished
    trials (of the first dataset, in a study over several: entropies on 10 and on 1,000 modes do
    not share an axis)."""
    trials, lines = study.trials, []
    if len(study.spec.datasets) > 1:
        shown = study.spec.datasets[0]
        trials = trials[trials["dataset"] == shown]
        lines += [
            f"The figures and the per-image entropies below are those of the study's first "
            f"dataset, {shown}; the tables above cover every dataset.",
            "",
        ]
    curves = figures.mode_entropy_curves(study.curves, trials)
    lines += _figure(report, "mode_entropy_curves.png", curves, "Fig. 3: mode entropy by iteration")
    means = figures.mean_curves(study.curves, trials)
    lines += _figure(report, "mean_curves.png", means, "Every metric by iteration, model means")

    lines += ["## Per-image entropy (Figs. 5 and 8)", ""]
    entropy_table = tables.image_entropy_table(trials)
    _csv(report, "image_entropy.csv", entropy_table)
    lines += [
        f"An image is *low entropy* when the classifier's entropy over its ten classes is below "
        f"{tables.LOW_ENTROPY_THRESHOLD:g} nats (it is sure which digit it sees); ln 10 = 2.303 is "
        "total doubt. Pooled over the finished trials' last evaluation.",
        "",
        Table(entropy_table, digits=3),
        "",
    ]
    histograms = figures.image_entropy_histograms(trials)
    lines += _figure(report, "image_entropy_histograms.png", histograms, "Fig. 5: per model")
    comparison = figures.image_entropy_comparison(trials)
    if comparison is None:
        lines += ["Fig. 8 (VAE-GAN against constrained VAE-GAN) needs finished trials of both.", ""]
    else:
        lines += _figure(
            report, "vaegan_vs_cvaegan_entropy.png", comparison, "Fig. 8: VAE-GAN vs cvaegan"
        )

    lines += [
        "## Samples (Figs. 2, 4 and 7)",
        "",
        "One finished trial per model (the lowest seed, so nothing is cherry-picked); the digits "
        "left of each row are the classifier's labels of its ten images.",
        "",
    ]
    return lines + _figure(report, "samples.png", figures.sample_grids(trials), "Sample grids")


def _header(study: Study) -> list[Block]:
    spec = study.spec
    counts = tables.status_counts(study.trials)
    search = spec.search_type
    if search == "optuna":
        wanted = ", ".join(f"{o.metric} {o.mode}" for o in spec.objectives)
        search = f"Optuna, {spec.trials} trials, objectives: {wanted}"
    lines = [f"# Study `{study.name}`", ""]
    if spec.description:
        lines += [spec.description, ""]
    lines += [
        f"- models: {', '.join(spec.models)}; dataset: {', '.join(spec.datasets)}; "
        f"{spec.iterations} iterations, evaluated every {spec.eval_every}",
        f"- search: {search}",
        f"- trials: {', '.join(f'{n} {status}' for status, n in counts.items())}",
        f"- tables: {study.store.uri}",
        f"- reproducing: {PAPER}",
        "",
    ]
    return lines


def _table1_text(table: pd.DataFrame) -> list[Block]:
    shown = pd.DataFrame(
        {
            "model": table["model"],
            "setting": table["setting"],
            "seeds": table["n_seeds"].map(lambda n: "" if pd.isna(n) else str(int(n))),
            "mode entropy": _with_ci(table, "mode_entropy"),
            "paper": table["paper_mode_entropy"].map(number),
            "mean image entropy": _with_ci(table, "mean_image_entropy"),
        }
    )
    shown = _without_empty_setting(shown)
    return [
        "Final evaluation of finished trials: mean ± half-width of the 95% t-interval over seeds "
        "(blank with one seed). Mode entropy: higher is more diverse (ln K at most for K modes: "
        "ln 10 = 2.303, ln 1000 = 6.908 on Stacked MNIST); "
        "mean image entropy: lower is sharper. *paper*: the paper's Table 1.",
        "",
        *_table_lines(shown, "table1.csv"),
    ]


def _table2_section(report: Report, trials: pd.DataFrame) -> list[Block]:
    table = fidelity.table2(trials)
    _csv(report, "table2.csv", table)
    shown = pd.DataFrame({"model": table["model"], "setting": table["setting"]})
    names = {"modes_covered": "modes", "kl_to_uniform": "KL", "classifier_score": "score"}
    names.update(frechet_distance="Frechet")
    for metric in fidelity.FIDELITY_METRICS:
        shown[names.get(metric, metric)] = _with_ci(table, metric)
    shown = _without_empty_setting(shown)
    return [
        "## Table 2: fidelity and diversity",
        "",
        "In the evaluator's feature space, final evaluation, mean ± 95% t-interval over seeds. "
        "*modes*: modes with at least one sample; *KL*: KL(mode histogram ‖ uniform) = ln K − "
        "mode entropy (lower is more even); *score*: exp(H(mean p) − mean H(p)), the Inception "
        "Score with our classifier (at most the number of modes); *precision*/*recall*: "
        "Kynkäänniemi et al. 2019, k = 3; *density*/*coverage*: Naeem et al. 2020, k = 5 (the "
        "k-NN metrics use at most 5,000 generated and 5,000 held-out images); *Frechet*: "
        "Frechet distance of the classifier's features (not comparable with published FIDs).",
        "",
        *_table_lines(shown, "table2.csv"),
    ]


def _stacked_mnist_section(report: Report, trials: pd.DataFrame) -> list[Block]:
    table = fidelity.stacked_mnist_table(trials)
    _csv(report, "stacked_mnist.csv", table)
    shown = pd.DataFrame(
        {
            "source": table["source"],
            "model": table["model"],
            "setting": table["setting"].fillna(""),
            "modes covered (of 1000)": _with_ci(table, "modes_covered", digits=1),
            "KL to uniform": _with_ci(table, "kl_to_uniform", digits=2),
        }
    )
    return [
        "## Stacked MNIST beside published numbers",
        "",
        "Published rows: PacGAN (Lin et al. 2018) Table 2, with ALI, Unrolled GAN and VEEGAN as "
        "PacGAN quotes them from the VEEGAN paper. They use other architectures, training lengths "
        "and classifiers, and count modes over 26,000 samples; set `eval_samples: 26000` for the "
        "same count here. Compare orders of magnitude, not decimals.",
        "",
        *_table_lines(shown, "stacked_mnist.csv"),
    ]


def _constraint_section(report: Report, trials: pd.DataFrame) -> list[Block]:
    effect = constraint.constraint_effect(trials)
    if effect.empty:
        return []
    _csv(report, "constraint_effect.csv", effect)
    shown = effect[["setting", "metric", "vaegan", "cvaegan", "difference"]].copy()
    shown["95% Welch interval"] = [
        "" if pd.isna(low) else f"{number(low)} to {number(high)}"
        for low, high in zip(effect["ci95_low"], effect["ci95_high"], strict=True)
    ]
    shown["seeds"] = effect["seeds"]
    shown["verdict"] = effect["verdict"]
    if (shown["setting"] == "").all():
        shown = shown.drop(columns="setting")
    return [
        "## Does the constraint help?",
        "",
        "Constrained VAE-GAN minus VAE-GAN, per cvaegan setting and metric (final evaluation): "
        "the difference of the seed means and its 95% Welch interval. *higher*/*lower* only when "
        "the interval excludes zero; (better) or (worse) by the metric's direction "
        "(low_entropy_share: share of images below "
        f"{tables.LOW_ENTROPY_THRESHOLD:g} nats, higher taken as better as in the paper).",
        "",
        *constraint.hinge_activity(trials),
        "",
        Table(shown),
        "",
        "The paper's Fig. 8 claim, *a higher concentration of low-entropy images*:",
        "",
        *constraint.fig8_claim(effect),
        "",
        "Data: [constraint_effect.csv](constraint_effect.csv).",
        "",
    ]


def _with_ci(table: pd.DataFrame, metric: str, digits: int = 3) -> pd.Series:
    def text(row: pd.Series) -> str:
        mean, half = row[f"{metric}_mean"], row.get(f"{metric}_ci95")
        if pd.isna(mean):
            return ""
        return number(mean, digits) + ("" if pd.isna(half) else f" ± {number(half, digits)}")

    return table.apply(text, axis=1)


def _optuna_section(report: Report, study: Study) -> list[Block]:
    """Optuna's view of the study: each suggestion is the mean of its seed replicates."""
    objectives = tables.objective_columns(study.spec.objectives)
    searched = [key for key in study.spec.space if key in study.trials]
    means = suggestions.suggestion_means(study.trials, objectives, searched)
    best = suggestions.pareto_of_means(means, objectives)
    _csv(report, "best_suggestions.csv", best)
    title = "Pareto front" if len(objectives) > 1 else "Best suggestions"
    wanted = ", ".join(f"{c} {m}" for c, m in objectives.items())
    lines = [
        "## Optuna search",
        "",
        f"{title} of the suggestions ({wanted}), each the mean over its seeds ± the 95% "
        f"t-interval (replicates: {study.spec.replicates}; an interval needs two seeds):",
        "",
        Table(_with_intervals(best, objectives), digits=4),
        "",
        "Data: [best_suggestions.csv](best_suggestions.csv).",
        "",
    ]
    if len(objectives) > 1:
        figure = figures.suggestion_front_figure(means, objectives)
        lines += _figure(report, "pareto_front.png", figure, title)
    lines += _search_progress(report, study, means, objectives)
    axes = _landscape_axes(study)
    if axes:
        x, y = axes
        figure = figures.landscape(
            study.trials, x, y, list(objectives), log_x=_is_log(study, x), log_y=_is_log(study, y)
        )
        lines += _figure(report, "landscape.png", figure, f"Objectives over {x} and {y or 'it'}")
    return lines + _optuna_plots(report, study)


def _optuna_plots(report: Report, study: Study) -> list[Block]:
    """Optuna's own plots (history, parameter importances, Pareto front), drawn by
    optuna.visualization.matplotlib from the study's journal, where the study has one."""
    loaded = suggestions.optuna_study(study.store, study.name, study.spec.optuna_storage)
    if loaded is None or not any(t.state.name == "COMPLETE" for t in loaded.trials):
        return []
    import optuna.visualization.matplotlib as plots

    names = [objective.metric for objective in study.spec.objectives]
    lines: list[Block] = ["### Optuna's own plots", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
        for index, name in enumerate(names):
            target = (lambda t, i=index: t.values[i]) if len(names) > 1 else None
            axes = plots.plot_optimization_history(loaded, target=target, target_name=name)
            lines += _figure(report, f"optuna_history_{name}.png", axes.figure, f"{name} by trial")
            try:
                axes = plots.plot_param_importances(loaded, target=target, target_name=name)
            except (ValueError, RuntimeError):  # too few finished trials, or one parameter
                continue
            caption = f"Parameter importances for {name}"
            lines += _figure(report, f"optuna_importances_{name}.png", axes.figure, caption)
        if len(names) > 1:
            axes = plots.plot_pareto_front(loaded, target_names=names)
            lines += _figure(
                report, "optuna_pareto_front.png", axes.figure, "Optuna's Pareto front"
            )
    return lines


def _with_intervals(best: pd.DataFrame, objectives: dict[str, str]) -> pd.DataFrame:
    """The best suggestions with each objective as one 'mean ± half-width' cell."""
    shown = best.drop(columns=[f"{c}_ci" for c in objectives if f"{c}_ci" in best])
    for column in objectives:
        renamed = best.rename(columns={column: f"{column}_mean", f"{column}_ci": f"{column}_ci95"})
        shown[column] = _with_ci(renamed, column)
    return shown


def _search_progress(
    report: Report, study: Study, means: pd.DataFrame, objectives: dict[str, str]
) -> list[Block]:
    """The best value against the number of suggestions, and the parameters' importances."""
    best = suggestions.best_so_far(means, objectives)
    _csv(report, "best_so_far.csv", best)
    lines = _figure(report, "best_so_far.png", figures.best_so_far_figure(best), "Best mean so far")
    importances = suggestions.importances(means, objectives, study.spec.space)
    if importances.empty:
        return [*lines, "Parameter importances need two or more finished suggestions.", ""]
    table = importances.rename_axis("parameter").reset_index()
    _csv(report, "importances.csv", table)
    return [
        *lines,
        "Parameter importances (Optuna's default evaluator, over the suggestion means; each "
        "column sums to 1):",
        "",
        Table(table),
        "",
    ]


def _landscape_axes(study: Study) -> tuple[str, str | None] | None:
    """λ and d when both were searched, else the first two numeric searched parameters."""
    numeric = [k for k, v in study.spec.space.items() if isinstance(v, Range) and k in study.trials]
    if {"lam", "d"} <= set(numeric):
        return "lam", "d"
    if not numeric:
        return None
    return numeric[0], numeric[1] if len(numeric) > 1 else None


def _is_log(study: Study, key: str | None) -> bool:
    value = study.spec.space.get(key) if key else None
    return isinstance(value, Range) and value.log


def _failures_section(report: Report, trials: pd.DataFrame) -> list[Block]:
    failed = tables.failures(trials)
    _csv(report, "failures.csv", failed)
    lines = ["## Trials that did not finish", ""]
    if failed.empty:
        return [*lines, "None: every trial finished.", ""]
    counts = failed["status"].value_counts()
    lines += [
        "Left out of every table and figure above: "
        + ", ".join(f"{n} {status}" for status, n in counts.items())
        + ". *diverged*: a loss became NaN or infinite at that iteration; *failed*: an error "
        "(retries exhausted); *stopped*: ended early by the scheduler; *running*: the study was "
        "interrupted (`gvae study resume` continues it).",
        "",
        Table(failed),
        "",
        "Data: [failures.csv](failures.csv).",
        "",
    ]
    return lines


def _figure(report: Report, name: str, figure: Figure, caption: str) -> list[Block]:
    """Save `figure` as `name` in the report folder; the same PNG bytes go into report.html."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    path = report.folder / name
    path.write_bytes(buffer.getvalue())
    report.files.append(path)
    return [Image(name, caption, buffer.getvalue()), ""]


def _csv(report: Report, name: str, table: pd.DataFrame) -> None:
    path = report.folder / name
    table.to_csv(path, index=False)
    report.files.append(path)


def _without_empty_setting(shown: pd.DataFrame) -> pd.DataFrame:
    """Drop the `setting` column when no row but the last (real data) names one."""
    if (shown["setting"].iloc[:-1] == "").all():
        return shown.drop(columns="setting")
    return shown


def _table_lines(shown: pd.DataFrame, csv_name: str) -> list[Block]:
    """A Markdown table and the link to the CSV file holding its data."""
    return [Table(shown), "", f"Data: [{csv_name}]({csv_name}).", ""]
