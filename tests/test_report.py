"""`gvae report`: Table 1 and its intervals, the Pareto front, and real report folders."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from analysis import constraint, document, fidelity, load_study, tables
from gvae.cli import main
from tests import tiny_studies

T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (any t table)


@pytest.fixture(scope="session")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_studies.storage(tmp_path_factory)


def trials_frame(rows: list[dict]) -> pd.DataFrame:
    """A trials table with only the columns the tables need."""
    defaults = {"status": "finished", "lam": 1.0, "d": 0.0, "lr": 2e-4, "device": "cpu"}
    defaults.update({"real_mode_entropy": 2.30, "real_mean_image_entropy": 0.07})
    return pd.DataFrame([{**defaults, **row} for row in rows])


# --- tables on hand-made frames -------------------------------------------------------------


def test_mean_ci_is_the_t_interval():
    mean, half_width, n = tables.mean_ci([1.0, 2.0, 4.0])
    assert (mean, n) == (pytest.approx(7 / 3), 3)
    assert half_width == pytest.approx(T_975_DF2 * statistics.stdev([1, 2, 4]) / math.sqrt(3))
    assert math.isnan(tables.mean_ci([1.5])[1]) and tables.mean_ci([1.5])[0] == 1.5
    assert tables.mean_ci([float("nan")])[2] == 0


def test_table1_means_intervals_paper_and_real_rows():
    trials = trials_frame(
        [
            {"model": "vae", "seed": s, "final_mode_entropy": m, "final_mean_image_entropy": i}
            for s, m, i in [(0, 1.0, 0.5), (1, 2.0, 0.6), (2, 4.0, 0.7)]
        ]
        + [
            {"model": "gan", "seed": 0, "final_mode_entropy": 0.3, "final_mean_image_entropy": 1},
            {"model": "gan", "seed": 1, "status": "diverged"},  # never averaged
        ]
    )
    table = tables.table1(trials).set_index("model")
    assert list(table.index) == ["gan", "vae", tables.REAL_DATA]  # the paper's order
    assert table.loc["vae", "n_seeds"] == 3 and table.loc["gan", "n_seeds"] == 1
    assert table.loc["vae", "mode_entropy_mean"] == pytest.approx(7 / 3)
    expected = T_975_DF2 * statistics.stdev([1, 2, 4]) / math.sqrt(3)
    assert table.loc["vae", "mode_entropy_ci95"] == pytest.approx(expected)
    assert table.loc["vae", "mean_image_entropy_ci95"] == pytest.approx(T_975_DF2 * 0.1 / 3**0.5)
    assert math.isnan(table.loc["gan", "mode_entropy_ci95"])  # one seed: no interval
    assert table.loc["gan", "paper_mode_entropy"] == 0.0
    assert table.loc["vae", "paper_mode_entropy"] == 2.266
    assert table.loc[tables.REAL_DATA, "mode_entropy_mean"] == 2.30
    assert table.loc[tables.REAL_DATA, "mean_image_entropy_mean"] == 0.07


def test_table1_keeps_settings_of_one_model_apart():
    trials = trials_frame(
        [
            {"model": "cvaegan", "seed": s, "lam": lam, "final_mode_entropy": m}
            | {"final_mean_image_entropy": 1.0}
            for s, lam, m in [(0, 1.0, 2.0), (1, 1.0, 2.2), (0, 10.0, 1.0)]
        ]
    )
    table = tables.table1(trials)
    assert list(table["setting"][:2]) == ["lam=1", "lam=10"]
    assert list(table["n_seeds"][:2]) == [2, 1]
    assert table["mode_entropy_mean"][0] == pytest.approx(2.1)


def test_a_study_over_two_datasets_has_rows_and_a_real_data_row_per_dataset():
    trials = trials_frame(
        [
            {"model": "vae", "seed": s, "dataset": name, "final_mode_entropy": m}
            | {"final_mean_image_entropy": 1.0, "real_mode_entropy": real}
            | {"final_modes_covered": m * 10, "real_modes_covered": real * 10}
            for s, name, m, real in [
                (0, "mnist5k", 2.0, 2.3),
                (1, "mnist5k", 2.2, 2.3),
                (0, "stacked-mnist5k", 5.0, 6.9),
                (1, "stacked-mnist5k", 5.4, 6.9),
            ]
        ]
    )
    table = tables.table1(trials)
    assert list(table["setting"]) == [
        "dataset=mnist5k",
        "dataset=stacked-mnist5k",
        "held-out images, dataset=mnist5k",
        "held-out images, dataset=stacked-mnist5k",
    ]
    assert list(table["mode_entropy_mean"]) == pytest.approx([2.1, 5.2, 2.3, 6.9])
    assert table["paper_mode_entropy"][0] == 2.266 and math.isnan(table["paper_mode_entropy"][1])
    table2 = fidelity.table2(trials)
    assert list(table2["modes_covered_mean"]) == pytest.approx([21, 52, 23, 69])


def test_pareto_front_of_a_hand_made_frame():
    points = {
        "a": (2.0, 0.5),
        "b": (1.5, 0.3),
        "b_twin": (1.5, 0.3),  # equal points do not dominate each other
        "c": (1.0, 0.6),  # dominated by a and b
        "d": (2.0, 0.7),  # dominated by a (same diversity, blurrier)
        "e": (0.5, 0.1),  # the sharpest
        "nan": (math.nan, 0.9),  # left out of the two-objective front
    }
    frame = pd.DataFrame(
        [
            {"trial_id": k, "final_mode_entropy": m, "final_mean_image_entropy": i}
            for k, (m, i) in points.items()
        ]
    )
    both = {"final_mode_entropy": "max", "final_mean_image_entropy": "min"}
    front = tables.pareto_front(frame, both)
    assert list(front["trial_id"]) == ["a", "b", "b_twin", "e"]  # by mode entropy, best first
    single = tables.pareto_front(frame, {"final_mean_image_entropy": "min"})
    assert list(single["trial_id"]) == ["e"]


def test_failures_and_counts_keep_every_unfinished_trial():
    trials = trials_frame(
        [
            {"trial_id": "t1", "model": "vae", "seed": 0},
            {"trial_id": "t2", "model": "gan", "seed": 0, "status": "failed", "error": "OOM"},
            {"trial_id": "t3", "model": "vae", "seed": 1, "status": "diverged", "diverged_at": 7.0},
            {"trial_id": "t4", "model": "gan", "seed": 1, "status": "stopped"},
        ]
    )
    failed = tables.failures(trials)
    assert list(failed["trial_id"]) == ["t3", "t2", "t4"]  # by status, then id
    assert failed.loc[0, "diverged_at"] == 7 and failed.loc[1, "error"] == "OOM"
    counts = tables.status_counts(trials)
    assert counts == {"finished": 1, "failed": 1, "diverged": 1, "stopped": 1}
    assert next(iter(counts)) == "finished"


def test_welch_interval_by_hand():
    # a = 1, 2, 3 (mean 2, s^2 = 1); b = 0, 0, 2 (mean 2/3, s^2 = 4/3): difference 4/3.
    # se^2 = 1/3 + 4/9 = 7/9; df = (7/9)^2 / ((1/3)^2 / 2 + (4/9)^2 / 2) = 98/25 = 3.92;
    # t(0.975, 3.92) = 2.798935 (any t table, interpolated); half-width 2.798935 * 0.881917.
    difference, low, high = constraint.welch_interval([1, 2, 3], [0, 0, 2])
    assert difference == pytest.approx(4 / 3)
    assert (low, high) == (pytest.approx(-1.135095, abs=1e-5), pytest.approx(3.801762, abs=1e-5))
    assert constraint.verdict(low, high, "max") == constraint.NO_DIFFERENCE
    assert constraint.verdict(0.1, 0.3, "min") == "higher (worse)"
    assert constraint.verdict(-0.3, -0.1, "min") == "lower (better)"
    assert math.isnan(constraint.welch_interval([1.0], [1.0, 2.0])[1])


def test_constraint_effect_per_setting_with_the_fig8_share():
    sure, unsure = [0.1] * 3 + [1.0], [0.1] + [1.0] * 3  # low-entropy shares 3/4 and 1/4
    rows = [
        {"model": "vaegan", "seed": s, "final_mode_entropy": m, "final_image_entropies": unsure}
        for s, m in [(0, 2.0), (1, 2.1), (2, 2.2)]
    ] + [
        {"model": "cvaegan", "seed": s, "d": d, "final_mode_entropy": m}
        | {"final_image_entropies": sure if d == 6.0 else unsure}
        for s, d, m in [(0, 6.0, 1.0), (1, 6.0, 1.1), (2, 6.0, 1.2), (0, 7.0, 2.0), (1, 7.0, 2.2)]
    ]
    effect = constraint.constraint_effect(trials_frame(rows)).set_index(["setting", "metric"])
    entropy = effect.loc[("d=6", "mode_entropy")]
    assert entropy["difference"] == pytest.approx(-1.0)
    assert entropy["verdict"] == "lower (worse)" and entropy["seeds"] == "3 vs 3"
    assert effect.loc[("d=7", "mode_entropy"), "verdict"] == constraint.NO_DIFFERENCE
    share = effect.loc[("d=6", "low_entropy_share")]
    assert (share["cvaegan"], share["vaegan"]) == (0.75, 0.25)
    claim = constraint.fig8_claim(effect.reset_index())
    assert "At d=6, the claim is **supported**" in claim[0]
    assert "At d=7, the claim is **not supported: no difference detected**" in claim[1]


def test_stacked_mnist_table_sets_published_numbers_beside_ours():
    rows = [
        {"model": "gan", "seed": s, "final_modes_covered": c, "final_kl_to_uniform": k}
        for s, c, k in [(0, 100, 3.0), (1, 300, 2.0)]
    ]
    trials = trials_frame(
        [r | {"real_modes_covered": 1000, "real_kl_to_uniform": 0.02} for r in rows]
    )
    table = fidelity.stacked_mnist_table(trials).set_index("model")
    assert (
        table.loc["gan", "modes_covered_mean"] == 200 and table.loc["gan", "source"] == "this study"
    )
    assert table.loc[tables.REAL_DATA, "kl_to_uniform_mean"] == 0.02
    assert table.loc["VEEGAN", "modes_covered_mean"] == 150.0
    assert table.loc["PacDCGAN2", "kl_to_uniform_mean"] == 0.06
    assert table.loc["DCGAN", "source"] == fidelity.PUBLISHED


def test_markdown_and_html_of_the_same_blocks():
    table = pd.DataFrame({"model": ["vae", "a|b"], "mode entropy": [2.2661, float("nan")]})
    blocks = [
        "# Study `x<y`",
        "",
        "A *made-up* **study**, 1 < 2: [table1.csv](table1.csv) and `a*b*c`.",
        "",
        "- one",
        "- two",
        "",
        document.Table(table),
        "",
        document.Image("fig.png", "Fig. 1: <none>", b"\x89PNG"),
    ]
    assert document.markdown(blocks).splitlines() == [
        "# Study `x<y`",
        "",
        "A *made-up* **study**, 1 < 2: [table1.csv](table1.csv) and `a*b*c`.",
        "",
        "- one",
        "- two",
        "",
        "| model | mode entropy |",
        "|---|---|",
        "| vae | 2.266 |",
        "| a\\|b |  |",
        "",
        "![Fig. 1: <none>](fig.png)",
        "",
        "*Fig. 1: <none>.*",
    ]
    page = document.html_page(blocks, "Study x")
    assert "<h1>Study <code>x&lt;y</code></h1>" in page
    assert (
        "<p>A <em>made-up</em> <strong>study</strong>, 1 &lt; 2: "
        '<a href="table1.csv">table1.csv</a> and <code>a*b*c</code>.</p>'
    ) in page
    assert "<ul><li>one</li><li>two</li></ul>" in page
    assert "<td>2.266</td>" in page and "<td>a|b</td>" in page and "<td></td>" in page
    # base64 of the four bytes 89 50 4E 47 is iVBORw==
    assert '<img src="data:image/png;base64,iVBORw==" alt="Fig. 1: &lt;none&gt;"' in page
    assert "<figcaption>Fig. 1: &lt;none&gt;.</figcaption>" in page


# --- real studies -----------------------------------------------------------------------------


def write_report(storage: Path, name: str, out: Path, capsys: pytest.CaptureFixture) -> str:
    code = main(["report", name, "--storage", str(storage), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"report: {out / 'report.md'}" in printed
    return (out / "report.md").read_text()


def assert_files(out: Path, names: list[str]) -> None:
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


GRID_FILES = [
    "report.md",
    "report.html",
    "table1.csv",
    "table2.csv",
    "constraint_effect.csv",
    "image_entropy.csv",
    "trials.csv",
    "failures.csv",
    "mode_entropy_curves.png",
    "mean_curves.png",
    "image_entropy_histograms.png",
    "vaegan_vs_cvaegan_entropy.png",
    "samples.png",
]


def test_report_of_a_grid_study(storage, tmp_path, capsys):
    markdown = write_report(storage, "grid", tmp_path, capsys)
    assert_files(tmp_path, GRID_FILES)
    trials = load_study("grid", str(storage)).trials
    assert set(trials["status"]) == {"finished"}

    table = pd.read_csv(tmp_path / "table1.csv").set_index("model")
    means = trials.groupby("model")[["final_mode_entropy", "final_mean_image_entropy"]].mean()
    for model, row in means.iterrows():
        assert table.loc[model, "mode_entropy_mean"] == pytest.approx(row["final_mode_entropy"])
        mean_image = table.loc[model, "mean_image_entropy_mean"]
        assert mean_image == pytest.approx(row["final_mean_image_entropy"])
        assert table.loc[model, "n_seeds"] == 2
    assert table.loc["vae", "paper_mode_entropy"] == 2.266
    assert table.loc[tables.REAL_DATA, "mode_entropy_mean"] == pytest.approx(
        trials["real_mode_entropy"].iloc[0]
    )
    entropy = pd.read_csv(tmp_path / "image_entropy.csv").set_index("model")
    assert (entropy["n_images"] == 2 * 300).all()
    assert (entropy["threshold"] == tables.LOW_ENTROPY_THRESHOLD).all()
    for heading in ["Table 1", "Fig. 3", "Fig. 5", "Fig. 8", "Figs. 2, 4 and 7", "2.266"]:
        assert heading in markdown
    table2 = pd.read_csv(tmp_path / "table2.csv").set_index("model")
    covered = trials.groupby("model")["final_modes_covered"].mean()
    for model, value in covered.items():
        assert table2.loc[model, "modes_covered_mean"] == pytest.approx(value)
    assert table2.loc[tables.REAL_DATA, "modes_covered_mean"] == 10
    for column in ["final_precision", "final_recall", "final_density", "final_coverage"]:
        assert trials[column].notna().all(), column
    assert "## Table 2: fidelity and diversity" in markdown
    assert "## Does the constraint help?" in markdown and "Fig. 8 claim" in markdown
    # The tiny study's cvaegan has d = 0: its hinge never switches off, and the report says so.
    assert "hinge passed gradient (L_gan > d) in 100% of the steps" in markdown
    effect = pd.read_csv(tmp_path / "constraint_effect.csv")
    assert set(effect["metric"]) >= {"mode_entropy", "precision", "low_entropy_share"}
    assert (effect["seeds"] == "2 vs 2").all()
    curves = load_study("grid", str(storage)).curves
    hinge = curves.loc[curves["model"] == "cvaegan", "constraint_active"]
    assert len(hinge) == 4 and hinge.between(0, 1).all()
    assert curves.loc[curves["model"] == "vaegan", "constraint_active"].isna().all()
    assert "None: every trial finished." in markdown
    assert "Optuna" not in markdown


def test_report_lists_the_diverged_trial(storage, tmp_path, capsys):
    markdown = write_report(storage, "diverging", tmp_path, capsys)
    assert_files(tmp_path, ["report.md", "table1.csv", "failures.csv", "samples.png"])
    trials = load_study("diverging", str(storage)).trials
    diverged = trials[trials["status"] == "diverged"]
    assert len(diverged) == 1 and (trials["status"] == "finished").sum() == 1

    failed = pd.read_csv(tmp_path / "failures.csv")
    assert list(failed["trial_id"]) == list(diverged["trial_id"])
    assert failed.loc[0, "status"] == "diverged" and 1 <= failed.loc[0, "diverged_at"] <= 40
    assert "1 finished, 1 diverged" in markdown
    assert diverged["trial_id"].iloc[0] in markdown.split("## Trials that did not finish")[1]
    table = pd.read_csv(tmp_path / "table1.csv")
    assert table.loc[table["model"] == "vae", "n_seeds"].item() == 1  # the finished trial only


def test_report_of_an_optuna_study(storage, tmp_path, capsys):
    markdown = write_report(storage, "optuna", tmp_path, capsys)
    files = ["pareto_front.png", "landscape.png", "best_suggestions.csv", "best_so_far.png"]
    assert_files(tmp_path, [*files, "importances.csv", "table1.csv"])
    trials = load_study("optuna", str(storage)).trials
    assert (
        len(trials) == 6
        and trials.groupby("suggestion").seed.apply(sorted).map(lambda seeds: seeds == [0, 1]).all()
    )
    best = pd.read_csv(tmp_path / "best_suggestions.csv", dtype={"suggestion": str})
    objectives = {"final_mode_entropy": "max", "final_mean_image_entropy": "min"}
    done = trials[trials["status"] == "finished"]
    means = done.groupby("suggestion")[list(objectives)].mean().reset_index()
    front = tables.pareto_front(means, objectives)
    assert sorted(best["suggestion"]) == sorted(front["suggestion"])
    for column in objectives:
        expected = means.set_index("suggestion").loc[best["suggestion"], column]
        assert list(best[column]) == pytest.approx(list(expected))
    assert {"lam", "d", "seeds", "n", *objectives, "final_mode_entropy_ci"} <= set(best.columns)
    importances = pd.read_csv(tmp_path / "importances.csv").set_index("parameter")
    assert set(importances.index) == {"lam", "d"}
    assert importances.sum().to_numpy() == pytest.approx([1.0, 1.0])
    assert "## Optuna search" in markdown and "Pareto front" in markdown


def test_report_of_an_unknown_study_is_one_line(tmp_path, capsys):
    assert main(["report", "nope", "--storage", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("gvae: error: name: no study named 'nope'") and error.count("\n") == 1


# --- report.html, from tables written by hand, opened in a real browser -------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HAND_MADE_STUDY = """
name: {name}
dataset: mnist5k
models: {models}
iterations: 40
eval_every: 20
search: {search}
"""
OPTUNA_SEARCH = (
    "{optuna: {trials: 3, replicates: 2, objectives: {mode_entropy: max, mean_image_entropy: min},"
    " space: {lam: {low: 0.1, high: 10.0, log: true}, d: {low: 0.0, high: 1.0}}}}"
)
FIDELITY_VALUES = {
    "modes_covered": 9.0,
    "kl_to_uniform": 0.1,
    "classifier_score": 8.0,
    "precision": 0.7,
    "recall": 0.6,
    "density": 0.9,
    "coverage": 0.8,
    "frechet_distance": 12.0,
}


def sample_grid_png(seed: int) -> str:
    """A 10 x 10 grid of 28 x 28 grey images as base64 PNG, as the trainer records it."""
    import base64
    import io

    import matplotlib.image
    import numpy as np

    pixels = np.random.default_rng(seed).random((280, 280))
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, pixels, cmap="gray", format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_hand_made_study(storage: Path, name: str, models: list[str], search: str) -> None:
    """A study folder as the driver leaves it (study.yaml, trials and curves tables), with
    made-up numbers: every section of the report, without training anything."""
    folder = storage / name
    folder.mkdir(parents=True)
    (folder / "study.yaml").write_text(
        HAND_MADE_STUDY.format(name=name, models=f"[{', '.join(models)}]", search=search)
    )
    trials, curves = [], []
    for index, (model, seed) in enumerate((m, s) for m in models for s in (0, 1, 2, 3)):
        trial_id = f"{name}_{index:05d}"
        spread = 0.1 * seed + 0.05 * index  # seeds differ, so every interval has a width
        row = {
            "study": name,
            "trial_id": trial_id,
            "model": model,
            "dataset": "mnist5k",
            "seed": seed,
            "iterations": 40,
            "iterations_done": 40,
            "started_at": 1000.0 + index,
            "final_mode_entropy": 1.5 + spread,
            "final_mean_image_entropy": 0.5 - spread / 4,
            "final_image_entropies": [0.1 + spread, 0.4, 0.9, 1.6],
            "final_class_histogram": [30] * 10,
            "final_sample_labels": [digit % 10 for digit in range(100)],
            "final_samples_png": sample_grid_png(index),
            "real_modes_covered": 10,
            "real_kl_to_uniform": 0.01,
            "real_classifier_score": 9.5,
        }
        row |= {f"final_{metric}": value + spread for metric, value in FIDELITY_VALUES.items()}
        if model == "cvaegan":
            row["final_constraint_active"] = 0.5
        if search.startswith("{optuna"):  # two seeds per suggestion, each its own λ and d
            row |= {"suggestion": f"{name}_s{index // 2}", "seed": index % 2}
            row |= {"lam": 0.5 + index // 2, "d": 0.1 * (index // 2)}
        trials.append(row)
        for iteration in (20, 40):
            curve = {"study": name, "trial_id": trial_id, "model": model, "iteration": iteration}
            curve |= {
                "mode_entropy": row["final_mode_entropy"] * iteration / 40,
                "mean_image_entropy": row["final_mean_image_entropy"] * 40 / iteration,
            }
            curve |= {metric: row[f"final_{metric}"] for metric in FIDELITY_VALUES}
            curves.append(curve)
    trials_frame(trials).to_parquet(folder / "trials.parquet")
    pd.DataFrame(curves).to_parquet(folder / "curves.parquet")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG file's IHDR chunk (bytes 16-24, big-endian)."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def markdown_tables(markdown: str) -> list[tuple[list[str], int]]:
    """Each Markdown table's header cells and number of body rows."""
    tables, lines = [], markdown.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("|---"):
            header = [cell.strip() for cell in lines[index - 1].strip("|").split(" | ")]
            body = 0
            while index + 1 + body < len(lines) and lines[index + 1 + body].startswith("|"):
                body += 1
            tables.append((header, body))
    return tables


# What the page shows once Chromium has loaded it: each image's state and each table's cells.
PAGE_SCRIPT = """
return {
  ready: document.readyState,
  images: Array.from(document.images).map(image => ({
    file: image.dataset.file, complete: image.complete, src: image.getAttribute("src"),
    width: image.naturalWidth, height: image.naturalHeight})),
  tables: Array.from(document.querySelectorAll("table")).map(table => ({
    header: Array.from(table.querySelectorAll("th")).map(cell => cell.textContent),
    rows: table.querySelectorAll("tbody tr").length,
    text: table.textContent})),
  headings: Array.from(document.querySelectorAll("h1, h2")).map(h => h.textContent),
  external: Array.from(document.querySelectorAll("[src]")).map(e => e.getAttribute("src"))
    .filter(src => !src.startsWith("data:")),
  resources: performance.getEntriesByType("resource").map(entry => entry.name),
};
"""


def open_in_chromium(page: Path, profile: Path) -> dict:
    """`page` loaded in headless Chromium through chromedriver; PAGE_SCRIPT's answer."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(
            "needs Chromium and its driver at /usr/bin/chromium and /usr/bin/chromedriver "
            "(apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # A driver path given to Service: selenium runs it and never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(page.as_uri())
        return driver.execute_script(PAGE_SCRIPT)
    finally:
        driver.quit()


@pytest.mark.parametrize(
    ("models", "search", "figures"),
    [
        (
            ["gan", "vae", "vaegan", "cvaegan"],
            "{grid: {seed: [0, 1, 2, 3]}}",
            ["mode_entropy_curves.png", "mean_curves.png", "vaegan_vs_cvaegan_entropy.png"],
        ),
        (["cvaegan"], OPTUNA_SEARCH, ["pareto_front.png", "best_so_far.png", "landscape.png"]),
    ],
    ids=["grid", "optuna"],
)
def test_report_html_opens_in_chromium_with_every_table_and_image(
    tmp_path, capsys, models, search, figures
):
    name = "optuna" if "optuna" in search else "grid"
    write_hand_made_study(tmp_path / "results", name, models, search)
    out = tmp_path / "report"
    markdown = write_report(tmp_path / "results", name, out, capsys)
    page = out / "report.html"
    pngs = sorted(out.glob("*.png"))
    assert_files(out, ["report.html", "samples.png", "image_entropy_histograms.png", *figures])

    shown = open_in_chromium(page, tmp_path / "chromium-profile")
    assert shown["ready"] == "complete"
    # Every figure of the folder is on the page, embedded, decoded at its own size.
    assert sorted(image["file"] for image in shown["images"]) == [path.name for path in pngs]
    for image in shown["images"]:
        assert image["complete"] and image["width"] > 0, image["file"]
        assert image["src"].startswith("data:image/png;base64,"), image["file"]
        assert (image["width"], image["height"]) == png_size(out / image["file"])
    assert shown["external"] == [] and shown["resources"] == []  # nothing loaded from outside
    # The same tables as report.md, in the same order, with the same columns and rows.
    expected = markdown_tables(markdown)
    assert [(t["header"], t["rows"]) for t in shown["tables"]] == expected
    assert len(expected) >= 4
    table1 = shown["tables"][0]
    assert table1["header"][0] == "model" and "real data" in table1["text"]
    assert [h for h in shown["headings"] if h.startswith("Table")] == [
        "Table 1: mode entropy and mean image entropy",
        "Table 2: fidelity and diversity",
    ]
    assert set(shown["headings"]) == {
        line.lstrip("# ").replace("`", "") for line in markdown.splitlines() if line[:1] == "#"
    }
    if name == "grid":
        assert table1["text"].count("2.266") == 1  # the paper's VAE value, as in report.md
        assert "Does the constraint help?" in shown["headings"]
    else:
        assert "Optuna search" in shown["headings"]
