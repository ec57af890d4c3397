"""Ray's token authentication stays on: the test head requires the token, as a user's head does.

Ray 2.60 turns token auth on for `ray start --head` whenever ~/.ray/auth_token exists; the CLI and
a driver given an address send the token only with RAY_AUTH_MODE=token. A client without it is
refused; `ray job` in token mode and a plain job script (importing `pipelines` sets the mode when
a token is at hand) both get in.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.fixtures_services import BIN
from tests.test_train import ROOT


def client_env(ray_head, **changes) -> dict:
    env = {**os.environ, **ray_head.env(), **changes}
    return {k: v for k, v in env.items() if v is not None}


def test_head_refuses_a_client_without_the_token(ray_head):
    refused = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", ray_head.dashboard_url],
        env=client_env(ray_head, RAY_AUTH_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "authentication" in (refused.stdout + refused.stderr).lower()
    allowed = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", ray_head.dashboard_url],
        env=client_env(ray_head),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_a_job_script_sends_the_token_without_being_told(ray_head):
    """RAY_ADDRESS set, RAY_AUTH_MODE unset, ~/.ray/auth_token present: what a user's shell has."""
    code = (
        "import pipelines, ray; from pipelines.platform.cluster import ensure_ray; ensure_ray(); "
        "print('cpus', int(ray.cluster_resources()['CPU']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=client_env(ray_head, RAY_AUTH_MODE=None),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cpus " in done.stdout
