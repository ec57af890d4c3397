"""One job per run at a time: a lease file beside the run's checkpoints (issue 13, fault 5).

    <storage>/<name>/lease.json  {"host", "pid", "started", "renewed"}

A training driver takes the lease before Ray starts and renews it every RENEW_S until the job
ends; a second job with the same --name and --storage finds it held and refuses in one line, so
two Ray Train runs never write one run's checkpoints at once. A lease is free when it is absent,
when its holder is a process of this machine that no longer runs (a driver killed with SIGKILL:
the next run starts at once), or when it was last renewed more than TTL_S ago (a holder on a
machine that is gone). Storage is local or S3 alike; S3 has no create-if-absent in s3fs, so a
taker writes its lease and reads it back after SETTLE_S: of two jobs started in the same instant,
the one whose write landed last keeps it and the other refuses.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import psutil

from pipelines.platform import storage
from pipelines.platform.errors import ConfigError

LEASE = "lease.json"
RENEW_S = 15.0
TTL_S = 90.0  # six missed renewals: a slow store or a paused driver does not lose the lease
SETTLE_S = 1.0


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (psutil); with the pid it names one process, never one that reused the number."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):  # gone, or not a pid at all
        return None


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start_time(os.getpid())}


def _is_mine(held: dict, me: dict) -> bool:
    return all(held.get(k) == me[k] for k in ("host", "pid", "started"))


def _is_live(held: dict, now: float) -> bool:
    if held.get("host") == socket.gethostname():
        # Same machine: the holder runs or it does not (a reused pid has another start time).
        return process_start_time(int(held.get("pid", -1))) == held.get("started")
    return now - float(held.get("renewed", 0)) < TTL_S


def _read(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn lease holds nothing


class Lease:
    """The lease on <storage>/<name>; use as a context manager around the job."""

    def __init__(self, run_storage: str, name: str):
        self.uri = storage.join(run_storage, name, LEASE)
        self.name = name
        self.me = _me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        storage.write_text(self.uri, json.dumps({**self.me, "renewed": time.time()}))

    def _refuse(self, held: dict) -> ConfigError:
        age = time.time() - float(held.get("renewed", 0))
        return ConfigError(
            f"[{self.name}] another job is running this run (host {held.get('host')}, pid {held.get('pid')}, "
            f"lease {self.uri} renewed {age:.0f} s ago): wait for it to end, or use another --name"
        )

    def acquire(self) -> None:
        held = _read(self.uri)
        if held and not _is_mine(held, self.me) and _is_live(held, time.time()):
            raise self._refuse(held)
        self._write()  # local folders are made as needed; S3 has none
        time.sleep(SETTLE_S)
        held = _read(self.uri)
        if held and not _is_mine(held, self.me):
            raise self._refuse(held)
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a store hiccup: the next renewal tries again, the TTL allows for it
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = _read(self.uri)
        if held and _is_mine(held, self.me):
            storage.remove(self.uri)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
