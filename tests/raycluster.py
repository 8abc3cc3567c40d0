"""A real Ray cluster on this machine for tests: a head and optional worker nodes via `ray start`.

Stops only the processes it started: those whose command line names its temp folder or its
head's address, and their descendants.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRayCluster:
    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = ""
        # Head, workers and drivers must agree on the auth mode and token to join one cluster.
        # The token travels in the environment, where Ray looks first: ~/.ray/auth_token is
        # shared by every Ray on the machine and would outlive the tests.
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": uuid.uuid4().hex,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        # As with an activated virtualenv: Ray Jobs find `gvae` on the nodes' PATH.
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

    def start_head(self, num_cpus: int = 1, dashboard: bool = False) -> str:
        command = [
            RAY,
            "start",
            "--head",
            f"--port={self.port}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if dashboard:
            command += ["--include-dashboard=true", f"--dashboard-port={self.dashboard_port}"]
        else:
            command += ["--include-dashboard=false"]
        self._run(command)
        self.address = f"{self._node_ip()}:{self.port}"
        return self.address

    def add_worker(self, num_cpus: int = 1) -> None:
        self._run(
            [RAY, "start", f"--address={self.address}", f"--num-cpus={num_cpus}", "--num-gpus=0"]
        )

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = (
                f"import ray; ray.init(address='{self.address}', logging_level='ERROR');"
                "print(sum(n['Alive'] for n in ray.nodes()))"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], env=self.env, capture_output=True, text=True
            )
            if out.stdout.strip().isdigit() and int(out.stdout.strip()) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"Ray cluster did not reach {count} nodes")

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: its Ray daemons and their descendants."""
        markers = [str(self.temp_dir), f":{self.port}"]
        roots = [p for p in psutil.process_iter(["cmdline"]) if _matches(p, markers)]
        return list({p.pid: p for root in roots for p in [root, *_descendants(root)]}.values())

    def trial_processes(self) -> list[psutil.Process]:
        """The worker processes running Tune trials (Ray names them after the actor class)."""
        return [p for p in self.processes() if "ImplicitFunc" in " ".join(_cmdline(p))]

    def stop(self) -> None:
        family = self.processes()
        for process in family:
            _signal(process, "terminate")
        # Ray's agents ignore SIGTERM: a short grace, then they are killed.
        _, alive = psutil.wait_procs(family, timeout=3)
        for process in alive:
            _signal(process, "kill")

    def _run(self, command: list[str]) -> None:
        out = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{out.stdout}\n{out.stderr}")

    def _node_ip(self) -> str:
        import ray._private.services as services

        return services.get_node_ip_address()


def _matches(process: psutil.Process, markers: list[str]) -> bool:
    try:
        cmdline = " ".join(process.info["cmdline"] or [])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return process.pid != os.getpid() and any(marker in cmdline for marker in markers)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(process: psutil.Process, how: str) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        getattr(process, how)()
