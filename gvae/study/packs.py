"""Packs in a study: the seeds of a grid point, or the seed replicates of an Optuna suggestion,
trained as one pack (gvae.pack) by one Tune trial.

Tune sees one trial per pack, whose config holds `seeds` instead of `seed`; the tables see one
row per member, as if each seed had been its own trial: the member's row id is the pack's trial
id with `_seed<k>` appended, its `pack` column names the pack's trial and `pack_seeds` lists the
pack's seeds in order (what `gvae reproduce` runs again). An Optuna pack is one suggestion: its
members' `suggestion` is the pack's trial id, and Optuna is told the members' means.
"""

from __future__ import annotations

from typing import Any

# The config key of a pack trial: its members' seeds in order, as text ("0,1,2"): Tune takes a
# list in a preset point for nested parameters.
SEEDS = "seeds"
PACK = "pack"  # the trials-table column naming a member's pack (its Tune trial id)
PACK_SEEDS = "pack_seeds"  # and the column of its pack's seeds, in the pack's order


def pack_points(points: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """The grid points with those that differ only in seed merged, `size` seeds at most per pack,
    in the order of each group's first point."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for point in points:
        rest = {key: value for key, value in point.items() if key != "seed"}
        groups.setdefault(tuple(sorted(rest.items())), []).append(point)
    packed = []
    for group in groups.values():
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            rest = {key: value for key, value in chunk[0].items() if key != "seed"}
            packed.append({**rest, SEEDS: ",".join(str(point["seed"]) for point in chunk)})
    return packed


# The `suggestion` an Optuna pack trial's config carries: its members are the replicates of one
# suggestion, whose id is the pack's trial id (known only once Tune names the trial).
PACKED_SUGGESTION = "this pack"


def replicate_seeds(base_seed: int, replicates: int) -> str:
    """The SEEDS value of an Optuna pack: the replicates' seeds, base_seed + 0 .. K-1."""
    return ",".join(str(base_seed + index) for index in range(replicates))


def is_pack(params: dict[str, Any]) -> bool:
    return SEEDS in params


def seeds_of(params: dict[str, Any]) -> list[int]:
    """A pack trial's seeds, in order."""
    return [int(seed) for seed in str(params[SEEDS]).split(",")]


def members(trial_id: str, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(row id, trial fields) of each member of a trial: the trial itself unless it is a pack."""
    if not is_pack(params):
        return [(trial_id, params)]
    fields = {key: value for key, value in params.items() if key != SEEDS}
    return [(f"{trial_id}_seed{seed}", {**fields, "seed": seed}) for seed in seeds_of(params)]
