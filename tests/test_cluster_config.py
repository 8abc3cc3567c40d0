"""Offline checks of cluster.yaml, the Ray cluster-launcher config.

The config is validated the way `ray up` does before it talks to the cloud: `prepare_config`
merges it with the provider's defaults.yaml (and fills per-node-type worker bounds), then
`validate_config` checks the result against Ray's own ray-schema.json plus a few cross-field
rules. `ray up` additionally asks AWS for instance-type resources; that step is skipped here, so
nothing in this file needs credentials or a network.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any test here that tries to reach the network (e.g. boto3 asking AWS)."""

    def refuse(*args, **kwargs):
        raise AssertionError("cluster config tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def raw() -> dict:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


@pytest.fixture
def config(raw) -> dict:
    """A fresh copy of the file's content, free to modify."""
    return copy.deepcopy(raw)


def prepare_and_validate(config: dict) -> dict:
    """What `ray up` does with the file before contacting the cloud provider."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def head_type(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def worker_types(config: dict) -> dict[str, dict]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def test_shipped_config_validates(config):
    prepared = prepare_and_validate(config)
    assert prepared["cluster_name"] == "gvae"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"]
    assert prepared["auth"]["ssh_user"]


@pytest.mark.parametrize(
    ("key", "typo"),
    [
        ("max_workers", "max_worker"),
        ("idle_timeout_minutes", "idle_timeout_minute"),
        ("setup_commands", "setup_command"),
        ("file_mounts", "file_mount"),
    ],
)
def test_typo_in_top_level_key_is_rejected(config, key, typo):
    config[typo] = config.pop(key)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        prepare_and_validate(config)


@pytest.mark.parametrize(
    ("key", "typo"),
    [
        ("min_workers", "min_worker"),
        ("max_workers", "max_worker"),
        ("resources", "resource"),
        ("node_config", "node_configs"),
    ],
)
def test_typo_inside_node_type_is_rejected(config, key, typo):
    (worker,) = worker_types(config).values()
    worker[typo] = worker.pop(key)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        prepare_and_validate(config)


def test_fractional_resources_are_rejected(config):
    # The schema only accepts whole numbers for node-type resources.
    (worker,) = worker_types(config).values()
    worker["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        prepare_and_validate(config)


def test_gpu_worker_type_autoscales_from_zero(config):
    workers = worker_types(config)
    assert len(workers) == 1
    (worker,) = workers.values()
    assert worker["min_workers"] == 0
    assert worker["max_workers"] >= 1
    assert worker["max_workers"] <= config["max_workers"]
    assert worker["resources"].get("GPU", 0) >= 1
    # A GPU instance family (g4dn, g5, g6, p3, p4d, p5, ...) to back that GPU resource.
    assert re.match(r"^[gp]\d", worker["node_config"]["InstanceType"])


def test_head_runs_the_driver_but_no_trials(config):
    head = head_type(config)
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0
    assert not re.match(r"^[gp]\d", head["node_config"]["InstanceType"])


def test_every_node_type_names_its_ami(config):
    # Without ImageId, Ray falls back to an Ubuntu 18.04 AMI too old for the project.
    for name, node in config["available_node_types"].items():
        image = node["node_config"].get("ImageId", "")
        assert image and image.lower() != "latest_dlami", name


def test_project_and_studies_are_mounted(config):
    local = config["file_mounts"]["~/gvae"]
    assert (REPO / local).resolve() == REPO  # the whole project, studies/ included
    assert ".gitignore" in config["rsync_filter"]  # keeps .venv/, data/, results/ off the nodes


def test_setup_commands_install_the_project_on_every_node(config):
    prepared = prepare_and_validate(config)
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert "pip install -e ~/gvae" in commands
        assert any(re.search(r"ray\[[^\]]*\btune\b[^\]]*\]==\d", cmd) for cmd in commands)
    assert any("boto3" in cmd for cmd in prepared["head_setup_commands"])


def test_head_start_command_enables_the_dashboard(config):
    starts = [cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd]
    assert len(starts) == 1
    assert "--head" in starts[0]
    assert "--dashboard-host=0.0.0.0" in starts[0]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts[0]
    assert any("--address=$RAY_HEAD_IP:6379" in cmd for cmd in config["worker_start_ray_commands"])
