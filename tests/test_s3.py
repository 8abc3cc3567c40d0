"""Studies on S3: a real S3 API server (moto's, with credentials checked) on 127.0.0.1, reached the
way a MinIO or Ceph user reaches theirs: `s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http`
and the AWS_* credential variables on every node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pyarrow as pa
import pytest

from analysis.suggestions import optuna_study
from gvae.cli import main
from gvae.errors import GvaeError
from gvae.study.lease import StudyLease
from gvae.study.results import CURVES, TRIALS, ResultsStore, study_uri
from tests.raycluster import LocalRayCluster, free_port
from tests.test_study import write_study

pytestmark = pytest.mark.slow

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "gvae"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one bucket and one IAM user whose keys it checks."""
    import moto.settings

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    setup = {
        "endpoint_url": f"http://{host}:{port}",
        "region_name": "us-east-1",
        "aws_access_key_id": "setup",
        "aws_secret_access_key": "setup",
    }
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="gvae")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*"}]}
    policy["Statement"][0]["Resource"] = "*"
    iam.put_user_policy(UserName="gvae", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="gvae")["AccessKey"]
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    previous = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on, every request is authenticated
    env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # this process reads the tables back from the server too
    try:
        yield {"endpoint": f"{host}:{port}", "env": env}
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = previous
        server.stop()


def storage(s3: dict, bucket: str = BUCKET) -> str:
    return f"s3://{bucket}/results?endpoint_override={s3['endpoint']}&scheme=http&region=us-east-1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """Ray nodes with the credentials in their environment, as a cluster's nodes would have."""
    ray_cluster = LocalRayCluster(tmp_path_factory.mktemp("ray"))
    ray_cluster.env.update(s3["env"])
    try:
        ray_cluster.start_head(num_cpus=2)
        yield ray_cluster
    finally:
        ray_cluster.stop()


def gvae(cluster: LocalRayCluster, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gvae.cli", *args],
        env={**cluster.env, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def test_an_optuna_study_on_s3_runs_resumes_after_a_kill_and_reports(cluster, s3, tmp_path):
    search = {"optuna": {"trials": 2, "objectives": {"mode_entropy": "max"}}}
    search["optuna"]["space"] = {"lr": {"low": 1e-4, "high": 1e-3, "log": True}}
    study = write_study(
        tmp_path,
        "ons3",
        models=["vae"],
        iterations=1000,  # long enough that the kill lands in the second trial
        eval_every=250,
        concurrency=1,
        search=search,
    )
    uri = storage(s3)
    store = ResultsStore(study_uri(uri, "ons3"))  # the tables, read back from the server
    join = ["--address", cluster.address, "--storage", uri]
    driver = gvae(cluster, "study", "run", str(study), *join)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        trials = store.read(TRIALS)
        if not trials.empty and (trials.status == "finished").any():
            break
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)  # the driver dies, its lease and tables stay on S3
    driver.wait()
    before = store.read(TRIALS)
    finished_before = before[before.status == "finished"].set_index("trial_id")
    assert len(finished_before) == 1

    # Its lease is still on S3, but its pid is gone from this host: the resume takes the study.
    code, output = finish(gvae(cluster, "study", "resume", "ons3", *join))
    assert code == 0, output[-3000:]
    assert "resuming study ons3" in output
    trials, curves = store.read(TRIALS), store.read(CURVES)
    assert len(trials) == 2 and set(trials.status) == {"finished"}
    assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()
    kept = trials.set_index("trial_id").loc[finished_before.index]
    assert (kept.wall_seconds == finished_before.wall_seconds).all()  # not re-run
    # The journal the driver kept on its disk reached S3 with each snapshot: the resume read it
    # back, and Optuna holds each trial once, complete with its value. A suggestion Optuna made
    # after Tune's last saved state (Tune never ran it) is failed, not left running.
    journal = optuna_study(store, "ons3")
    states = [trial.state.name for trial in journal.trials]
    values = sorted(trial.value for trial in journal.trials if trial.state.name == "COMPLETE")
    assert states.count("COMPLETE") == 2 and set(states) <= {"COMPLETE", "FAIL"}, states
    assert values == pytest.approx(sorted(trials.final_mode_entropy))

    report = tmp_path / "report"
    code, output = finish(gvae(cluster, "report", "ons3", "--storage", uri, "--out", str(report)))
    assert code == 0, output[-2000:]
    assert (report / "report.md").read_text().startswith("# Study `ons3`")
    code, output = finish(gvae(cluster, "reproduce", "ons3", "--storage", uri))
    assert code == 0, output[-2000:]
    assert "identical to the recorded trial" in output
    assert len(store.read("reproductions.parquet")) == 1


def test_the_lease_on_s3_keeps_a_second_driver_off_until_it_lapses(s3, monkeypatch):
    monkeypatch.setenv("GVAE_LEASE_SECONDS", "2")  # heartbeats every 0.5 s
    uri = study_uri(storage(s3), "leased")
    first = StudyLease(uri, "leased", log=lambda _: None)
    first.me = replace(first.me, host="node-a")  # a driver on another node
    first.acquire()
    second = StudyLease(uri, "leased", log=lambda _: None)
    refused = r"study: leased is already being run by the driver on host node-a, pid \d+, started "
    with pytest.raises(GvaeError, match=refused):
        second.acquire()
    time.sleep(3)  # longer than the lease: the heartbeats keep it live
    with pytest.raises(GvaeError, match=refused):
        second.acquire()
    first._stop.set()  # the first driver dies: no more heartbeats, no release
    first._thread.join()
    time.sleep(2.5)
    second.acquire()  # lapsed: no --force needed
    assert second.holder().token == second.token
    second.release()
    assert second.holder() is None


@pytest.mark.parametrize(
    "command", [["study", "status", "nos3"], ["study", "resume", "nos3"], ["report", "nos3"]]
)
def test_commands_on_a_study_where_nothing_answers_say_so_in_one_line(
    command, tmp_path, monkeypatch, capsys
):
    # Its requests would each be retried for minutes; a store that never answered is a wrong
    # endpoint or one that is down, told after pyarrow's few attempts.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "any")
    monkeypatch.chdir(tmp_path)
    uri = storage({"endpoint": f"127.0.0.1:{free_port()}"})
    assert main([*command, "--storage", uri]) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1
    assert line.startswith(f"gvae: error: storage: cannot reach {study_uri(uri, 'nos3')}: ")
    assert line.rstrip().endswith("and that the store is running (docs/cluster.md)")
    assert list(tmp_path.iterdir()) == []  # no report folder


@pytest.mark.parametrize("fault", ["wrong-bucket", "bad-credentials", "wrong-endpoint"])
def test_s3_that_cannot_be_used_stops_with_one_line_before_training(cluster, s3, tmp_path, fault):
    study = write_study(tmp_path, "nos3", models=["vae"], search={"grid": {"seed": [0]}})
    bucket = "no-such-bucket" if fault == "wrong-bucket" else BUCKET
    env = {"AWS_SECRET_ACCESS_KEY": "wrong"} if fault == "bad-credentials" else {}
    endpoint = {"endpoint": f"127.0.0.1:{free_port()}"} if fault == "wrong-endpoint" else s3
    uri = storage(endpoint, bucket)
    command = ["study", "run", str(study), "--address", cluster.address, "--storage", uri]
    process = gvae(cluster, *command, env=env)
    code, output = finish(process, timeout=120)
    assert code == 2, output[-2000:]
    lines = output.strip().splitlines()
    assert len(lines) == 1, output[-2000:]  # nothing before it: no Ray, no evaluator, no trial
    if fault == "wrong-endpoint":  # nothing answers there: a few attempts, not minutes
        assert lines[0].startswith(f"gvae: error: storage: cannot reach {study_uri(uri, 'nos3')}")
        assert lines[0].endswith(
            "check endpoint_override and that the store is running (docs/cluster.md)"
        )
        return
    reason = "Bucket 'no-such-bucket' not found" if fault == "wrong-bucket" else "ACCESS_DENIED"
    assert lines[0].startswith(f"gvae: error: storage: cannot use {study_uri(uri, 'nos3')}: ")
    assert reason in lines[0] and lines[0].endswith(
        "check the bucket name, the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and "
        "endpoint_override (docs/cluster.md)"
    )


def test_tables_read_while_the_driver_rewrites_them_on_s3(s3):
    """S3 has no atomic rename: a reader that looked up an object's size may then read a newer,
    differently sized version of it, or find a fragment gone. Reading the table again is safe."""
    import threading

    from gvae.study.results import FragmentedTable

    store = ResultsStore(study_uri(storage(s3), "racing"))
    schema = pa.schema([("trial_id", pa.string()), ("status", pa.string())])
    table = FragmentedTable(store, TRIALS, schema)
    table.open_for_writing()
    stop = threading.Event()
    writes = []

    def rewrite() -> None:  # a trial: its fragment and the schema file keep changing size
        while not stop.is_set():
            n = len(writes)
            table.write_trial("t0", [{"trial_id": "t0", "status": "running" + "." * n}])
            wider = pa.schema([*schema, *([("c", pa.float64())] if n % 2 else [])])
            store.put(f"{TRIALS}/00-schema.parquet", wider.empty_table())
            writes.append(n)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        while len(writes) < 1:
            time.sleep(0.01)
        for _ in range(60):
            trials = store.read(TRIALS)
            assert trials.trial_id.tolist() == ["t0"]
    finally:
        stop.set()
        writer.join()
    assert len(writes) > 20  # the reads really did race many rewrites


@pytest.fixture
def own_s3_process(tmp_path):
    """A moto S3 server in a process of its own, which SIGSTOP freezes as a hung store would."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        keys = {"aws_access_key_id": "any", "aws_secret_access_key": "any"}  # none checked
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # not listening yet
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.3)
        yield server, f"127.0.0.1:{port}"
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()


def test_a_store_that_stalls_is_waited_for_and_one_that_stays_away_stops_the_study_whole(
    own_s3_process, tmp_path, monkeypatch
):
    server, endpoint = own_s3_process
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "any")  # for this process's reads too; the server checks none
    study = write_study(
        tmp_path,
        "stall",
        models=["vae"],
        iterations=1000,
        eval_every=250,
        concurrency=1,
        search={"grid": {"seed": [0, 1]}},
    )
    uri = storage({"endpoint": endpoint})
    where = study_uri(uri, "stall")
    # The driver starts a Ray of its own, whose trials inherit its environment; a heartbeat every
    # 2 s tells a stall within seconds.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["GVAE_LEASE_SECONDS"] = "8"
    store = ResultsStore(where)

    def driver(*args: str, **extra: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "gvae.cli", "study", *args, "--storage", uri]
        return subprocess.Popen(
            command,
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stall_once_this_run_evaluates(evaluations_before: int) -> None:
        deadline = time.monotonic() + 240
        while len(store.read(CURVES)) <= evaluations_before:
            assert time.monotonic() < deadline, "no evaluation"
            time.sleep(0.3)
        server.send_signal(signal.SIGSTOP)

    # Every request given up after its first attempt: the store stays away past it.
    running = driver("run", str(study), GVAE_S3_ATTEMPTS="1")
    stall_once_this_run_evaluates(0)
    code, output = finish(running, timeout=240)
    server.send_signal(signal.SIGCONT)
    assert code == 2, output[-3000:]
    error = output.strip().splitlines()[-1]
    assert error.startswith(f"gvae: error: storage: {where} did not answer through"), error
    assert f"`gvae study resume stall --storage {uri}` continues the study" in error, error
    assert "failed" not in set(store.read(TRIALS).status)  # unfinished, to be resumed

    # Resumed, the store freezes again for 15 s: waited for, said so, and nothing is lost.
    running = driver("resume", "stall")
    stall_once_this_run_evaluates(len(store.read(CURVES)))
    time.sleep(15)
    server.send_signal(signal.SIGCONT)
    code, output = finish(running)
    assert code == 0, output[-3000:]
    assert f"storage: {where} has not answered for 10 s" in output
    assert f"storage: {where} answers again" in output
    assert "Traceback" not in output, output[-3000:]
    trials, curves = store.read(TRIALS), store.read(CURVES)
    assert len(trials) == 2 and set(trials.status) == {"finished"}
    assert len(curves) == 8 and not curves.duplicated(["trial_id", "iteration"]).any()
