"""Re-run one recorded trial from its config and compare it with what the study recorded.

The trainer is deterministic for a given config, seed, device and number of torch threads, so a
re-run on the same device must give the very same numbers; across devices the difference is the
result. Every re-run is appended to `<storage>/<name>/reproductions.parquet`.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from analysis import suggestions, tables
from analysis.load import Study
from gvae.config import TrialConfig
from gvae.errors import GvaeError
from gvae.io import write_parquet
from gvae.provenance import git_commit
from gvae.study.results import REPRODUCTIONS, UnreadableTable

# Scalars compared besides the final losses; evaluator_accuracy first: when the classifier itself
# differs (another cache, another machine) no metric can be expected to match.
COMPARED = ("evaluator_accuracy", "final_mode_entropy", "final_mean_image_entropy")


@dataclass
class Reproduction:
    trial_id: str
    reason: str  # why this trial was chosen
    recorded_device: str
    device: str
    threads: int
    comparison: pd.DataFrame  # metric, recorded, reproduced, difference
    image_entropies_max_difference: float
    sample_labels_identical: bool

    @property
    def same_device(self) -> bool:
        return self.device == self.recorded_device

    @property
    def identical(self) -> bool:
        return (
            bool((self.comparison["difference"] == 0).all())
            and self.image_entropies_max_difference == 0
            and self.sample_labels_identical
        )


def choose_trial(trials: pd.DataFrame, spec: Any) -> tuple[str, str]:
    """(trial id, why) of the default trial to reproduce: the best by the study's objective.

    Grid: the highest final mode entropy (ties: lower mean image entropy). Optuna with one
    objective: the best by it. Several objectives: the Pareto-front trial nearest the ideal
    corner, with each objective scaled to [0, 1] over the finished trials (1 = best).
    """
    done = tables.finished(trials)
    if done.empty:
        raise GvaeError("trial: the study has no finished trial to reproduce")
    if spec.search_type != "optuna":
        best = done.sort_values(
            ["final_mode_entropy", "final_mean_image_entropy", "trial_id"],
            ascending=[False, True, True],
        )
        return str(best["trial_id"].iloc[0]), "the highest final mode_entropy (grid study)"
    objectives = tables.objective_columns(spec.objectives)
    if len(objectives) == 1:
        ((column, mode),) = objectives.items()
        best = done.dropna(subset=[column]).sort_values(
            [column, "trial_id"], ascending=[mode == "min", True]
        )
        return str(best["trial_id"].iloc[0]), f"the best by the objective {column} {mode}"
    front = tables.pareto_front(done, objectives).sort_values("trial_id", kind="stable")
    chosen = front.iloc[suggestions.ideal_corner_choice(front, done, objectives)]
    wanted = ", ".join(f"{c.removeprefix('final_')} {m}" for c, m in objectives.items())
    reason = f"the Pareto-front trial nearest the ideal corner of ({wanted}), each scaled to [0, 1]"
    return str(chosen["trial_id"]), reason


def choose_suggestion(trials: pd.DataFrame, spec: Any) -> tuple[list[str], str]:
    """(trial ids, why) of the seed runs of the best suggestion of a study with replicates.

    Chosen as `choose_trial` chooses a trial, on the suggestion means (what Optuna was told).
    """
    objectives = tables.objective_columns(spec.objectives)
    searched = list(spec.space)
    means = suggestions.suggestion_means(trials, objectives, searched)
    if means.empty:
        raise GvaeError("trial: the study has no finished trial to reproduce")
    front = suggestions.pareto_of_means(means, objectives).sort_values(
        suggestions.SUGGESTION, kind="stable"
    )
    if len(objectives) == 1:
        ((column, mode),) = objectives.items()
        best = front.sort_values([column, suggestions.SUGGESTION], ascending=[mode == "min", True])
        chosen = best.iloc[0]
        reason = f"the best suggestion by the mean of {column} {mode} over its seeds"
    else:
        chosen = front.iloc[suggestions.ideal_corner_choice(front, means, objectives)]
        reason = "the Pareto-front suggestion (seed means) nearest the ideal corner"
    seeds = suggestions.seeds_of(trials, str(chosen[suggestions.SUGGESTION]))
    return [str(t) for t in seeds["trial_id"]], f"{reason}: suggestion {chosen['suggestion']}"


def find_trial(trials: pd.DataFrame, trial_id: str) -> dict[str, Any]:
    """The recorded row of `trial_id` (a full id, or its unique ending such as 00003)."""
    ids = trials["trial_id"].astype(str)
    matches = trials[(ids == trial_id) | ids.str.endswith(f"_{trial_id}")]
    if len(matches) != 1:
        known = ", ".join(ids.head(8)) + (" ..." if len(ids) > 8 else "")
        what = "no trial" if matches.empty else f"{len(matches)} trials"
        raise GvaeError(f"--trial: {what} match {trial_id!r}; use one of {known}")
    row = matches.iloc[0].to_dict()
    if row["status"] != "finished":
        raise GvaeError(
            f"--trial: {row['trial_id']} did not finish ({row['status']}); only finished trials "
            "can be compared with a re-run, pick one listed by `gvae study status`"
        )
    return row


def trial_config(row: dict[str, Any], device: str) -> TrialConfig:
    """The recorded config of a trial, to run on `device`.

    The trials table's `device` column holds where the trial ran (cpu, cuda), not the configured
    value (often auto), hence the explicit device.
    """
    values = {}
    for field in dataclasses.fields(TrialConfig):
        if field.name not in row:  # a field added since the study ran: its default
            continue
        value = row[field.name]
        values[field.name] = value.item() if isinstance(value, np.generic) else value
    return TrialConfig.from_dict({**values, "device": device}).validate()


def default_device(recorded: str) -> str:
    """The recorded device when this machine has it, else this machine's default."""
    import torch

    if recorded == "cpu" or (recorded.startswith("cuda") and torch.cuda.is_available()):
        return recorded
    return "auto"


def reproduce(
    study: Study,
    trial_id: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
    reason: str | None = None,
) -> Reproduction:
    """Re-run a trial of `study` (default: `choose_trial`) in this process and compare."""
    import torch

    if trial_id is None:
        trial_id, reason = choose_trial(study.trials, study.spec)
    reason = reason or "chosen by id"
    row = find_trial(study.trials, trial_id)
    recorded_device = str(row.get("device_used") or "cpu")
    config = trial_config(row, device or default_device(recorded_device))
    log(
        f"study {study.name}: re-running trial {row['trial_id']} ({config.model}, seed "
        f"{config.seed}, {config.iterations} iterations), {reason}"
    )
    previous_threads = torch.get_num_threads()
    threads = _recorded_threads(row, previous_threads)
    if threads != previous_threads:
        log(
            f"torch threads: {threads}, as the trial had under Ray (one per CPU it was given), "
            "so floating-point sums add up in the same order"
        )
    torch.set_num_threads(threads)
    try:
        outcome = _rerun(row, config, log)
    finally:
        torch.set_num_threads(previous_threads)

    reproduced = {
        "evaluator_accuracy": outcome.evaluator_accuracy,
        "final_mode_entropy": outcome.curve[-1]["mode_entropy"],
        "final_mean_image_entropy": outcome.curve[-1]["mean_image_entropy"],
    }
    reproduced.update(
        {f"final_{k}": v for k, v in outcome.curve[-1].items() if k.endswith("_loss")}
    )
    return Reproduction(
        trial_id=str(row["trial_id"]),
        reason=reason,
        recorded_device=recorded_device,
        device=outcome.device,
        threads=threads,
        comparison=comparison_table(row, reproduced),
        image_entropies_max_difference=_max_difference(
            row.get("final_image_entropies"), outcome.final["image_entropies"]
        ),
        sample_labels_identical=_same_list(
            row.get("final_sample_labels"), outcome.final["sample_labels"]
        ),
    )


def _rerun(row: dict[str, Any], config: TrialConfig, log: Callable) -> Any:
    """The trial's outcome re-run: alone, or as a member of its whole pack again (a member's
    numbers reproduce only beside the members it trained with)."""
    from gvae.trainer import run_trial  # torch: imported only when a trial runs

    seeds = row.get("pack_seeds")
    if seeds is None or not isinstance(row.get("pack"), str):
        return run_trial(config, log=log)
    seeds = [int(seed) for seed in seeds]
    pack = tuple(dataclasses.replace(config, seed=seed) for seed in seeds)
    return _pack_outcomes(pack, row["pack"], log)[seeds.index(config.seed)]


_LAST_PACK: dict[tuple[TrialConfig, ...], list[Any]] = {}  # the pack re-run last, by its configs


def _pack_outcomes(pack: tuple[TrialConfig, ...], name: str, log: Callable) -> list[Any]:
    """The outcomes of the pack re-run, once for all its members that one command re-runs."""
    from gvae.trainer import run_pack

    if pack not in _LAST_PACK:
        log(f"re-running pack {name} (seeds {[config.seed for config in pack]})")
        _LAST_PACK.clear()
        _LAST_PACK[pack] = run_pack(list(pack), log=log)
    return _LAST_PACK[pack]


def _recorded_threads(row: dict[str, Any], default: int) -> int:
    value = row.get("threads")
    return default if value is None or pd.isna(value) else int(value)


def comparison_table(recorded: dict[str, Any], reproduced: dict[str, float]) -> pd.DataFrame:
    """metric, recorded, reproduced, difference (reproduced - recorded) for each compared scalar.

    Compared: COMPARED and every final loss that either side has.
    """
    losses = sorted(
        {k for k in recorded if k.startswith("final_") and k.endswith("_loss")} | set(reproduced)
    )
    metrics = [*COMPARED, *(k for k in losses if k not in COMPARED)]
    rows = []
    for metric in metrics:
        before, after = _float(recorded.get(metric)), _float(reproduced.get(metric))
        if math.isnan(before) and math.isnan(after):
            continue  # a loss this model does not have
        rows.append(
            {
                "metric": metric,
                "recorded": before,
                "reproduced": after,
                "difference": after - before,
            }
        )
    return pd.DataFrame(rows, columns=["metric", "recorded", "reproduced", "difference"])


def _float(value: Any) -> float:
    return math.nan if value is None or pd.isna(value) else float(value)


def _max_difference(recorded: Any, reproduced: list[float]) -> float:
    if recorded is None or len(recorded) != len(reproduced):
        return math.inf
    return float(np.max(np.abs(np.asarray(recorded, float) - np.asarray(reproduced, float))))


def _same_list(recorded: Any, reproduced: list[int]) -> bool:
    return recorded is not None and [int(v) for v in recorded] == [int(v) for v in reproduced]


def record(study: Study, reproduction: Reproduction) -> str:
    """Append the re-run to the study's reproductions.parquet; returns where it is."""
    row: dict[str, Any] = {
        "study": study.name,
        "trial_id": reproduction.trial_id,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reason": reproduction.reason,
        "recorded_device": reproduction.recorded_device,
        "device": reproduction.device,
        "same_device": reproduction.same_device,
        "node": socket.gethostname(),
        "threads": reproduction.threads,
        "identical": reproduction.identical,
        "image_entropies_max_difference": reproduction.image_entropies_max_difference,
        "sample_labels_identical": reproduction.sample_labels_identical,
        "git_commit": git_commit(),
    }
    for metric, before, after, _ in reproduction.comparison.itertuples(index=False):
        row[f"recorded_{metric}"] = before
        row[f"reproduced_{metric}"] = after
    rows = [*earlier_reproductions(study), row]
    location = study.store.location(REPRODUCTIONS)
    write_parquet(location, rows)
    return location


def earlier_reproductions(study: Study) -> list[dict[str, Any]]:
    """The re-runs recorded so far; a damaged table of them is told before any re-run trains
    (the trials' checkpoints, which rebuild the study's own tables, do not hold them)."""
    try:
        return study.store.read_rows(REPRODUCTIONS)
    except UnreadableTable as error:
        raise GvaeError(
            f"storage: {error.path} cannot be read as Parquet (it records the earlier re-runs); "
            "move it aside and run again, which begins a new one"
        ) from None
