"""The run lease (issue 13, fault 5) on local disk and on S3: held by a live job it refuses a second
one in one line; a holder killed with SIGKILL, or one on a machine that stopped renewing, frees it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pipelines.platform import storage
from pipelines.platform.errors import ConfigError
from pipelines.training import lease
from tests.test_train import ROOT

HOLD = """
import sys, time
from pipelines.training.lease import Lease
Lease(sys.argv[1], "run-a").acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_another_process(run_storage: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, run_storage], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(params=["local", "s3"])
def run_storage(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return f"{request.getfixturevalue('s3_bucket')}/runs"


def test_a_live_holder_refuses_a_second_job_and_a_killed_one_frees_the_run(run_storage):
    holder = hold_in_another_process(run_storage)
    try:
        with pytest.raises(
            ConfigError, match=r"\[run-a\] another job is running this run \(host .*, pid \d+, lease .*lease\.json"
        ):
            lease.Lease(run_storage, "run-a").acquire()
        lease.Lease(run_storage, "run-b").acquire()  # another name is another run
    finally:
        holder.kill()  # SIGKILL: the lease stays behind, its holder is gone
        holder.wait()
    start = time.monotonic()
    with lease.Lease(run_storage, "run-a"):
        assert time.monotonic() - start < 10  # taken over at once, not after the TTL
    assert not storage.exists(storage.join(run_storage, "run-a", lease.LEASE))  # released at the end


def test_a_holder_on_another_machine_holds_until_its_renewals_stop(tmp_path):
    uri = storage.join(str(tmp_path), "run-a", lease.LEASE)
    other = {"host": "node-that-is-not-this-one", "pid": 1, "started": "1"}
    storage.write_text(uri, json.dumps({**other, "renewed": time.time() - 5}))
    with pytest.raises(ConfigError, match="host node-that-is-not-this-one, pid 1"):
        lease.Lease(str(tmp_path), "run-a").acquire()
    storage.write_text(uri, json.dumps({**other, "renewed": time.time() - lease.TTL_S - 1}))
    with lease.Lease(str(tmp_path), "run-a") as held:
        assert json.loads(storage.read_text(uri))["pid"] == held.me["pid"]
