"""`gvae report NAME`: Table 1, the paper's figures and the failures of a study, in one folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a study's tables and figures (Markdown, HTML, PNG, CSV)",
        description="Write report.md with Table 1, the paper's figures (PNG) and tables (CSV) "
        "for the study NAME, plus the Pareto front of an Optuna study and every trial that did "
        "not finish; report.html beside it is the same report as one self-contained page.",
    )
    parser.add_argument("name", help="study name (its folder under --storage)")
    parser.add_argument("--storage", default="results", help="results folder or URI")
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: report/NAME)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    from analysis import load_study
    from analysis.report import write_report

    study = load_study(args.name, args.storage)
    report = write_report(study, args.out or Path("report") / args.name)
    print(f"report: {report.markdown}")
    for path in report.files[1:]:
        print(f"  {path.name}")
    return 0
