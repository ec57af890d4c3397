"""Joining or starting Ray: the one way every job does it; Ray datasets of tables the driver holds.

Importing `pipelines` sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (pipelines/__init__.py), which Ray
reads when it is imported: a Ray started here keeps every port on 127.0.0.1.
"""

from __future__ import annotations

import json
import math
import os
import socket

from pipelines.platform import storage


def ensure_ray(env: dict[str, str] | None = None, reserve_cpus: float = 0.0) -> None:
    """Connect to RAY_ADDRESS (as `ray job submit` sets it), or start a local Ray on loopback.

    env: variables every Ray worker gets (the MLflow server, S3 settings; the S3 ones are always
    added). reserve_cpus: CPUs the job's training workers reserve; a local Ray advertises at least
    that many plus one, since Ray Data's readers and decoders need a CPU of their own or never
    start (a laptop with fewer cores shares them: reading latents is light).
    """
    import ray

    if ray.is_initialized():
        return
    env = {**storage.s3_env_vars(), **(env or {})}
    if os.environ.get("RAY_ADDRESS"):
        # RAY_ADDRESS: Ray Train's helper actors look the cluster up by it, and fail when several
        # Ray instances run on one machine. Under `ray job submit` Ray merges these env_vars with
        # the job's and refuses any key the job already sets (even to the same value): those keys
        # are left out here (Train workers get the full set through RunConfig.worker_runtime_env).
        env = {**env, "RAY_ADDRESS": os.environ["RAY_ADDRESS"]}
        taken = submitted_job_env_vars()
        ray.init(runtime_env={"env_vars": {k: v for k, v in env.items() if k not in taken}})
        return
    needed = math.ceil(reserve_cpus) + 1
    # A local Ray on a port chosen here, and RAY_ADDRESS naming it for every worker: Ray Train's
    # helpers (its PlacementGroupCleaner) find "their" cluster through the state API, which
    # without RAY_ADDRESS reads /tmp/ray/ray_current_cluster, the last `ray start` head on this
    # machine: a stale one stalled every fit's shutdown for 12 s, a live one is another cluster.
    address = f"127.0.0.1:{free_port()}"
    os.environ[GCS_PORT_VARIABLE] = address.rsplit(":", 1)[1]
    try:
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, needed),
            runtime_env={"env_vars": {**env, "RAY_ADDRESS": address, **LOCAL_RAY_ENV}},
        )
    finally:
        del os.environ[GCS_PORT_VARIABLE]


def resources_now() -> tuple[int, float]:
    """(GPUs, CPUs) the cluster has up right now. A cluster that scales from zero (the shipped ones:
    worker groups with minReplicas 0, a head with num-cpus 0) may have none when a job starts, so
    the jobs take their sizes from flags there; the autoscaler then adds nodes for what they ask."""
    import ray

    total = ray.cluster_resources()
    return int(total.get("GPU", 0)), float(total.get("CPU", 0))


def nothing_up(resource: str, flag: str, who: str = "the cluster") -> str:
    """The one-line refusal of a job that would size itself from a cluster with nothing up."""
    return f"{who} has no {resource} up yet (it scales from zero): pass {flag}; the autoscaler adds the nodes"


GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"  # read by ray.init when it starts a local GCS
# A local Ray is one node on this machine, which nothing drains: Ray Train's preemption watcher
# (an actor per fit, polling for drained nodes) has nothing to watch there, and Ray 2.60 creates it
# with max_restarts=-1 and its arguments in the object store, so every fit logged an error-level
# core_worker.cc line about it (ray-project/ray#53727). A cluster (RAY_ADDRESS) keeps the watcher.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def free_port() -> int:
    """A loopback port free now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submitted_job_env_vars() -> dict:
    """env_vars of the runtime env that `ray job submit` gave this driver ({} for a plain run)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


def dataset_of_tables(tables: list):
    """A Ray dataset of Arrow tables the driver already holds, one block each.

    `ray.data.from_arrow` works out each table's row count and schema in a remote task per table:
    Ray starts up to a worker process per CPU for them (about a core-second each, most left idle),
    on every job. `from_blocks` reads the same from the tables here. Measured on a 10-step motion
    job with one worker: 4.3 core-seconds and 2.2 s less (docs/performance.md).
    """
    import ray

    return ray.data.from_blocks(tables)
