"""Study files: the shipped ones validate; each kind of bad input is one line naming the key."""

from pathlib import Path

import pytest
import yaml

from gvae.cli import main
from gvae.errors import GvaeError
from gvae.study.spec import Range, load_study, parse_study

STUDIES = Path(__file__).resolve().parent.parent / "studies"

VALID = {
    "name": "t",
    "dataset": "mnist5k",
    "models": ["gan", "cvaegan"],
    "iterations": 40,
    "eval_every": 20,
    "fixed": {"batch_size": 16},
    "search": {"grid": {"seed": [0, 1]}},
}
OPTUNA = {
    **VALID,
    "search": {
        "optuna": {
            "trials": 4,
            "objectives": {"mode_entropy": "max", "mean_image_entropy": "min"},
            "space": {"lam": {"low": 0.1, "high": 10.0, "log": True}, "d": [0.0, 1.0]},
            "replicates": 2,
        }
    },
}


def changed(base: dict, path: str, value) -> dict:
    """A deep copy of base with the dotted key set to value (or removed when value is DELETE)."""
    data = yaml.safe_load(yaml.safe_dump(base))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()
BAD = [
    (VALID, "colour", "red", "colour"),
    (VALID, "name", DELETE, "name"),
    (VALID, "models", ["gan", "gann"], "models"),
    (VALID, "dataset", "cifar", "dataset"),
    (VALID, "dataset", ["mnist5k", "cifar"], "dataset"),
    (VALID, "dataset", ["mnist5k", "mnist5k"], "dataset"),
    (VALID, "dataset", [], "dataset"),
    (OPTUNA, "dataset", ["mnist5k", "stacked-mnist5k"], "dataset"),
    (VALID, "iterations", "many", "iterations"),
    (VALID, "eval_every", 100, "eval_every"),
    (VALID, "fixed.lam", -1.0, "fixed.lam"),
    (VALID, "fixed.lr", 0, "fixed.lr"),
    (VALID, "fixed.lamda", 1.0, "fixed.lamda"),
    (VALID, "search.grid.lam", [1.0, -0.5], "search.grid.lam"),
    (VALID, "search.grid.seed", [], "search.grid.seed"),
    (VALID, "search.grid.seed", [0, 1, 0], "search.grid.seed"),
    (VALID, "search.random", {}, "search.random"),
    (VALID, "resources", {"cpus": 0}, "resources.cpus"),
    (VALID, "resources", {"gpu": 1}, "resources.gpu"),
    (VALID, "resources", {"pack": 0}, "resources.pack"),
    (VALID, "resources", {"pack": 2.5}, "resources.pack"),
    (
        changed(VALID, "search.grid", {"lam": [1.0, 2.0]}),
        "resources",
        {"pack": 2},
        "resources.pack",
    ),
    (changed(VALID, "fixed.arch", "conv"), "resources", {"pack": 2}, "resources.pack"),
    (
        changed(VALID, "scheduler", {"asha": {"metric": "mode_entropy", "mode": "max"}}),
        "resources",
        {"pack": 2},
        "resources.pack",
    ),
    (OPTUNA, "resources", {"pack": 3}, "resources.pack"),  # not its replicates (2)
    (VALID, "scheduler", {"asha": {"metric": "fid"}}, "scheduler.asha.metric"),
    (OPTUNA, "search.optuna.space.lam.low", 20.0, "search.optuna.space.lam.low"),
    (OPTUNA, "search.optuna.space.d", {"low": -1.0, "high": 1.0}, "search.optuna.space.d"),
    (OPTUNA, "search.optuna.space.lam.low", 0.0, "search.optuna.space.lam.low"),
    (OPTUNA, "search.optuna.objectives", {"fid": "min"}, "search.optuna.objectives.fid"),
    (OPTUNA, "search.optuna.objectives", {"mode_entropy": "up"}, "objectives.mode_entropy"),
    (OPTUNA, "search.optuna.trials", 0, "search.optuna.trials"),
    (OPTUNA, "search.optuna.space.seed", [0, 1], "search.optuna.space.seed"),
    (OPTUNA, "search.optuna.replicates", 0, "search.optuna.replicates"),
    (OPTUNA, "search.optuna.replicates", 1.5, "search.optuna.replicates"),
]


@pytest.mark.parametrize("base,path,value,key", BAD, ids=[f"{b[1]}={b[2]!r}" for b in BAD])
def test_bad_study_names_the_key(base, path, value, key):
    with pytest.raises(GvaeError) as error:
        parse_study(changed(base, path, value))
    message = str(error.value)
    assert key in message.split(":")[0] and "\n" not in message


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    study = tmp_path / "bad.yaml"
    study.write_text(yaml.safe_dump(changed(VALID, "fixed.lam", -1.0)))
    storage = tmp_path / "results"
    assert main(["study", "run", str(study), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gvae: error: fixed.lam:") and "\n" not in err
    assert not storage.exists()


def test_malformed_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(GvaeError, match="not valid YAML"):
        load_study(broken)
    with pytest.raises(GvaeError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_validate(path):
    spec = load_study(path)
    assert spec.name == path.stem
    assert spec.trial_count >= 1


def test_quick_and_paper_studies_cover_all_five_models():
    for name in ("quick", "paper"):
        spec = load_study(STUDIES / f"{name}.yaml")
        assert set(spec.models) == {"gan", "wgan", "vae", "vaegan", "cvaegan"}
    assert load_study(STUDIES / "quick.yaml").trial_count == 15
    assert load_study(STUDIES / "paper.yaml").trial_count == 25


def test_a_grid_study_over_two_datasets_trains_each_combination_on_its_dataset():
    spec = parse_study(changed(VALID, "dataset", ["mnist5k", "stacked-mnist5k"]))
    assert spec.datasets == ("mnist5k", "stacked-mnist5k") and spec.trial_count == 8
    combos = spec.grid_trials()
    assert {(c["model"], c["dataset"], c["seed"]) for c in combos} == {
        (model, dataset, seed)
        for model in ("gan", "cvaegan")
        for dataset in ("mnist5k", "stacked-mnist5k")
        for seed in (0, 1)
    }
    assert parse_study(VALID).datasets == ("mnist5k",)


def test_a_packed_grid_parses_and_packs_each_points_seeds():
    from gvae.study.packs import pack_points

    spec = parse_study(
        changed(changed(VALID, "resources", {"pack": 2}), "search.grid.seed", [4, 2, 9])
    )
    assert spec.pack == 2 and spec.trial_count == 6  # rows: one per member
    packs = pack_points(spec.grid_trials(), spec.pack)
    assert [(p["model"], p["seeds"]) for p in packs] == [
        ("gan", "4,2"),
        ("gan", "9"),
        ("cvaegan", "4,2"),
        ("cvaegan", "9"),
    ]
    assert all("seed" not in point for point in packs)
    assert spec.tune_trial_count == 4


def test_an_optuna_study_packs_each_suggestions_replicates():
    spec = parse_study(changed(OPTUNA, "resources", {"pack": 2}))
    assert spec.trial_count == 8 and spec.tune_trial_count == 4  # 4 suggestions x 2 seeds


def test_grid_and_optuna_parse():
    grid = parse_study(VALID)
    assert grid.grid_trials() == [
        {"model": "gan", "seed": 0},
        {"model": "gan", "seed": 1},
        {"model": "cvaegan", "seed": 0},
        {"model": "cvaegan", "seed": 1},
    ]
    optuna = parse_study(OPTUNA)
    assert optuna.space["lam"] == Range(0.1, 10.0, log=True)
    assert (optuna.trials, optuna.replicates, optuna.trial_count) == (4, 2, 8)
    assert [(o.metric, o.mode) for o in optuna.objectives] == [
        ("mode_entropy", "max"),
        ("mean_image_entropy", "min"),
    ]


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(VALID).replace("batch_size: 16", "batch_size: 16\n  lr: 1e-4"))
    assert load_study(study).fixed["lr"] == 1e-4
