"""Searchers and schedulers that go on when a trial ends without objective values.

A diverged trial (or one that failed in a way retrying cannot fix) ends with a last report that
has no `mode_entropy`: there is no honest value to give. Tune checks every result for the metrics
its searcher and scheduler name and stops the whole study on the first one that lacks them. The
wrappers here keep those metrics out of that check; the searcher learns such a trial failed
(Optuna records it as FAIL and samples elsewhere) instead of being given an invented value.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher


class DivergenceTolerantSearch(Searcher):
    """Wraps a searcher (OptunaSearch): results without its objectives end the trial as failed."""

    def __init__(self, searcher: Searcher) -> None:
        super().__init__(metric=None, mode=None)  # None: Tune's metric check skips this searcher
        self.searcher = searcher

    @property
    def objectives(self) -> list[str]:
        metric = self.searcher.metric
        return list(metric) if isinstance(metric, list | tuple) else [metric]

    def has_objectives(self, result: dict[str, Any] | None) -> bool:
        return bool(result) and all(_is_number(result.get(m)) for m in self.objectives)

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | None:
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.has_objectives(result):
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if not error and not self.has_objectives(result):
            result, error = None, True
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    # Tune saves the innermost searcher (`.searcher`, as for its ConcurrencyLimiter) in its own
    # file, so a study begun with a bare OptunaSearch restores into this wrapper; the wrapper
    # itself has no state.
    def get_state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        pass


class DivergenceTolerantASHA(ASHAScheduler):
    """ASHA that lets results without its metric through (ASHA itself already ignores them)."""

    @property
    def metric(self) -> None:  # type: ignore[override]
        return None


def tolerant_search(searcher: Searcher, max_concurrent: int | None) -> DivergenceTolerantSearch:
    """The searcher a study runs: concurrency limited inside the wrapper.

    Pass the Tuner no max_concurrent_trials with it: Tune would put its own ConcurrencyLimiter
    outside, and a limiter restored from a saved study brings back the objectives as its metric.
    """
    if max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return DivergenceTolerantSearch(searcher)


def make_tolerant(tune_config: Any) -> None:
    """Give a study restored from before these wrappers existed (a bare OptunaSearch and ASHA,
    which stop the study at its first diverged trial) the wrappers, in its TuneConfig."""
    search_alg = tune_config.search_alg
    if isinstance(search_alg, Searcher) and not isinstance(search_alg, DivergenceTolerantSearch):
        tune_config.search_alg = tolerant_search(search_alg, tune_config.max_concurrent_trials)
        tune_config.max_concurrent_trials = None
    if type(tune_config.scheduler) is ASHAScheduler:
        tune_config.scheduler.__class__ = DivergenceTolerantASHA  # same state, one property differs


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)
