"""Study files: the shipped ones validate; each kind of bad input is one line naming the key."""

import os
from pathlib import Path

import pytest
import yaml

from gvae.cli import main
from gvae.errors import GvaeError
from gvae.study.resources import check_devices
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


class Deleted:
    """The value that `changed` deletes the key for (a stable test id, unlike `object()`)."""

    def __repr__(self) -> str:
        return "<deleted>"


DELETE = Deleted()
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
    (OPTUNA, "search.optuna.space.lam.log", "yes", "search.optuna.space.lam.log"),
    (VALID, "fixed.graph", "fast", "fixed.graph"),
    (VALID, "search.grid.graph", ["off", True], "search.grid.graph"),
    (changed(VALID, "fixed.device", "cpu"), "fixed.graph", "on", "fixed.graph"),
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


def test_on_off_yes_and_no_are_words_and_only_true_and_false_booleans(tmp_path):
    study = tmp_path / "s.yaml"
    text = yaml.safe_dump(OPTUNA).replace("log: true", "log: TRUE")
    study.write_text(text.replace("batch_size: 16", "batch_size: 16\n  graph: on"))
    spec = load_study(study)  # YAML 1.1 would read graph: on as true, and refuse it
    assert spec.fixed["graph"] == "on" and spec.space["lam"].log is True
    grid = changed(VALID, "search.grid.graph", ["off", "auto"])
    study.write_text(yaml.safe_dump(grid).replace("- 'off'", "- off"))
    assert load_study(study).grid["graph"] == ["off", "auto"]


# --- bad input is refused before Ray starts: one line, exit status 2, nothing written ---------


class RayStarted(Exception):
    """Raised in place of starting Ray: a study that reaches it passed every check before Ray."""


@pytest.fixture
def refused(tmp_path, monkeypatch, capsys):
    """Run `gvae study run` (after writing the study, a dict or bytes, to tmp_path/study.yaml)
    in tmp_path; assert exit status 2, one stderr line and no file or folder written; return the
    line."""
    from gvae.study.ray_start import RayStart

    def begin(*args, **kwargs):
        raise RayStarted

    monkeypatch.setattr(RayStart, "begin", begin)
    monkeypatch.chdir(tmp_path)

    def run(study: dict | bytes, *flags: str) -> str:
        path = tmp_path / "study.yaml"
        path.write_bytes(study if isinstance(study, bytes) else yaml.safe_dump(study).encode())
        before = sorted(tmp_path.rglob("*"))
        capsys.readouterr()
        assert main(["study", "run", str(path), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert sorted(tmp_path.rglob("*")) == before
        return err.strip()

    return run


def test_iterations_past_the_limit_are_refused_with_the_limit(refused):
    # 10**13 iterations would train until killed.
    assert refused(changed(VALID, "iterations", 10**13)) == (
        "gvae: error: iterations: 10000000000000 is more than the limit of 1000000000 "
        "iterations a trial may train; pass a value from 1 to 1000000000"
    )
    assert refused(changed(VALID, "fixed.eval_samples", 10**7)) == (
        "gvae: error: fixed.eval_samples: 10000000 is more than the limit of 1000000 samples an "
        "evaluation may generate; pass a value from 1 to 1000000"
    )
    assert refused(changed(VALID, "search.grid", {"batch_size": [64, 10**9]})).startswith(
        "gvae: error: search.grid.batch_size: 1000000000 is more than the limit of 100000000 images"
    )
    assert refused(changed(OPTUNA, "search.optuna.trials", 10**13)) == (
        "gvae: error: search.optuna.trials: must be from 1 to the limit of 100000 suggestions "
        "(got 10000000000000); pass the number of suggestions to try"
    )


def test_a_model_or_dataset_listed_twice_is_refused(refused):
    # The same trial twice, as a grid value listed twice is.
    assert refused(changed(VALID, "models", ["vae", "vae"])) == (
        "gvae: error: models: 'vae' is listed twice; list each model once"
    )
    assert refused(changed(VALID, "dataset", ["mnist5k", "stacked-mnist5k", "mnist5k"])) == (
        "gvae: error: dataset: 'mnist5k' is listed twice; list each dataset once"
    )
    space = changed(OPTUNA, "search.optuna.space.gan_loss", ["minimax", "minimax"])
    assert refused(space) == (
        "gvae: error: search.optuna.space.gan_loss: 'minimax' is listed twice; "
        "list each choice once"
    )


def test_a_name_that_is_not_a_plain_folder_name_is_refused(refused):
    allowed = "letters, digits, '-', '_' and '.' (not first)"
    assert refused(changed(VALID, "name", "lam sweep")) == (
        "gvae: error: name: 'lam sweep' has a space, which a study name may not (it names the "
        f"study's folder and its Ray Tune experiment); use only {allowed}"
    )
    assert refused(changed(VALID, "name", "..")) == (
        "gvae: error: name: '..' is the folder above the storage, not a study folder inside it; "
        f"name the study with {allowed}, e.g. lam_sweep"
    )
    assert refused(changed(VALID, "name", "a/b")).startswith("gvae: error: name: 'a/b' has '/'")
    assert refused(changed(VALID, "name", ".hidden")).startswith(
        "gvae: error: name: '.hidden' starts with '.'"
    )
    assert refused(changed(VALID, "name", "x" * 101)) == (
        "gvae: error: name: 101 characters long; shorten it to 100 at most"
    )
    assert parse_study(changed(VALID, "name", "lam_sweep-2.1")).name == "lam_sweep-2.1"


def test_a_binary_study_file_is_one_line_naming_it(refused, tmp_path):
    assert refused(b"\x89PNG\r\n\x1a\n\x00\xff") == (
        f"gvae: error: study file: {tmp_path / 'study.yaml'} is not a text file (byte 0 is not "
        "UTF-8); pass a YAML study file such as studies/quick.yaml"
    )


def test_float_fields_must_be_finite(refused):
    assert refused(changed(VALID, "fixed.lr", float("inf"))) == (
        "gvae: error: fixed.lr: must be a finite number > 0 (got inf); pass a finite number > 0"
    )
    assert refused(changed(VALID, "fixed.lam", float("nan"))) == (
        "gvae: error: fixed.lam: must be a finite number >= 0 (got nan); pass a finite number >= 0"
    )
    assert refused(changed(VALID, "search.grid", {"clip": [0.01, float("inf")]})) == (
        "gvae: error: search.grid.clip: must be a finite number > 0 (got inf); "
        "pass a finite number > 0"
    )
    assert refused(changed(OPTUNA, "search.optuna.space.lam.high", float("inf"))) == (
        "gvae: error: search.optuna.space.lam.high: must be a finite number (got inf); "
        "pass a finite number"
    )
    assert refused(changed(OPTUNA, "search.optuna.space.d", {"low": float("nan"), "high": 1})) == (
        "gvae: error: search.optuna.space.d.low: must be a finite number (got nan); "
        "pass a finite number"
    )


def test_storage_that_cannot_be_written_is_refused_before_ray(refused, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fix = "pass a --storage folder you can write"
    assert refused(VALID, "--storage", str(blocker)) == (
        f"gvae: error: --storage: cannot write the study folder {blocker}/t ({blocker} is not a "
        f"folder); {fix}"
    )
    assert refused(VALID, "--storage", str(blocker / "results")) == (
        f"gvae: error: --storage: cannot write the study folder {blocker}/results/t ({blocker} "
        f"is not a folder); {fix}"
    )
    assert refused(changed(VALID, "storage", str(blocker / "results"))) == (
        f"gvae: error: storage: cannot write the study folder {blocker}/results/t ({blocker} "
        "is not a folder); set storage to a folder you can write, or pass --storage"
    )
    taken = tmp_path / "results"  # the study's folder is a file
    taken.mkdir()
    (taken / "t").write_text("keep me")
    assert refused(VALID, "--storage", str(taken)) == (
        f"gvae: error: --storage: cannot write the study folder {taken}/t ({taken}/t is not a "
        f"folder); {fix}"
    )
    assert (taken / "t").read_text() == "keep me"
    if Path("/proc").is_dir():  # nothing can be made there, not even by root
        assert refused(VALID, "--storage", "/proc/gvae-results") == (
            "gvae: error: --storage: cannot write the study folder /proc/gvae-results/t (No such "
            f"file or directory); {fix}"
        )
        assert not Path("/proc/gvae-results").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o500 folder regardless")
def test_storage_without_write_permission_is_refused_before_ray(refused, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert refused(VALID, "--storage", str(locked / "results")) == (
            f"gvae: error: --storage: cannot write the study folder {locked}/results/t "
            "(Permission denied); pass a --storage folder you can write"
        )
    finally:
        locked.chmod(0o700)


def test_writable_storage_passes_the_check_and_is_left_as_it_was(tmp_path, monkeypatch):
    from gvae.study.ray_start import RayStart

    def begin(*args, **kwargs):
        raise RayStarted

    monkeypatch.setattr(RayStart, "begin", begin)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(VALID))
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("keep me")
    for storage in (tmp_path / "new" / "results", kept):
        with pytest.raises(RayStarted):
            main(["study", "run", str(study), "--storage", str(storage)])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [
        Path("kept"),
        Path("kept/notes.txt"),
        Path("study.yaml"),
    ]


def test_tracking_comes_from_the_study_file_or_the_mlflow_flag_and_needs_its_extra(monkeypatch):
    import importlib.util

    from gvae.study.spec import with_mlflow

    spec = load_study("studies/quick.yaml")
    tracked = with_mlflow(spec, "sqlite:///mlflow.db")
    assert tracked.tracking == {
        "mlflow": {"experiment": "quick", "tracking_uri": "sqlite:///mlflow.db"}
    }
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "mlflow" else found(name)
    )
    with pytest.raises(GvaeError, match=r"^tracking\.mlflow: mlflow is not installed; pip "):
        with_mlflow(spec, "sqlite:///mlflow.db")
    raw = {**yaml.safe_load(Path("studies/quick.yaml").read_text()), "tracking": {"wandb": {}}}
    with pytest.raises(GvaeError, match=r"^tracking\.wandb: wandb is not installed"):
        parse_study(raw)


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("fixed.device", "cuda:1", "fixed.device"),
        ("search.grid.graph", ["off", "on"], "search.grid.graph"),
        ("search.optuna.space.graph", ["off", "on"], "search.optuna.space.graph"),
    ],
)
def test_each_key_that_asks_for_cuda_is_named_when_no_gpu_is_given(path, value, key):
    spec = parse_study(changed(OPTUNA if "optuna" in path else VALID, path, value))
    with pytest.raises(GvaeError) as error:
        check_devices(spec, local=False)
    assert str(error.value).startswith(f"{key}: trials ask for a CUDA device but resources.gpus")
    assert str(error.value).endswith(f"or {key.rsplit('.', 1)[-1]}: auto")
    check_devices(parse_study(changed(VALID, "fixed.graph", "auto")), local=False)  # no CUDA ask
