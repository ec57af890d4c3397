"""Real services on loopback for the tests: an MLflow tracking server and a Ray head node.

Fixtures (session scope: each starts once per test run and is stopped at the end):
  mlflow_server -> MLflowServer(url, pid, root): `mlflow server --workers 1` with a SQLite
                   store and a local artifact folder; clients set MLFLOW_TRACKING_URI=url
  ray_head      -> RayHead(address, dashboard_url, pid, temp_dir, ports): `ray start --head
                   --block`; ray.init(address=...) for drivers, `ray job submit --address
                   dashboard_url` for jobs
`start_ray_head(num_cpus=...)` starts another head with other settings (stop it with .stop()).
Every listener is checked to be on 127.0.0.1 (read from /proc, as `ss -ltnp` does).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.training.lease import process_start_time
from tests.fixtures_s3 import _free_ports, _listening_addresses, _log_tail

BIN = Path(sys.executable).parent
MLFLOW_READY_TIMEOUT_S = 90
RAY_READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
RAY_STOP_GRACE_S = 5
# Logical CPUs of the test head. Two training workers reserve 2, and Ray Data's readers and
# decoders need CPUs besides them or they never start; the machine has 2 cores, so the head
# advertises more than it has (the test workloads are tiny).
TEST_HEAD_CPUS = 4
# Ray 2.60 token authentication, as users get it: `ray start --head` turns it on whenever
# ~/.ray/auth_token exists (any earlier local ray.init() writes it), and the CLI and drivers given an
# address send the token only with RAY_AUTH_MODE=token. The test heads require the token, and every
# client the tests start (ray job submit, jobs, this process: conftest.py) sends it.
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")  # IPv4, IPv4-mapped IPv6 and IPv6 loopback


# ---------------------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def _tree_listeners(pid: int) -> list[tuple[str, int]]:
    found = []
    for p in [pid, *_descendants(pid)]:
        found.extend(_listening_addresses(p))
    return sorted(set(found))


def _stop(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process (it stops what it started), then SIGKILL whatever of its tree is left.

    The tree is recorded before the stop; a pid is killed only if it still names the same
    process (same start time), never a process that reused the number.
    """
    tree = [(pid, process_start_time(pid)) for pid in _descendants(proc.pid)]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid, started in tree:
        if started is not None and process_start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_until_http_ok(proc: subprocess.Popen, url: str, timeout_s: float, headers: dict | None = None) -> str | None:
    """Poll `url` until it answers 200; returns None, or what went wrong (the process exited, or the deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
                if response.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(0.5)  # poll interval
    return f"not ready after {timeout_s}s"


def _assert_loopback(name: str, pid: int, must_include: list[int]) -> list[tuple[str, int]]:
    listening = _tree_listeners(pid)
    ports = {port for _, port in listening}
    missing = [p for p in must_include if p not in ports]
    assert not missing, f"{name}: expected listeners on ports {missing}, found {listening}"
    exposed = [a for a in listening if a[0] not in LOOPBACK]
    assert not exposed, f"{name} listens off loopback on {exposed}; all listeners: {listening}"
    return listening


# ---------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------


@dataclass
class MLflowServer:
    url: str
    pid: int
    root: Path
    log_path: str = ""


def start_mlflow_server(
    root: Path, port: int | None = None, artifacts: str | None = None, env: dict[str, str] | None = None
) -> tuple[MLflowServer, subprocess.Popen]:
    """`mlflow server` on 127.0.0.1 with its SQLite store and artifacts under `root`; started again
    with the same root and port it is the same server (its runs, its URL).

    artifacts: where the server keeps artifacts instead (e.g. s3://bucket/mlflow, with the S3
    endpoint and keys in `env`)."""
    port = port or _free_ports(1)[0]
    log_path = str(root / "server.log")
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",  # one process: the tests are its only client
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        # Proxied artifacts: clients upload over HTTP, as Ray workers on other nodes would.
        "--artifacts-destination",
        artifacts or str(root / "artifacts"),
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={
                **os.environ,
                **(env or {}),
                "MLFLOW_TRACKING_URI": "",
                # No server-side job runner (7 huey consumers): the tests never use it, and
                # its start-up took ~18 s of CPU while the first training job started.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    problem = _wait_until_http_ok(proc, f"{url}/health", MLFLOW_READY_TIMEOUT_S)
    if problem:
        _stop(proc)
        pytest.fail(f"mlflow server {problem}:\n{_log_tail(log_path)}")
    _assert_loopback("mlflow server", proc.pid, [port])
    return MLflowServer(url=url, pid=proc.pid, root=root, log_path=log_path), proc


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    _stop(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def mlflow_env(mlflow_server, monkeypatch):
    """MLFLOW_TRACKING_URI of this process (and of jobs it starts) points at the test server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return mlflow_server.url


# ---------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------


@dataclass
class RayHead:
    address: str  # GCS host:port, for ray.init(address=...) and RAY_ADDRESS
    dashboard_url: str  # http://127.0.0.1:PORT, for `ray job submit --address`
    pid: int  # the `ray start --block` process; everything the head runs is below it
    temp_dir: str
    ports: dict = field(default_factory=dict)
    log_path: str = ""
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """Variables for a process that uses this head (a job's ray.init(), `ray job submit`)."""
        return {"RAY_ADDRESS": self.address, **AUTH_ENV}

    def stop(self) -> None:
        """Stop this head and everything it started (never another Ray on the machine)."""
        if self._proc is not None:
            # Ray's graceful stop waits on every daemon in turn (~30 s); the tests need none of it.
            _stop(self._proc, timeout_s=RAY_STOP_GRACE_S)
            self._proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


WORKER_PORT_COUNT = 200


def _free_port_range(count: int) -> int:
    """The first of `count` consecutive free loopback ports below the kernel's ephemeral range.

    The other ports come from the ephemeral range (bind to port 0), so a range below it can never
    overlap them (a range next to one free ephemeral port once held the client server's port,
    and Ray refused to start); starting at random keeps two heads' ranges apart.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(50):
        start = rng.randrange(20000, ephemeral_low - count)
        if all(_port_is_free(p) for p in range(start, start + count)):
            return start
    raise RuntimeError(f"no {count} consecutive free ports below {ephemeral_low}")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_ray_head(
    num_cpus: int = TEST_HEAD_CPUS, log_dir: str | None = None, *, nodes_may_join: bool = False, env: dict | None = None
) -> RayHead:
    """`ray start --head --block` on loopback with free ports and its own temp dir.

    nodes_may_join: Ray's single-machine switch off, so that other nodes can join; Ray then binds
    beyond loopback, so only inside a network namespace of its own (tests/cluster_rehearsal.py).
    env: more variables for the head and everything it starts (job drivers included)."""
    # Short path: Ray puts unix sockets under it, and those are limited to ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    names = [
        "gcs",
        "dashboard",
        "client",
        "node_manager",
        "object_manager",
        "metrics",
        "agent_http",
        "agent_grpc",
        "runtime_env_agent",
        "dashboard_grpc",
    ]
    ports = dict(zip(names, _free_ports(len(names))))
    worker_ports = _free_port_range(WORKER_PORT_COUNT)
    log_path = os.path.join(log_dir or temp_dir, "ray-start.log")
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={ports['gcs']}",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        # Worker processes take ports from a small range near a free one, not Ray's 10002-19999 default.
        f"--min-worker-port={worker_ports}",
        f"--max-worker-port={worker_ports + WORKER_PORT_COUNT - 1}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--include-dashboard=true",
    ]
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if nodes_may_join else "0",
        **AUTH_ENV,
        **(env or {}),
    }
    # The token in ~/.ray/auth_token, made once as a user would (`ray get-auth-token --generate`);
    # it is printed on stdout, which goes nowhere here.
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=RAY_READY_TIMEOUT_S,
    )
    # `python` in a submitted job's entrypoint is this virtualenv's interpreter.
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    head = RayHead(
        address=f"127.0.0.1:{ports['gcs']}",
        dashboard_url=f"http://127.0.0.1:{ports['dashboard']}",
        pid=proc.pid,
        temp_dir=temp_dir,
        ports=ports,
        log_path=log_path,
        _proc=proc,
    )
    try:
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        problem = _wait_until_http_ok(
            proc, f"{head.dashboard_url}/api/version", RAY_READY_TIMEOUT_S, headers={"Authorization": f"Bearer {token}"}
        )
        if problem:
            raise RuntimeError(f"ray start {problem}:\n{_log_tail(log_path)}")
        if not nodes_may_join:
            _assert_loopback("ray head", proc.pid, [ports["gcs"], ports["dashboard"]])
    except BaseException:
        log.close()
        head.stop()
        raise
    log.close()
    return head


@pytest.fixture(scope="session")
def ray_head():
    head = start_ray_head()
    try:
        yield head
    finally:
        head.stop()
