"""pipelines.platform.cluster.ensure_ray when it starts a local Ray: its workers find their own cluster.

Ray Train's PlacementGroupCleaner asks the state API whether the controller is alive; without
RAY_ADDRESS the state API picks the last `ray start` head of the machine (/tmp/ray/
ray_current_cluster), which on a laptop is often stale (every fit then stalled 12 s at its end)
or another cluster (which would not know the controller and so remove the fit's workers).
"""

import os

import pytest


@pytest.fixture
def local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from pipelines.platform.cluster import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


def test_a_local_rays_workers_look_up_their_own_cluster(local_ray):
    ray = local_ray
    from ray.train.v2._internal.state.util import is_actor_alive

    @ray.remote(num_cpus=0)
    class Probe:
        def lookup(self, actor_id: str):
            return os.environ.get("RAY_ADDRESS"), is_actor_alive(actor_id=actor_id, timeout=10)

    probe = Probe.remote()
    address, alive = ray.get(probe.lookup.remote(probe._actor_id.hex()), timeout=60)
    assert address == ray.get_runtime_context().gcs_address
    assert alive  # the state API of this cluster knows the actor
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # the port choice does not leak into later Rays
