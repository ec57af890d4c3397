"""A two-node Ray cluster on this machine, inside a network namespace of its own.

Ray's single-machine switch (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) refuses a second node, and
with the switch at 1 Ray binds its agents, raylet and client server beyond loopback. So both
nodes run inside a namespace with only `lo` up (`ip netns`; the tests run as root): nothing they
open is reachable from outside it, and its ports cannot collide with the host's. The worker
node takes another loopback address (127.0.0.2) so that drivers started in the namespace attach
to the head's raylet, never to the node a test is about to lose.

    cluster = NetnsCluster(head_cpus=2, worker_cpus=2); cluster.start()
    cluster.popen([...])          # a process inside the namespace, with RAY_ADDRESS set
    cluster.lose_worker_node()    # SIGKILL every process of the worker node at once
    cluster.add_worker_node()     # a replacement, as a cloud autoscaler would start
    cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pipelines.training.lease import process_start_time
from tests.fixtures_services import AUTH_ENV, BIN, _descendants, _log_tail, _stop

HEAD_IP, WORKER_IP, GCS_PORT = "127.0.0.1", "127.0.0.2", 6379
NODE_READY_TIMEOUT_S = 90


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


class NetnsCluster:
    def __init__(self, head_cpus: int, worker_cpus: int):
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.name = f"cmdt-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.temp_dir = tempfile.mkdtemp(prefix="rayns-", dir="/tmp")  # short: Ray's unix sockets live below it
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{GCS_PORT}"

    def env(self, **extra) -> dict[str, str]:
        # The switch at 1 is what lets a second node join; inside the namespace it opens nothing outside.
        return {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            **AUTH_ENV,
            "RAY_ADDRESS": self.address,
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",  # off on the single-node test heads (tests/conftest.py)
            # The GCS marks a node dead after 3 failed health checks 1 s apart (Ray's default: 5, 3 s
            # apart): the tests wait for what follows a loss, not for its detection.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            **extra,
        }

    def popen(self, argv: list[str], log: Path, cwd: Path | None = None, **extra_env) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(**extra_env),
                start_new_session=True,
                cwd=cwd,
            )

    def start(self) -> NetnsCluster:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)
        env = self.env()
        env.pop("RAY_ADDRESS")
        subprocess.run(
            [str(BIN / "ray"), "get-auth-token", "--generate"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.head = self._start_node(
            [
                "--head",
                f"--node-ip-address={HEAD_IP}",
                f"--port={GCS_PORT}",
                f"--num-cpus={self.head_cpus}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
            ],
            "head",
        )
        self.add_worker_node()
        return self

    def add_worker_node(self) -> None:
        n = len(self.workers)
        self.workers.append(
            self._start_node(
                [f"--address={self.address}", f"--node-ip-address={WORKER_IP}", f"--num-cpus={self.worker_cpus}"],
                f"worker{n}",
            )
        )

    def _start_node(self, args: list[str], tag: str) -> subprocess.Popen:
        log = Path(self.temp_dir) / f"{tag}.log"
        proc = self.popen([str(BIN / "ray"), "start", "--block", "--num-gpus=0", "--disable-usage-stats", *args], log)
        deadline = time.monotonic() + NODE_READY_TIMEOUT_S
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({tag}) did not come up:\n{_log_tail(str(log))}")
            time.sleep(0.2)
        return proc

    def lose_worker_node(self) -> None:
        """Every process of the live worker node SIGKILLed at once, as when a cloud VM is preempted."""
        proc = self.workers[-1]
        tree = [proc.pid, *_descendants(proc.pid)]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    def stop(self) -> None:
        for proc in [*self.workers, self.head]:
            if proc is not None and proc.poll() is None:
                _stop(proc, timeout_s=5)
        # Whatever is left in the namespace (drivers, workers) goes with it.
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in map(int, pids):
            if process_start_time(pid) is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        subprocess.run(["ip", "netns", "del", self.name], check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def netns_cluster_factory():
    """NetnsCluster(head_cpus, worker_cpus), started; each is stopped and its namespace deleted at the end."""
    if not netns_available():
        pytest.skip("needs root and iproute2 (ip netns) for a two-node cluster on one machine")
    made = []

    def make(head_cpus: int, worker_cpus: int) -> NetnsCluster:
        cluster = NetnsCluster(head_cpus, worker_cpus)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.stop()
