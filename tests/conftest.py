"""Shared pytest set-up: fixtures live in one module per real component."""

import os

# Keep every Ray port on loopback (Ray's own single-machine switch), even for
# Ray instances that tests start implicitly through ray.init().
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray's token authentication stays on everywhere (tests.fixtures_services.AUTH_ENV): this process
# reaches the test heads (state API, ray.init) with the token, as every job the tests start does.
os.environ["RAY_AUTH_MODE"] = "token"

pytest_plugins = [
    "tests.fixtures_video",
    "tests.fixtures_s3",
    "tests.fixtures_models",
    "tests.fixtures_services",
]
