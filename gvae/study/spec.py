"""Study files: YAML -> a validated StudySpec -> Ray Tune's search space.

The whole file is checked before Ray starts; every problem is one GvaeError line that names the key
(as a dotted path) and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from gvae import names
from gvae.config import MODEL_NAMES, TrialConfig
from gvae.errors import GvaeError
from gvae.study.packs import pack_points

TOP_KEYS = {
    "tracking",
    "name",
    "description",
    "dataset",
    "models",
    "iterations",
    "eval_every",
    "fixed",
    "search",
    "resources",
    "concurrency",
    "max_failures",
    "scheduler",
    "storage",
}
REQUIRED = ("name", "dataset", "models", "iterations", "eval_every", "search")
TRIAL_FIELDS = {f.name for f in dataclasses.fields(TrialConfig)}
# Study-level keys that are trial fields too: they may not be repeated under fixed/search.
STUDY_LEVEL_FIELDS = {"dataset", "iterations", "eval_every", "model"}
SEARCHABLE = {"model", "lam", "d", "lr", "seed", "batch_size", "n_critic", "clip", "gan_loss"}
SEARCHABLE |= {"device", "graph"}  # e.g. a grid over cpu and cuda, or eager and graph
# The scalars an evaluation reports besides the two entropies of the paper (curve columns), and
# every scalar, which an Optuna objective or the ASHA scheduler may name.
EVALUATION_METRICS = names.EVALUATION_METRICS
METRICS = names.METRIC_NAMES
# A study's name is its folder under the storage and Ray Tune's experiment name: a plain folder
# name that reads the same in a shell, a URI and on every file system.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_CHARACTERS = "letters, digits, '-', '_' and '.' (not first)"
NAME_MAX = 100
# Past these an Optuna study cannot finish (as the per-trial limits in gvae.config.LIMITS).
MAX_SUGGESTIONS = 100_000
MAX_REPLICATES = 1000


@dataclass(frozen=True)
class Range:
    """A numeric Optuna range; `integer` for seeds and counts."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "max" or "min"


@dataclass(frozen=True)
class Scheduler:
    """ASHA early stopping on one metric, counted in evaluations (Tune's training_iteration)."""

    metric: str
    mode: str
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class StudySpec:
    name: str
    datasets: tuple[str, ...]  # a grid study may compare several; each trial trains on one
    models: tuple[str, ...]
    iterations: int
    eval_every: int
    fixed: dict[str, Any]
    search_type: str  # "grid" or "optuna"
    grid: dict[str, list[Any]] = field(default_factory=dict)
    space: dict[str, Range | list[Any]] = field(default_factory=dict)
    trials: int = 1  # Optuna suggestions
    objectives: tuple[Objective, ...] = ()
    replicates: int = 1  # seeds each Optuna suggestion is trained on
    cpus: float = 1.0
    gpus: float = 0.0
    pack: int = 1  # seeds of one grid point trained as one pack (gvae.pack) per Tune trial
    concurrency: int = 0  # 0: as many as the resources allow
    max_failures: int = 2
    scheduler: Scheduler | None = None
    storage: str = "results"
    description: str = ""
    tracking: dict[str, dict[str, Any]] = field(default_factory=dict)  # tracker -> its options
    optuna_storage: str | None = None  # an RDB URL for the Optuna study; None: a journal file

    def base_config(self) -> dict[str, Any]:
        """Trial fields shared by every trial of the study."""
        return {
            **self.fixed,
            "dataset": self.datasets[0],  # grid_trials names it when there are several
            "iterations": self.iterations,
            "eval_every": self.eval_every,
        }

    def grid_trials(self) -> list[dict[str, Any]]:
        """Every combination of the grid (models, then datasets, first), as dicts of trial
        fields."""
        combos: list[dict[str, Any]] = [{"model": model} for model in self.models]
        if len(self.datasets) > 1:
            combos = [{**combo, "dataset": name} for combo in combos for name in self.datasets]
        for key, values in self.grid.items():
            combos = [{**combo, key: value} for combo in combos for value in values]
        return combos

    @property
    def tune_trial_count(self) -> int:
        """Trials as Tune runs them: packs count once (`trial_count` counts their members)."""
        if self.search_type == "optuna":
            return self.trials if self.pack > 1 else self.trials * self.replicates
        return (
            len(pack_points(self.grid_trials(), self.pack)) if self.pack > 1 else self.trial_count
        )

    @property
    def trial_count(self) -> int:
        if self.search_type == "grid":
            return len(self.grid_trials())
        return self.trials * self.replicates


class _Loader(yaml.SafeLoader):
    """Study-file YAML as YAML 1.2 reads it: 1e-5 (no dot, no sign) is a number, where YAML 1.1
    reads a string, and only true and false are booleans, where YAML 1.1 also reads on, off, yes
    and no (`graph: on` means the word)."""


BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse study-file YAML (numbers such as 1e-5 included; see _Loader)."""
    return yaml.load(text, Loader=_Loader)


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file."""
    return parse_study(read_study_file(path))


def read_study_file(path: str | Path) -> Any:
    """The parsed YAML of a study file (not yet validated); GvaeError when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise GvaeError(
            f"study file: {path} does not exist; pass the path of a studies/*.yaml file"
        )
    if not path.is_file():
        raise GvaeError(f"study file: {path} is not a file; pass the path of a studies/*.yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise GvaeError(
            f"study file: {path} is not a text file (byte {error.start} is not UTF-8); "
            "pass a YAML study file such as studies/quick.yaml"
        ) from None
    except OSError as error:
        raise GvaeError(
            f"study file: cannot read {path} ({error.strerror}); pass a file you can read"
        ) from None
    try:
        return read_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise GvaeError(f"study file: {path} is not valid YAML{where}; fix the syntax") from None


def parse_study(data: Any) -> StudySpec:
    _require_mapping(data, "study file")
    _reject_unknown(data, TOP_KEYS, "")
    for key in REQUIRED:
        if key not in data:
            raise GvaeError(f"{key}: missing; add it to the study file (see README, Study files)")
    name = _name(_typed(data, "name", str))
    models = tuple(_models(data["models"]))
    fixed = _fixed(data.get("fixed") or {})
    search_type, grid, space, trials, objectives, replicates = _search(data["search"])
    resources = data.get("resources") or {}
    _require_mapping(resources, "resources")
    _reject_unknown(resources, {"cpus", "gpus", "pack"}, "resources.")
    spec = StudySpec(
        name=name,
        description=str(data.get("description", "")),
        datasets=tuple(_datasets(data["dataset"], search_type)),
        models=models,
        iterations=_typed(data, "iterations", int),
        eval_every=_typed(data, "eval_every", int),
        fixed=fixed,
        search_type=search_type,
        grid=grid,
        space=space,
        trials=trials,
        replicates=replicates,
        objectives=objectives,
        cpus=_positive(resources, "cpus", 1.0, "resources.", allow_zero=False),
        gpus=_positive(resources, "gpus", 0.0, "resources."),
        pack=int(_positive(resources, "pack", 1, "resources.", integer=True, allow_zero=False)),
        concurrency=int(_positive(data, "concurrency", 0, "", integer=True)),
        max_failures=int(_positive(data, "max_failures", 2, "", integer=True)),
        scheduler=_scheduler(data.get("scheduler")),
        storage=str(data.get("storage", "results")),
        tracking=_tracking(data.get("tracking") or {}),
        optuna_storage=_optuna_storage(data["search"]),
    )
    _validate_trials(spec)
    _validate_pack(spec)
    return spec


RDB_SCHEMES = ("sqlite://", "postgresql", "mysql")


def _optuna_storage(search: dict[str, Any]) -> str | None:
    """An Optuna search's RDB storage URL, when the study file names one."""
    url = (search.get("optuna") or {}).get("storage")
    if url is None:
        return None
    if not isinstance(url, str) or not url.startswith(RDB_SCHEMES):
        raise GvaeError(
            "search.optuna.storage: expected a database URL (sqlite:///study.db, "
            f"postgresql://..., mysql://...), got {url!r}; leave it out for a journal file"
        )
    return url


# Trackers a study can send its trials to, through Ray Tune's callbacks: their options, and
# the extra that installs each.
TRACKERS = {
    "mlflow": ({"tracking_uri", "experiment"}, "mlflow", "mlflow"),
    "wandb": ({"project", "entity", "group", "mode"}, "wandb", "wandb"),
}


def _tracking(data: Any) -> dict[str, dict[str, Any]]:
    _require_mapping(data, "tracking")
    _reject_unknown(data, set(TRACKERS), "tracking.")
    tracking = {}
    for name, options in data.items():
        options = options or {}
        _require_mapping(options, f"tracking.{name}")
        keys, module, extra = TRACKERS[name]
        _reject_unknown(options, keys, f"tracking.{name}.")
        if importlib.util.find_spec(module) is None:
            raise GvaeError(
                f"tracking.{name}: {module} is not installed; pip install -e '.[{extra}]'"
            )
        tracking[name] = {key: str(value) for key, value in options.items()}
    return tracking


def with_mlflow(spec: StudySpec, tracking_uri: str) -> StudySpec:
    """The spec with its trials sent to MLflow at `tracking_uri` (`--mlflow`), in an experiment
    named after the study unless the study file names one."""
    options = {"experiment": spec.name, **spec.tracking.get("mlflow", {})}
    options["tracking_uri"] = tracking_uri
    return replace(spec, tracking={**spec.tracking, **_tracking({"mlflow": options})})


def _validate_pack(spec: StudySpec) -> None:
    """Packs hold the seeds of one grid point, or an Optuna suggestion's replicates, on MLP nets
    (a dataset streamed from disk is refused when the pack starts: whether one is streamed shows
    only once it is found)."""
    if spec.pack == 1:
        return
    if spec.search_type == "optuna" and spec.pack != spec.replicates:
        raise GvaeError(
            "resources.pack: an Optuna study packs each suggestion's replicates; set it to "
            f"search.optuna.replicates ({spec.replicates}) or 1"
        )
    if spec.search_type == "grid" and "seed" not in spec.grid:
        raise GvaeError(
            "resources.pack: packs the seeds of a grid; add search.grid.seed or use pack 1"
        )
    if spec.scheduler is not None:
        raise GvaeError(
            "resources.pack: a scheduler stops trials one by one, not a pack's members; "
            "remove scheduler or use pack 1"
        )
    for combo in _corner_trials(spec):
        config = TrialConfig.from_dict({**spec.base_config(), **combo})
        if config.arch != "mlp":
            raise GvaeError("resources.pack: only mlp nets pack; set arch: mlp or use pack 1")


def _name(name: str) -> str:
    """The study name, refused unless it is a plain folder name (NAME_PATTERN)."""
    if name in (".", ".."):
        where = "the storage folder itself" if name == "." else "the folder above the storage"
        raise GvaeError(
            f"name: {name!r} is {where}, not a study folder inside it; name the study with "
            f"{NAME_CHARACTERS}, e.g. lam_sweep"
        )
    if not name:
        raise GvaeError(f"name: empty; name the study with {NAME_CHARACTERS}, e.g. lam_sweep")
    if len(name) > NAME_MAX:
        raise GvaeError(f"name: {len(name)} characters long; shorten it to {NAME_MAX} at most")
    if not NAME_PATTERN.fullmatch(name):
        if name[0] in "._-":
            problem = f"starts with {name[0]!r}"
        else:
            bad = next(c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c))
            problem = "has a space" if bad == " " else f"has {bad!r}"
        raise GvaeError(
            f"name: {name!r} {problem}, which a study name may not (it names the study's folder "
            f"and its Ray Tune experiment); use only {NAME_CHARACTERS}"
        )
    return name


def _once_each(values: list[Any], key: str, what: str) -> None:
    """Refuse a list that names a value twice: the same trial would run twice."""
    repeated = [value for index, value in enumerate(values) if value in values[:index]]
    if repeated:
        raise GvaeError(f"{key}: {repeated[0]!r} is listed twice; list each {what} once")


def _require_mapping(value: Any, key: str) -> None:
    if not isinstance(value, dict):
        raise GvaeError(f"{key}: expected a mapping of keys to values, got {type(value).__name__}")


def _reject_unknown(data: dict, allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise GvaeError(
            f"{prefix}{unknown[0]}: unknown key; use one of {', '.join(sorted(allowed))}"
        )


def _typed(data: dict, key: str, kind: type, prefix: str = "") -> Any:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        raise GvaeError(f"{prefix}{key}: expected {kind.__name__}, got {value!r}")
    return value


def _positive(
    data: dict, key: str, default: float, prefix: str, integer: bool = False, allow_zero=True
) -> float:
    if key not in data:
        return default
    value = data[key]
    wanted = int if integer else (int, float)
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise GvaeError(
            f"{prefix}{key}: expected {'an integer' if integer else 'a number'}, got {value!r}"
        )
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        number = "a value" if integer else "a finite number"
        raise GvaeError(
            f"{prefix}{key}: must be {number} {bound} (got {value!r}); pass {number} {bound}"
        )
    return value


def _models(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise GvaeError("models: expected a non-empty list of model names")
    for model in value:
        if model not in MODEL_NAMES:
            raise GvaeError(f"models: unknown model {model!r}; use any of {', '.join(MODEL_NAMES)}")
    _once_each(value, "models", "model")
    return value


def _datasets(value: Any, search_type: str) -> list[str]:
    """One dataset name, or in a grid study a list of them (each trial trains on one)."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise GvaeError(f"dataset: expected a dataset name or a list of names, got {value!r}")
    _once_each(names, "dataset", "dataset")
    if len(names) > 1 and search_type != "grid":
        raise GvaeError(
            "dataset: an Optuna study searches one dataset; name one, or run a study per dataset"
        )
    return names


def _fixed(fixed: Any) -> dict[str, Any]:
    _require_mapping(fixed, "fixed")
    _reject_unknown(fixed, TRIAL_FIELDS - STUDY_LEVEL_FIELDS, "fixed.")
    return dict(fixed)


def _search(search: Any) -> tuple[str, dict, dict, int, tuple[Objective, ...], int]:
    _require_mapping(search, "search")
    _reject_unknown(search, {"grid", "optuna"}, "search.")
    if len(search) != 1:
        raise GvaeError("search: give exactly one of grid or optuna")
    if "grid" in search:
        grid = search["grid"] or {}
        _require_mapping(grid, "search.grid")
        _reject_unknown(grid, SEARCHABLE - {"model"}, "search.grid.")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise GvaeError(f"search.grid.{key}: expected a non-empty list of values")
            _once_each(values, f"search.grid.{key}", "value")  # as pack seeds: one member twice
        return "grid", dict(grid), {}, 1, (), 1
    optuna = search["optuna"]
    _require_mapping(optuna, "search.optuna")
    _reject_unknown(
        optuna, {"trials", "objectives", "space", "replicates", "storage"}, "search.optuna."
    )
    for key in ("trials", "objectives", "space"):
        if key not in optuna:
            raise GvaeError(f"search.optuna.{key}: missing; see README, Study files")
    trials = _typed(optuna, "trials", int, "search.optuna.")
    if not 0 < trials <= MAX_SUGGESTIONS:
        raise GvaeError(
            f"search.optuna.trials: must be from 1 to the limit of {MAX_SUGGESTIONS} suggestions "
            f"(got {trials}); pass the number of suggestions to try"
        )
    replicates = int(_positive(optuna, "replicates", 1, "search.optuna.", integer=True))
    if not 0 < replicates <= MAX_REPLICATES:
        raise GvaeError(
            f"search.optuna.replicates: must be from 1 to the limit of {MAX_REPLICATES} seeds "
            f"(got {replicates}); pass the seeds per suggestion"
        )
    space, objectives = _space(optuna["space"]), _objectives(optuna["objectives"])
    return "optuna", {}, space, trials, objectives, replicates


def _space(space: Any) -> dict[str, Range | list[Any]]:
    _require_mapping(space, "search.optuna.space")
    _reject_unknown(space, SEARCHABLE - {"model"}, "search.optuna.space.")
    if "seed" in space:
        raise GvaeError(
            "search.optuna.space.seed: a seed is luck, not a hyperparameter; remove it and set "
            "search.optuna.replicates: K to train each suggestion on seeds 0..K-1"
        )
    parsed: dict[str, Range | list[Any]] = {}
    for key, value in space.items():
        prefix = f"search.optuna.space.{key}"
        if isinstance(value, list) and value:
            _once_each(value, prefix, "choice")  # twice: Optuna would draw it twice as often
            parsed[key] = value
            continue
        _require_mapping(value, prefix)
        _reject_unknown(value, {"low", "high", "log"}, prefix + ".")
        if "low" not in value or "high" not in value:
            raise GvaeError(f"{prefix}: needs low and high (or a list of values)")
        low, high = (_finite(value, bound, prefix + ".") for bound in ("low", "high"))
        log = value.get("log", False)
        if not isinstance(log, bool):
            raise GvaeError(f"{prefix}.log: expected true or false, got {log!r}")
        if low > high:
            raise GvaeError(f"{prefix}.low: {low} is above high ({high}); swap them")
        if log and low <= 0:
            raise GvaeError(
                f"{prefix}.low: must be a finite number > 0 on a log scale (got {low}); "
                "pass a low > 0 or drop log"
            )
        integer = key in {"seed", "batch_size", "n_critic"}
        parsed[key] = Range(low, high, log, integer)
    return parsed


def _finite(data: dict, key: str, prefix: str) -> float:
    value = _typed(data, key, float, prefix)
    if not math.isfinite(value):
        raise GvaeError(
            f"{prefix}{key}: must be a finite number (got {value!r}); pass a finite number"
        )
    return value


def _objectives(objectives: Any) -> tuple[Objective, ...]:
    _require_mapping(objectives, "search.optuna.objectives")
    if not objectives:
        raise GvaeError(
            "search.optuna.objectives: name at least one metric, e.g. mode_entropy: max"
        )
    parsed = []
    for metric, mode in objectives.items():
        if metric not in METRICS:
            raise GvaeError(
                f"search.optuna.objectives.{metric}: unknown metric; "
                f"use one of {', '.join(METRICS)}"
            )
        if mode not in ("max", "min"):
            raise GvaeError(f"search.optuna.objectives.{metric}: expected max or min, got {mode!r}")
        parsed.append(Objective(metric, mode))
    return tuple(parsed)


def _scheduler(value: Any) -> Scheduler | None:
    if value is None:
        return None
    _require_mapping(value, "scheduler")
    _reject_unknown(value, {"asha"}, "scheduler.")
    asha = value["asha"] or {}
    _require_mapping(asha, "scheduler.asha")
    _reject_unknown(asha, {"metric", "mode", "grace_period", "reduction_factor"}, "scheduler.asha.")
    metric = asha.get("metric", "mode_entropy")
    mode = asha.get("mode", "max")
    if metric not in METRICS:
        raise GvaeError(
            f"scheduler.asha.metric: unknown metric {metric!r}; use one of {', '.join(METRICS)}"
        )
    if mode not in ("max", "min"):
        raise GvaeError(f"scheduler.asha.mode: expected max or min, got {mode!r}")
    grace = int(_positive(asha, "grace_period", 1, "scheduler.asha.", integer=True))
    factor = int(_positive(asha, "reduction_factor", 2, "scheduler.asha.", integer=True))
    if factor < 2:
        raise GvaeError("scheduler.asha.reduction_factor: must be >= 2")
    return Scheduler(metric, mode, max(grace, 1), factor)


def _validate_trials(spec: StudySpec) -> None:
    """Build and validate the trial configs the study can produce (corners of Optuna ranges)."""
    for combo in _corner_trials(spec):
        try:
            TrialConfig.from_dict({**spec.base_config(), **combo}).validate()
        except GvaeError as error:
            key, _, rest = str(error).partition(": ")
            raise GvaeError(f"{_study_key(spec, key)}: {rest}") from None


def _corner_trials(spec: StudySpec) -> list[dict[str, Any]]:
    if spec.search_type == "grid":
        return spec.grid_trials()
    corners: list[dict[str, Any]] = [{"model": model} for model in spec.models]
    for key, value in spec.space.items():
        values = value if isinstance(value, list) else [value.low, value.high]
        if isinstance(value, Range) and value.integer:
            values = [int(v) for v in values]
        corners = [{**corner, key: v} for corner in corners for v in values]
    return corners


def _study_key(spec: StudySpec, field_name: str) -> str:
    """Where in the study file a trial field came from."""
    if field_name in ("dataset", "iterations", "eval_every"):
        return field_name
    if field_name == "model":
        return "models"
    if field_name in spec.grid:
        return f"search.grid.{field_name}"
    if field_name in spec.space:
        return f"search.optuna.space.{field_name}"
    return f"fixed.{field_name}"
