"""Shared pytest set-up: fixtures live in one module per real component.

`make test` runs the suite in two pytest-xdist workers (`-n 2 --dist loadfile`): a file's tests run
in one worker, so its module fixtures (a trained chain, a sweep) are made once, and each worker
has its own session services (a Ray head, an MLflow server, SeaweedFS). Most tests wait on
process start-up (Ray, Ray Train's workers, jobs) with a core idle: one file in each worker
keeps both cores busy (measured: 55% of 2 cores used by one worker). A third worker gained 20-25 s
on a fresh clone and made timing races likelier (docs/testing.md).
"""

import os
import subprocess
import sys
from pathlib import Path

# Keep every Ray port on loopback (Ray's own single-machine switch), even for
# Ray instances that tests start implicitly through ray.init().
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray's token authentication stays on everywhere (tests.fixtures_services.AUTH_ENV): this process
# reaches the test heads (state API, ray.init) with the token, as every job the tests start does.
os.environ["RAY_AUTH_MODE"] = "token"
# Under several xdist workers, one torch thread per process (this one, the jobs it starts, Ray's
# workers: Ray keeps an OMP_NUM_THREADS it finds set): two workers each running torch on both cores
# spun against each other and took 3x as long side by side as alone.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train's controller polls its workers every 2 s by default, so a fit ends up to 2 s after its
# last step and a killed worker is seen up to 2 s late; the suite runs ~50 fits.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train's PreemptionWatcher (an actor per fit, a process importing Ray Train: ~1 core-second)
# watches for nodes a cloud provider drains; the single-node test heads have none. The multi-node
# cluster (tests/fixtures_cluster.py, the lost-node tests) keeps it, as the jobs on a cluster do.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

pytest_plugins = [
    "tests.fixtures_video",
    "tests.fixtures_s3",
    "tests.fixtures_models",
    "tests.fixtures_services",
]

# The longest files first (pytest --durations, 2 cores): xdist hands out whole files in collection
# order (with --no-loadscope-reorder), each worker taking its next file while its current one still
# has two tests to go, so no worker is left running a long file alone at the end; every file of 3 s
# or more is listed (the rest, quicker, come last in their own order).
SLOWEST_FIRST = [  # seconds per file on a fresh clone, 2026-12-07 (docs/testing.md)
    "test_learning.py",  # 278
    "test_precompute.py",  # 210
    "test_lost_node.py",  # 176
    "test_s3_training.py",  # 170
    "test_train.py",  # 120
    "test_tune.py",  # 106
    "test_demo_pixel.py",  # 101
    "test_tracking_outage.py",  # 77
    "test_demo.py",  # 75
    "test_generate_evaluate.py",  # 53
    "test_retrain.py",  # 40
    "test_evaluation_memory.py",  # 37
    "test_infra.py",  # 33
    "test_train_init.py",  # 30
    "test_metrics.py",  # 28
    "test_model.py",  # 25
    "test_storage.py",  # 24
    "test_video_io.py",  # 17
    "test_lease.py",  # 15
    "test_sampling_speed.py",  # 14
    "test_train_batches.py",  # 12
    "test_evaluation_protocol.py",  # 11
    "test_ddp_stages.py",  # 9
    "test_memory.py",  # 9
    "test_gpu_check.py",  # 6
    "test_i3d_weights.py",  # 6
    "test_cluster.py",  # 6
    "test_ray_auth.py",  # 4
    "test_model_inputs.py",  # 3
]


def pytest_configure(config):
    # The Ray token, once, before any worker starts a head: two heads generating it at the same
    # time on a fresh machine could each start with a token the other then overwrote.
    if not hasattr(config, "workerinput") and not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
            env={**os.environ, "RAY_AUTH_MODE": "token"},
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
