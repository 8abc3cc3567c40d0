"""Seed replicates: each suggestion of a searcher runs on K seeds, and the searcher sees the mean.

A seed is luck, not a hyperparameter: searching over it optimises luck. Ray Tune's `Repeater`
already runs each suggestion several times; this wraps it so that replicate i gets seed
`base_seed + i`, every replicate carries the id of the suggestion it belongs to (the `suggestion`
column of the trials table), and the mean is taken per objective, so multi-objective Optuna works.

A replicate that diverged, failed or reported no finite objective does not enter the mean; when no
replicate of a suggestion gives one, the searcher is told the suggestion failed (Optuna records
FAIL) rather than being handed an invented value.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.search import Repeater, Searcher

SUGGESTION = (
    "suggestion"  # the config key (and trials-table column) naming a replicate's suggestion
)


class SeedReplicates(Repeater):
    """Wraps a searcher: each of its suggestions runs as `replicates` trials, one per seed."""

    def __init__(self, searcher: Searcher, replicates: int, base_seed: int = 0) -> None:
        super().__init__(searcher, repeat=replicates, set_index=False)
        self.base_seed = base_seed
        # suggestion id -> {trial id: objective values, or None when the replicate gave none}
        self._outcomes: dict[str, dict[str, list[float] | None]] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config  # None (wait) or Searcher.FINISHED
        group = self._trial_id_to_group[trial_id]
        replicate = group.count() - 1  # this trial was just added to its group
        return {**config, "seed": self.base_seed + replicate, SUGGESTION: group.primary_trial_id}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Intermediate results are not passed on: the searcher knows only each suggestion's id."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        group = self._trial_id_to_group.get(trial_id)
        if group is None:
            return  # a trial of an earlier run that this searcher never suggested
        outcomes = self._outcomes.setdefault(group.primary_trial_id, {})
        outcomes[trial_id] = None if error else self._objective_values(result)
        if len(outcomes) < self.repeat:
            return
        values = [v for v in outcomes.values() if v is not None]
        if not values:
            self.searcher.on_trial_complete(group.primary_trial_id, result=None, error=True)
            return
        means = [sum(column) / len(column) for column in zip(*values, strict=True)]
        self.searcher.on_trial_complete(
            group.primary_trial_id, result=dict(zip(self._metrics(), means, strict=True))
        )

    def _metrics(self) -> list[str]:
        metric = self.searcher.metric
        return list(metric) if isinstance(metric, (list, tuple)) else [metric]

    def _objective_values(self, result: dict[str, Any] | None) -> list[float] | None:
        """The objectives of a replicate that finished with finite values, else None."""
        if not result or result.get("diverged_at") is not None:
            return None
        values = [result.get(metric) for metric in self._metrics()]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            return None
        return [float(v) for v in values]
