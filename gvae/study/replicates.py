"""Seed replicates: each suggestion of a searcher runs on K seeds, and the searcher sees the mean.

A seed is luck, not a hyperparameter: searching over it optimises luck. `SeedReplicates` asks its
searcher (OptunaSearch) for one suggestion per K trials: replicate i gets seed `base_seed + i`,
every replicate carries the id of the suggestion it belongs to (the `suggestion` column of the
trials table), and the mean is taken per objective, so multi-objective Optuna works.

A replicate that diverged, failed or reported no finite objective does not enter the mean; when no
replicate of a suggestion gives one, the searcher is told the suggestion failed (Optuna records
FAIL) rather than being handed an invented value.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search import Searcher

from gvae.study.outcome import is_finite_number
from gvae.study.tables import SUGGESTION


class SeedReplicates(Searcher):
    """Wraps a searcher: each of its suggestions runs as `replicates` trials, one per seed."""

    def __init__(self, searcher: Searcher, replicates: int, base_seed: int = 0) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.replicates = replicates
        self.base_seed = base_seed
        self.suggestion_of: dict[str, str] = {}  # trial id -> its suggestion's id
        self.current: tuple[str, dict[str, Any], int] | None = None  # id, config, handed out
        # suggestion id -> {trial id: objective values, or None when the replicate gave none}
        self.outcomes: dict[str, dict[str, list[float] | None]] = {}

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.current is None or self.current[2] == self.replicates:
            config = self.searcher.suggest(trial_id)  # the first replicate's id names it
            if not isinstance(config, dict):
                return config  # None (wait) or Searcher.FINISHED
            self.current = (trial_id, config, 0)
        suggestion, config, replicate = self.current
        self.current = (suggestion, config, replicate + 1)
        self.suggestion_of[trial_id] = suggestion
        return {**config, "seed": self.base_seed + replicate, SUGGESTION: suggestion}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Intermediate results are not passed on: the searcher knows only each suggestion."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        suggestion = self.suggestion_of.get(trial_id)
        if suggestion is None:
            return  # a trial of an earlier run that this searcher never suggested
        outcomes = self.outcomes.setdefault(suggestion, {})
        if trial_id in outcomes:
            return  # told already (compat.CatchUpSearcher tells a resumed study's again)
        outcomes[trial_id] = None if error else self._objective_values(result)
        if len(outcomes) < self.replicates:
            return
        values = [v for v in outcomes.values() if v is not None]
        if not values:
            self.searcher.on_trial_complete(suggestion, result=None, error=True)
            return
        means = [sum(column) / len(column) for column in zip(*values, strict=True)]
        self.searcher.on_trial_complete(
            suggestion, result=dict(zip(self._metrics(), means, strict=True))
        )

    def _metrics(self) -> list[str]:
        metric = self.searcher.metric
        return list(metric) if isinstance(metric, list | tuple) else [metric]

    def _objective_values(self, result: dict[str, Any] | None) -> list[float] | None:
        """The objectives of a replicate that finished with finite values, else None."""
        values = [(result or {}).get(metric) for metric in self._metrics()]
        if not all(is_finite_number(value) for value in values):
            return None
        return [float(value) for value in values]

    # Tune saves a searcher's state with the experiment: this wrapper's own, and the inner
    # searcher's through its save and restore.
    def get_state(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "searcher"}

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
