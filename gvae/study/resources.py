"""Checks that a study's trials can ever be placed, made before any trial is submitted.

Tune only warns about trials it cannot place and then waits for ever; a trial that asks for CUDA
without a GPU fails on every retry. Both are refused here with the fix, exit status 2.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from gvae.errors import GvaeError
from gvae.study.spec import StudySpec

# How long a study on a cluster waits for the autoscaler to bring a node that fits one trial:
# launching a cloud GPU instance and running its setup commands takes minutes.
RESOURCE_WAIT_SECONDS = 900.0


def check_devices(spec: StudySpec, local: bool) -> None:
    """Refuse, before Ray starts, trials that ask for CUDA where they cannot get it."""
    asked = _cuda_fields(spec)
    auto = f"{asked[0].rsplit('.', 1)[-1]}: auto" if asked else "device: auto"
    if asked and spec.gpus <= 0:
        raise GvaeError(
            f"{asked[0]}: trials ask for a CUDA device but resources.gpus is 0, so Ray gives them "
            f"no GPU; set resources.gpus: 1 (or a fraction such as 0.5), or {auto}"
        )
    if local and (asked or spec.gpus > 0) and not _cuda_available():
        field = asked[0] if asked else "resources.gpus"
        raise GvaeError(
            f"{field}: trials ask for a GPU but this machine has none (torch finds no CUDA "
            f"device or driver); set resources.gpus: 0 and {auto}, or join a GPU cluster "
            "with --address"
        )


def _cuda_available() -> bool:
    import torch  # here: checking a CPU-only study must not import torch (gvae.study.ray_start)

    return torch.cuda.is_available()


# Trial fields whose value makes a trial ask for CUDA, and the values that do.
ASKS_FOR_CUDA = {
    "device": lambda value: str(value).startswith("cuda"),
    "graph": lambda value: value == "on",  # gvae.graphs
}


def _cuda_fields(spec: StudySpec) -> list[str]:
    """The study-file keys that make a trial ask for CUDA."""
    fields = []
    for key, asks in ASKS_FOR_CUDA.items():
        if key in spec.fixed and asks(spec.fixed[key]):
            fields.append(f"fixed.{key}")
        if any(asks(value) for value in spec.grid.get(key, [])):
            fields.append(f"search.grid.{key}")
        space = spec.space.get(key)
        if isinstance(space, list) and any(asks(value) for value in space):
            fields.append(f"search.optuna.space.{key}")
    return fields


def check_resources(spec: StudySpec, wait: float, log: Callable[[str], None]) -> None:
    """Stop, with the fix, when no Ray node can hold one trial within `wait` seconds.

    Tune only warns about trials it cannot place and then waits for ever; on a cluster the
    autoscaler may still add a node that fits, so that case waits first.
    """
    demand = {"CPU": spec.cpus, "GPU": spec.gpus}
    deadline = time.monotonic() + wait
    while (missing := _unplaceable(demand)) is not None:
        if time.monotonic() >= deadline:
            raise GvaeError(_resource_error(spec, missing, wait))
        log(f"waiting for the autoscaler to add a node with {_describe(demand)} ...")
        time.sleep(min(10.0, max(deadline - time.monotonic(), 0.0)))


def _unplaceable(demand: dict[str, float]) -> tuple[str, float] | None:
    """None when a live node holds the demand, else (resource, the most one node has)."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(all(node.get(k, 0) >= v for k, v in demand.items() if v > 0) for node in nodes):
        return None
    for key, value in demand.items():
        most = max((node.get(key, 0) for node in nodes), default=0)
        if value > 0 and most < value:
            return key, most
    return "CPU+GPU", 0.0  # each fits somewhere, never together


def _resource_error(spec: StudySpec, missing: tuple[str, float], wait: float) -> str:
    key, most = missing
    waited = f"(waited {wait:g} s for the autoscaler)" if wait else "(a local Ray does not grow)"
    if key == "GPU":
        return (
            f"resources.gpus: trials ask for {spec.gpus:g} GPU but no Ray node has that many "
            f"{waited}; set resources.gpus: 0 or add GPU workers (see cluster.yaml)"
        )
    if key == "CPU":
        return (
            f"resources.cpus: a trial asks for {spec.cpus:g} CPUs but the largest Ray node has "
            f"{most:g} {waited}; set resources.cpus: {max(most, 1):g} or less, or add bigger nodes"
        )
    return (
        f"resources: no Ray node has both {spec.cpus:g} CPUs and {spec.gpus:g} GPUs {waited}; "
        "lower resources.cpus or add bigger GPU nodes"
    )


def _describe(demand: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}s" for k, v in demand.items() if v > 0)
