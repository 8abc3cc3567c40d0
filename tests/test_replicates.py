"""Seed replicates around a real OptunaSearch: seeds per replicate, the mean told to Optuna."""

from __future__ import annotations

import math

import optuna
import pytest
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from gvae.study.replicates import SUGGESTION, SeedReplicates

OBJECTIVES = ["mode_entropy", "mean_image_entropy"]


def searcher(replicates: int, base_seed: int = 0) -> SeedReplicates:
    inner = OptunaSearch(
        space={"lam": tune.loguniform(0.01, 100.0)}, metric=OBJECTIVES, mode=["max", "min"], seed=0
    )
    return SeedReplicates(inner, replicates=replicates, base_seed=base_seed)


def told(search: SeedReplicates) -> list[optuna.trial.FrozenTrial]:
    return search.searcher._ot_study.get_trials(deepcopy=False)


def test_each_suggestion_runs_on_consecutive_seeds_with_one_suggestion_id():
    search = searcher(replicates=3, base_seed=5)
    configs = [search.suggest(f"t{i}") for i in range(6)]
    assert [c["seed"] for c in configs] == [5, 6, 7, 5, 6, 7]
    assert [c[SUGGESTION] for c in configs] == ["t0"] * 3 + ["t3"] * 3
    assert configs[0]["lam"] == configs[1]["lam"] == configs[2]["lam"]
    assert configs[3]["lam"] != configs[0]["lam"]


def test_optuna_is_told_the_mean_only_when_every_replicate_ended():
    search = searcher(replicates=3)
    for i in range(3):
        search.suggest(f"t{i}")
    search.on_trial_complete("t0", {"mode_entropy": 2.0, "mean_image_entropy": 0.5})
    search.on_trial_complete("t1", {"mode_entropy": 2.2, "mean_image_entropy": 0.7})
    assert told(search)[0].state == optuna.trial.TrialState.RUNNING
    # The third diverged: it does not enter the mean of (2.0, 2.2) and (0.5, 0.7).
    search.on_trial_complete("t2", {"diverged_at": 12, "mode_entropy": math.nan})
    trial = told(search)[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.values == pytest.approx([2.1, 0.6])


def test_a_suggestion_with_no_usable_replicate_fails_in_optuna():
    search = searcher(replicates=2)
    search.suggest("t0")
    search.suggest("t1")
    search.on_trial_complete("t0", {"diverged_at": 3})
    search.on_trial_complete("t1", None, error=True)
    assert told(search)[0].state == optuna.trial.TrialState.FAIL


def test_state_survives_a_save_and_restore(tmp_path):
    search = searcher(replicates=2)
    search.suggest("t0")
    search.suggest("t1")
    search.on_trial_complete("t0", {"mode_entropy": 1.0, "mean_image_entropy": 1.0})
    state = search.get_state()
    search.save(str(tmp_path / "inner.pkl"))

    restored = searcher(replicates=2)
    restored.set_state(state)
    restored.restore(str(tmp_path / "inner.pkl"))
    restored.on_trial_complete("t1", {"mode_entropy": 3.0, "mean_image_entropy": 2.0})
    assert told(restored)[0].values == pytest.approx([2.0, 1.5])
