"""Seed replicates around a real OptunaSearch: seeds per replicate, the mean told to Optuna."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
from ray import tune

from analysis import suggestions
from analysis.reproduce import choose_suggestion
from gvae.study.compat import OptunaSearch
from gvae.study.folder import journal_storage
from gvae.study.replicates import SUGGESTION, SeedReplicates
from gvae.study.spec import Objective, Range

OBJECTIVES = ["mode_entropy", "mean_image_entropy"]


def searcher(replicates: int, base_seed: int = 0, journal: str | None = None) -> SeedReplicates:
    """Optuna under seed replicates, its study in memory or in a journal file."""
    storage = journal_storage(journal) if journal else optuna.storages.InMemoryStorage()
    inner = OptunaSearch(
        space={"lam": tune.loguniform(0.01, 100.0)},
        metric=OBJECTIVES,
        mode=["max", "min"],
        seed=0,
        study_name="s",
        **({"journal": journal} if journal else {"storage": storage}),
    )
    search = SeedReplicates(inner, replicates=replicates, base_seed=base_seed)
    search.optuna_storage = storage  # where the test reads what Optuna recorded
    return search


def told(search: SeedReplicates) -> list[optuna.trial.FrozenTrial]:
    """What Optuna recorded, read through Optuna's own API from the searcher's storage."""
    study = optuna.load_study(study_name="s", storage=search.optuna_storage)
    return study.get_trials(deepcopy=False)


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
    journal = str(tmp_path / "journal")
    search = searcher(replicates=2, journal=journal)
    search.suggest("t0")
    search.suggest("t1")
    search.on_trial_complete("t0", {"mode_entropy": 1.0, "mean_image_entropy": 1.0})
    state = search.get_state()
    search.save(str(tmp_path / "inner.pkl"))

    restored = searcher(replicates=2, journal=journal)
    restored.set_state(state)
    restored.restore(str(tmp_path / "inner.pkl"))
    restored.on_trial_complete("t1", {"mode_entropy": 3.0, "mean_image_entropy": 2.0})
    assert told(restored)[0].values == pytest.approx([2.0, 1.5])


# Two suggestions of two seeds each, and one diverged seed run (left out of every mean).
SEED_RUNS = pd.DataFrame(
    [
        ("x_00000", "x_00000", 0, 0.1, "finished", 2.0, 0.9),
        ("x_00001", "x_00000", 1, 0.1, "finished", 2.2, 0.7),
        ("x_00002", "x_00002", 0, 5.0, "finished", 1.0, 0.2),
        ("x_00003", "x_00002", 1, 5.0, "finished", 1.4, 0.4),
        ("x_00004", "x_00004", 0, 9.0, "diverged", 2.3, 0.0),
    ],
    columns=[
        "trial_id",
        SUGGESTION,
        "seed",
        "lam",
        "status",
        "final_mode_entropy",
        "final_mean_image_entropy",
    ],
).assign(model="cvaegan")
GOALS = {"final_mode_entropy": "max", "final_mean_image_entropy": "min"}


def test_suggestion_means_with_t_intervals():
    means = suggestions.suggestion_means(SEED_RUNS, GOALS, ["lam"]).set_index(SUGGESTION)
    assert list(means.index) == ["x_00000", "x_00002"]  # the diverged suggestion has no mean
    assert means.loc["x_00000", "final_mode_entropy"] == pytest.approx(2.1)
    # Two seeds 2.0 and 2.2: sd = 0.1414, t(0.975, 1) = 12.706, half-width 12.706 * 0.1414 / √2
    assert means.loc["x_00000", "final_mode_entropy_ci"] == pytest.approx(1.2706, abs=1e-3)
    assert means.loc["x_00002", "final_mean_image_entropy"] == pytest.approx(0.3)
    assert means.loc["x_00002", "seeds"] == "0,1" and means.loc["x_00002", "n"] == 2


def test_best_so_far_runs_over_suggestions_in_order():
    means = suggestions.suggestion_means(SEED_RUNS, GOALS, ["lam"])
    best = suggestions.best_so_far(means, GOALS)
    assert list(best.best_final_mode_entropy) == pytest.approx([2.1, 2.1])
    assert list(best.best_final_mean_image_entropy) == pytest.approx([0.8, 0.3])


def test_reproduce_picks_every_seed_of_the_best_suggestion():
    study_spec = SimpleNamespace(
        objectives=(Objective("mode_entropy", "max"),), space={"lam": Range(0.01, 10.0, True)}
    )
    ids, why = choose_suggestion(SEED_RUNS, study_spec)
    assert ids == ["x_00000", "x_00001"] and "x_00000" in why


def test_importances_name_the_parameter_that_moves_the_objective():
    rng = np.random.default_rng(0)
    lam, d = rng.uniform(0.01, 10, 12), rng.uniform(0, 3, 12)
    means = pd.DataFrame({"lam": lam, "d": d, "final_mode_entropy": lam / 10})
    space = {"lam": Range(0.01, 10.0), "d": Range(0.0, 3.0)}
    table = suggestions.importances(means, {"final_mode_entropy": "max"}, space)
    assert table.loc["lam", "final_mode_entropy"] > 0.8 > table.loc["d", "final_mode_entropy"]


def test_suggestions_are_in_the_order_their_first_seed_started():
    # Under a searcher Tune's trial ids are random: the start time gives Optuna's order.
    started = SEED_RUNS.assign(started_at=[5.0, 6.0, 1.0, 2.0, 0.5])
    means = suggestions.suggestion_means(started, GOALS, ["lam"])
    assert list(means[SUGGESTION]) == ["x_00002", "x_00000"]
    best = suggestions.best_so_far(means, GOALS)
    assert list(best.best_final_mode_entropy) == pytest.approx([1.2, 2.1])
