"""A real two-node Ray cluster on this machine: a study spread over both nodes, and a Ray Job."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from tests.raycluster import RAY, LocalRayCluster

pytestmark = pytest.mark.slow

STUDY = {
    "name": "spread",
    "dataset": "mnist5k",
    "models": ["gan", "vae"],
    "iterations": 40,
    "eval_every": 20,
    "fixed": {"batch_size": 16, "eval_samples": 300},
    "search": {"grid": {"seed": [0, 1]}},
    "resources": {"cpus": 1},
}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    cluster = LocalRayCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.start_head(num_cpus=1, dashboard=True)
        cluster.add_worker(num_cpus=1)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()


def test_study_trials_run_on_both_nodes(two_nodes, tmp_path):
    study = tmp_path / "spread.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    command = [sys.executable, "-m", "gvae.cli", "study", "run", str(study)]
    command += ["--address", two_nodes.address, "--storage", str(tmp_path / "r")]
    out = subprocess.run(command, env=two_nodes.env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    trials = pd.read_parquet(tmp_path / "r" / "spread" / "trials.parquet")
    assert len(trials) == 4 and set(trials.status) == {"finished"}
    assert trials.node_id.nunique() == 2, trials[["trial_id", "node_id"]]


def test_ray_job_runs_a_study_to_completion(two_nodes, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "spread.yaml").write_text(yaml.safe_dump({**STUDY, "name": "job"}))
    storage = tmp_path / "r"
    dashboard = f"http://127.0.0.1:{two_nodes.dashboard_port}"
    command = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(job_dir)]
    command += ["--", "gvae", "study", "run", "spread.yaml", "--storage", str(storage)]
    for _ in range(40):  # the head's job agent comes up a while after the head itself
        out = subprocess.run(
            command, env=two_nodes.env, capture_output=True, text=True, timeout=600
        )
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
    assert "succeeded" in out.stdout
    trials = pd.read_parquet(storage / "job" / "trials.parquet")
    assert len(trials) == 4 and set(trials.status) == {"finished"}


@pytest.fixture
def apart(tmp_path_factory):
    """A head that runs no trial and a worker node that does not share the head's disk: its
    own empty filesystem is mounted over the folder the study is stored in."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to give the worker node a folder of its own")
    storage = tmp_path_factory.mktemp("storage")
    cluster = LocalRayCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.start_head(num_cpus=0)
        worker = f"{RAY} start --address={cluster.address} --num-cpus=2 --num-gpus=0"
        mounted = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs tmpfs {storage} && exec {worker}"],
            env=cluster.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if mounted.returncode != 0:
            pytest.skip(f"cannot give a node a folder of its own here: {mounted.stderr[-300:]}")
        cluster.wait_for_nodes(2)
        yield cluster, storage
    finally:
        cluster.stop()


def test_a_local_storage_a_node_does_not_share_stops_the_study_with_the_fix(apart, tmp_path):
    cluster, storage = apart
    study = tmp_path / "spread.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    command = [sys.executable, "-m", "gvae.cli", "study", "run", str(study)]
    command += ["--address", cluster.address, "--storage", str(storage)]
    out = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"gvae: error: storage: {storage / 'spread'} is not shared with the node at "
        f"{cluster.address.split(':')[0]}, where a trial ran; a study on a Ray cluster needs "
        "storage every node reaches: pass --storage s3://BUCKET/PATH, or a folder every node "
        "mounts"
    )
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    trials = pd.read_parquet(storage / "spread" / "trials.parquet")
    assert "failed" not in set(trials.status)  # nothing recorded failed for it
