"""Everything Ray: data (precompute), training, sweeps, tracking, generation, evaluation.

Layers, each sub-package importing only those below it (tests/test_layers.py holds them to
the `Imports:` line of each sub-package's docstring):

    demo, retrain      workflows over every stage (the demo; scheduled retraining)
    training | evaluation   Ray Train stages and Ray Tune sweeps | generation and judging
    data               videos -> clips -> latents in Parquet (Ray Data)
    platform           storage, MLflow, the Ray cluster, model folders, flags, errors
    cmd_model          (beside pipelines) the model itself: torch and diffusers, no Ray

jobs/ (one file per `ray job submit` entrypoint) sits on top of all of them.

Ray reads its environment when it is imported; every job imports this package before Ray, so
these settings hold for any Ray it starts or joins (the one place they are set):
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a Ray started here keeps every port on 127.0.0.1.
- RAY_AUTH_MODE=token when a Ray token is at hand and no mode is set. Ray 2.60 turns token
  authentication on for a new head whenever ~/.ray/auth_token exists, but a driver given an
  address (RAY_ADDRESS) sends the token only in token mode: without this, `python jobs/...`
  against such a head fails with "Missing authentication token". An explicit mode is kept.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
if not os.environ.get("RAY_AUTH_MODE") and (
    os.environ.get("RAY_AUTH_TOKEN")
    or os.path.isfile(os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token"))
):
    os.environ["RAY_AUTH_MODE"] = "token"
