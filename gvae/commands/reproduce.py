"""`gvae reproduce NAME [--trial ID]`: re-run a recorded trial and compare it with the record."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="re-run a study's trial and compare with its recorded metrics",
        description="Re-run one trial of the study NAME from its recorded config on this machine "
        "and print recorded against reproduced metrics; the re-run is appended to "
        "reproductions.parquet in the study folder. Default trial: grid studies, the highest final "
        "mode_entropy; Optuna, the best by its objective, or with two objectives the Pareto-front "
        "trial nearest the ideal corner; with seed replicates, every seed of the best suggestion "
        "(by its seed means). Exit status 1 when a re-run on the recorded device differs.",
    )
    parser.add_argument("name", help="study name (its folder under --storage)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--trial", default=None, help="trial id, or its ending such as 00003")
    which.add_argument(
        "--suggestion",
        default=None,
        help="re-run every seed of this Optuna suggestion (its id, or its ending such as 00003)",
    )
    parser.add_argument("--storage", default="results", help="results folder or URI")
    parser.add_argument(
        "--device",
        default=None,
        help="cpu | cuda | cuda:N (default: the device the trial ran on, if this machine has it)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from analysis import load_study
    from analysis.reproduce import earlier_reproductions

    study = load_study(args.name, args.storage)
    earlier_reproductions(study)  # a damaged record of re-runs stops them before they train
    worst = 0
    for trial_id, reason in _chosen_trials(study, args):
        worst = max(worst, _reproduce_one(study, trial_id, reason, args.device))
    return worst


def _chosen_trials(study: Any, args: argparse.Namespace) -> list[tuple[str | None, str | None]]:
    """(trial id, why) of each re-run; (None, None) lets `reproduce` choose one trial."""
    from analysis.reproduce import choose_suggestion
    from analysis.suggestions import seeds_of
    from gvae.errors import GvaeError

    if args.trial:
        return [(args.trial, "chosen with --trial")]
    if args.suggestion:
        seeds = seeds_of(study.trials, args.suggestion)
        if seeds.empty:
            raise GvaeError(
                f"--suggestion: no finished trial of suggestion {args.suggestion!r}; pick one "
                "from best_suggestions.csv of `gvae report`"
            )
        return [(str(t), f"seed run of suggestion {args.suggestion}") for t in seeds.trial_id]
    if study.spec.search_type == "optuna" and study.spec.replicates > 1:
        ids, reason = choose_suggestion(study.trials, study.spec)
        return [(trial_id, reason) for trial_id in ids]
    return [(None, None)]


def _reproduce_one(study: Any, trial_id: str | None, reason: str | None, device: str | None) -> int:
    from analysis.reproduce import record, reproduce

    result = reproduce(study, trial_id=trial_id, device=device, log=_log, reason=reason)
    print(
        f"device: {result.device} (recorded: {result.recorded_device}), torch threads: "
        f"{result.threads}"
    )
    print(_table(result.comparison))
    labels = "identical" if result.sample_labels_identical else "differ"
    print(
        f"per-image entropies: max |difference| {result.image_entropies_max_difference:.3g}; "
        f"labels of the sample grid: {labels}"
    )
    location = record(study, result)
    if result.identical:
        print(f"identical to the recorded trial; re-run recorded in {location}")
        return 0
    if result.same_device:
        print(
            f"gvae: warning: the re-run of {result.trial_id} differs from its record on the same "
            f"device ({result.device}); the trial is not reproducible here (other code, library "
            f"versions or evaluator?). Recorded in {location}",
            file=sys.stderr,
        )
        return 1
    print(
        f"differs from the record, as runs on another device ({result.recorded_device} -> "
        f"{result.device}) may; re-run recorded in {location}"
    )
    return 0


def _table(comparison: Any) -> str:
    lines = [f"{'metric':28s} {'recorded':>16s} {'reproduced':>16s} {'difference':>12s}"]
    for metric, recorded, reproduced, difference in comparison.itertuples(index=False):
        # + 0.0 prints -0.0 (an entropy of one class) as 0
        values = f"{recorded + 0.0:16.9g} {reproduced + 0.0:16.9g} {difference + 0.0:12.3g}"
        lines.append(f"{metric:28s} {values}")
    return "\n".join(lines)


def _log(line: str) -> None:
    print(line, flush=True)
