"""What Tune searches: the grid's points in the order they start, or Optuna over the space (its
study kept in an Optuna journal), and the scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
from optuna.storages import RDBStorage
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from gvae.config import TrialConfig
from gvae.study.compat import OptunaSearch, SuggestionGenerator, VariantGenerator
from gvae.study.packs import PACKED_SUGGESTION, SEEDS, pack_points, replicate_seeds
from gvae.study.replicates import SeedReplicates
from gvae.study.spec import Range, StudySpec
from gvae.study.tables import SUGGESTION


@dataclass(frozen=True)
class Journal:
    """Where an Optuna search writes its journal, and where a copy of it is kept (the study
    folder on an object store, which cannot append to a file), if anywhere."""

    path: str
    mirror: tuple[pafs.FileSystem, str] | None = None


def tune_search(
    spec: StudySpec,
    image_sizes: dict[str, int],
    journal: Journal | None,
    storage: tuple[str, pafs.FileSystem],
) -> dict[str, Any]:
    """tune.run's search arguments: the grid's points in the order they start (Tune's own grid
    order is by key name), or Optuna over the space."""
    space: dict[str, Any] = dict(spec.base_config())
    space["model"] = tune.choice(list(spec.models)) if len(spec.models) > 1 else spec.models[0]
    if spec.search_type == "grid":
        points = tune_points(spec, image_sizes)
        space["model"] = tune.choice(list(spec.models))
        # Points may only set keys the space has; every point sets them all, so nothing is drawn.
        space["dataset"] = tune.choice(list(spec.datasets))
        space.update({key: tune.choice(values) for key, values in spec.grid.items()})
        if spec.pack > 1:
            del space["seed"]
            space[SEEDS] = tune.choice([point[SEEDS] for point in points])
        generator = VariantGenerator(
            points_to_evaluate=points,
            max_concurrent=spec.concurrency,
            storage_path=storage[0],
            filesystem=storage[1],
        )
        return {"config": space, "search_alg": generator, "num_samples": len(points)}
    space.update({key: _domain(value) for key, value in spec.space.items()})
    if spec.pack > 1:  # one trial per suggestion, training its replicates as one pack
        space[SEEDS] = replicate_seeds(spec.fixed.get("seed", 0), spec.replicates)
        space[SUGGESTION] = PACKED_SUGGESTION
    searcher = _optuna_search(spec, journal)
    if spec.concurrency:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.concurrency)
    generator = SuggestionGenerator(searcher, *storage)
    return {"config": space, "search_alg": generator, "num_samples": spec.tune_trial_count}


def tune_points(spec: StudySpec, image_sizes: dict[str, int]) -> list[dict[str, Any]]:
    """The grid's points as Tune trials, longest first: a pack of seeds each under
    `resources.pack` (gvae.study.packs), else one trial each."""
    points = longest_first(spec, image_sizes)
    return pack_points(points, spec.pack) if spec.pack > 1 else points


def longest_first(spec: StudySpec, image_sizes: dict[str, int]) -> list[dict[str, Any]]:
    """The grid's trials, the longest expected first, so no long trial starts last (the tail).

    Expected length: iterations x batch size x train steps per iteration (WGAN's n_critic critic
    steps plus one) x the nets one step trains x the values in an image of the trial's dataset
    (`image_sizes`, by name: the nets' outer layers grow with it); only the order matters.
    """

    def cost(fields: dict[str, Any]) -> float:
        config = TrialConfig.from_dict({**spec.base_config(), **fields}).resolved()
        steps = config.n_critic + 1 if config.model == "wgan" else 1
        nets = NETS_PER_STEP.get(config.model, 1)
        size = image_sizes[config.dataset]
        return config.iterations * config.batch_size * steps * nets * size

    return sorted(spec.grid_trials(), key=cost, reverse=True)  # stable: file order on ties


# Nets trained per step, a rough relative cost of one iteration (WGAN's steps counted apart).
NETS_PER_STEP = {"gan": 2, "wgan": 2, "vae": 2, "vaegan": 3, "cvaegan": 3}


def _optuna_search(spec: StudySpec, journal: Journal | None) -> Searcher:
    """Optuna over the study's space, its study named after the study and kept in `journal`;
    with replicates, each suggestion runs on several seeds."""
    search: Searcher = OptunaSearch(
        metric=[o.metric for o in spec.objectives],
        mode=[o.mode for o in spec.objectives],
        seed=0,
        study_name=spec.name,
        **({"storage": RDBStorage(spec.optuna_storage)} if spec.optuna_storage else {}),
        journal=journal.path if journal else None,
        mirror=journal.mirror if journal else None,
    )
    if spec.replicates > 1 and spec.pack == 1:
        search = SeedReplicates(search, spec.replicates, base_seed=spec.fixed.get("seed", 0))
    return search


def _domain(value: Range | list[Any]) -> Any:
    if isinstance(value, list):
        return tune.choice(value)
    if value.integer:
        sampler = tune.lograndint if value.log else tune.randint
        return sampler(int(value.low), int(value.high) + 1)
    return (tune.loguniform if value.log else tune.uniform)(value.low, value.high)


def scheduler(spec: StudySpec) -> ASHAScheduler | None:
    if spec.scheduler is None:
        return None
    return ASHAScheduler(
        metric=spec.scheduler.metric,
        mode=spec.scheduler.mode,
        time_attr="training_iteration",  # counts evaluations
        max_t=spec.iterations // spec.eval_every + 1,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )
