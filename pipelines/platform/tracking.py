"""MLflow for every job: where runs go, one run per job, and what a run holds.

- The tracking URI comes from MLFLOW_TRACKING_URI, else a local SQLite file `mlflow.db`
  (MLflow 3 no longer accepts a bare ./mlruns folder). A relative SQLite path is made
  absolute here, in the driver, so Ray workers with another working directory write the
  same file; an http(s) server is checked for reachability in seconds, before any Ray work.
- The experiment name is always explicit (inside Ray Tune it would otherwise default to the
  trial name, ray#36257 / #45456).
- A run is found again by its identity tags (job name + storage), so a job restarted with the
  same --name continues its run instead of opening a second one; params are logged once and a
  changed flag on restart becomes a `resumed.<param>` tag (MLflow refuses to change a param,
  ray#20473).
- Metrics and artifacts go out from a background thread (a training step never waits on the
  server) and survive the server going away: they wait in order until it is back, for up to
  CMD_TRACKING_OUTAGE_S (10 min); what is still unsent then is kept as files and the job says
  where. Artifacts are model folders in save_pretrained layout, images and videos (mp4 + gif:
  the UI previews gifs).

Credentials (MLFLOW_TRACKING_USERNAME / PASSWORD / TOKEN, user:password@ in the URI) are
passed to workers through the runtime env and never printed: messages show `public_uri`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Variables a worker needs to reach the same server the driver checked.
FORWARDED_ENV = (
    TRACKING_ENV,
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "CMD_TRACKING_OUTAGE_S",
)
REACHABILITY_TIMEOUT_S = 3.0  # a dead server must fail the job in seconds, not after MLflow's retries
NAME_TAG, STORAGE_TAG, STAGE_TAG = "cmd.name", "cmd.storage", "cmd.stage"
# Per-step metrics go out in one request per this many steps: a request per step costs a tiny
# model more time than the step itself (benchmarks/train.py).
METRIC_STEPS_PER_REQUEST = 10
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
PARAMS_PER_REQUEST = 100  # MLflow's limit on params in one log_batch
# A tracking server that goes away (a restart, a redeploy) is waited for this long before a job
# gives up on it; training itself goes on meanwhile.
OUTAGE_ENV, DEFAULT_OUTAGE_S = "CMD_TRACKING_OUTAGE_S", 600.0
RETRY_PAUSE_S = 2.0
log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """MLflow cannot be used (one readable line, no credentials)."""


# ---------------------------------------------------------------------------------------
# Where runs go
# ---------------------------------------------------------------------------------------


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI or the local default, with a relative SQLite path made absolute."""
    uri = os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def public_uri(uri: str) -> str:
    """The URI without any user:password@ part, for messages."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=host))
    return uri


def check_reachable(uri: str, timeout_s: float = REACHABILITY_TIMEOUT_S) -> None:
    """Raise TrackingError within `timeout_s` if an http(s) tracking server does not answer /health."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        # /health needs no credentials; the URL is opened without any user:password part.
        with urllib.request.urlopen(public_uri(url), timeout=timeout_s) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
    raise TrackingError(f"cannot reach MLflow tracking server {public_uri(uri)} (set {TRACKING_ENV}): {reason}")


def env_vars(uri: str) -> dict[str, str]:
    """MLflow variables for Ray workers' runtime_env: the resolved URI plus any credentials set here."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env[TRACKING_ENV] = uri
    return env


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


# ---------------------------------------------------------------------------------------
# One run per job
# ---------------------------------------------------------------------------------------


def flatten(prefix: str, value) -> dict[str, str]:
    """Nested dataclasses / dicts -> {'prefix.a.b': 'str value'} for MLflow params."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return {prefix: text[:MAX_PARAM_CHARS]}


def open_run(
    uri: str,
    experiment: str,
    name: str,
    storage: str,
    stage: str,
    params: dict[str, str],
    tags: dict[str, str] | None = None,
) -> str:
    """The id of this job's run: the existing one with the same name and storage, or a new one.

    Params go in once; on a resumed run, a param whose value changed (e.g. a larger --max-steps)
    is recorded as tag `resumed.<param>` since MLflow params cannot change. `tags` go on a new
    run (e.g. mlflow.parentRunId to nest a Tune trial under its sweep).
    """
    from mlflow.entities import RunTag

    mlflow_client = client(uri)
    experiment_id = _experiment_id(mlflow_client, experiment)
    found = mlflow_client.search_runs(
        [experiment_id],
        filter_string=tag_filter(**{NAME_TAG: name, STORAGE_TAG: storage}),
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        run = found[0]
        mlflow_client.update_run(run.info.run_id, status="RUNNING")
        logged = run.data.params
        new = {k: v for k, v in params.items() if k not in logged}
        changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in logged and logged[k] != v]
        _log_params(mlflow_client, run.info.run_id, new)
        if changed:
            mlflow_client.log_batch(run.info.run_id, tags=changed)
        return run.info.run_id
    identity = {NAME_TAG: name, STORAGE_TAG: storage, STAGE_TAG: stage}
    run = mlflow_client.create_run(experiment_id, run_name=name, tags={**(tags or {}), **identity})
    _log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id


def quote(text: str) -> str:
    """A value for an MLflow filter string, between single quotes (names and paths may hold ' or \\)."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def tag_filter(**tags: str) -> str:
    r"""`tags.\`k\` = 'v' and ...`, every value quoted: the one way this project builds run filters."""
    return " and ".join(f"tags.`{k}` = '{quote(str(v))}'" for k, v in tags.items())


def ensure_registered_model(mlflow_client, name: str, description: str) -> None:
    """Create the registered model `name` unless it exists."""
    if not mlflow_client.search_registered_models(filter_string=f"name = '{quote(name)}'"):
        mlflow_client.create_registered_model(name, description=description)


# MLflow 3's own label for an experiment's kind: these are model-training experiments, not GenAI
# ones. (MLflow 3.17's UI still opens on its GenAI view unless the URL says
# ?workflowType=machine_learning, which is what the demo prints.)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created (artifacts under `artifact_location` when given) if missing."""
    return _experiment_id(client(uri), name, artifact_location)


def _experiment_id(mlflow_client, name: str, artifact_location: str | None = None) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or choose another --experiment")
        return experiment.experiment_id
    return mlflow_client.create_experiment(
        name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


def _log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), PARAMS_PER_REQUEST):
        mlflow_client.log_batch(run_id, params=items[i : i + PARAMS_PER_REQUEST])


def log_data_version(uri: str, run_id: str, version: dict[str, str]) -> None:
    """Data identity (e.g. latents path + autoencoder digest) as tags, so runs can be filtered by it."""
    from mlflow.entities import RunTag

    client(uri).log_batch(run_id, tags=[RunTag(f"data.{k}", str(v)) for k, v in version.items()])


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ended, waiting out a tracking server that is away (up to outage_s())."""
    if not retry_until(
        lambda: client(uri).set_terminated(run_id, status=status),
        time.monotonic() + outage_s(),
        f"ending run {run_id} at {public_uri(uri)}",
    ):
        raise TrackingError(
            f"the tracking server at {public_uri(uri)} did not come back within {outage_s():.0f} s "
            f"({OUTAGE_ENV}): run {run_id} could not be marked {status}"
        )


def outage_s() -> float:
    """How long a job waits for a tracking server that went away (CMD_TRACKING_OUTAGE_S, default 10 min)."""
    return float(os.environ.get(OUTAGE_ENV) or DEFAULT_OUTAGE_S)


def retry_until(call, deadline: float, what: str) -> bool:
    """call() until it succeeds (True) or the monotonic deadline passes (False); one warning per outage."""
    warned = False
    while True:
        try:
            call()
            if warned:
                log.warning("tracking server reachable again: %s", what)
            return True
        except Exception as exc:  # MLflow raises MlflowException, requests' and urllib3's errors alike
            if refused(exc):
                raise
            if time.monotonic() >= deadline:
                return False
            if not warned:
                log.warning(
                    "tracking server unreachable (%s) while %s; retrying until it is back", type(exc).__name__, what
                )
                warned = True
            time.sleep(RETRY_PAUSE_S)


def refused(exc: Exception) -> bool:
    """An answer from the server saying no (bad value, missing run, no permission): not an outage."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in REFUSALS


REFUSALS = {
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


# ---------------------------------------------------------------------------------------
# Logging from the training process (rank 0)
# ---------------------------------------------------------------------------------------


class RunLogger:
    """Metrics and artifacts into one existing run, through an explicit client (no global run state).

    Everything goes out in order from one background thread, so a training step never waits on
    the server, and a server that goes away loses nothing: what it misses stays queued and is sent
    when it is back. flush() waits for the queue up to outage_s(); what is still unsent then is
    written to a folder (metrics.jsonl, artifacts/) and flush() says where.
    """

    def __init__(self, uri: str, run_id: str, send_every: int = METRIC_STEPS_PER_REQUEST):
        self.uri, self.run_id, self.send_every = uri, run_id, send_every
        self.client = client(uri)
        self._pending: list = []
        self._steps = 0
        self._queue: collections.deque = collections.deque()  # (kind, payload), sent oldest first
        self._wake = threading.Condition()
        self._staging = Path(tempfile.mkdtemp(prefix="cmd-unsent-"))  # artifact copies until they are sent
        self._thread = threading.Thread(target=self._send_forever, name="mlflow-sender", daemon=True)
        self._thread.start()

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Record one step's values; they are sent every `send_every` calls (each keeps its step)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in values.items())
        self._steps += 1
        if self._steps >= self.send_every:
            self.send()

    def send(self) -> None:
        """Queue the pending metrics for sending; the step goes on while they travel."""
        if self._pending:
            self._enqueue("metrics", self._pending)
        self._pending, self._steps = [], 0

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or folder under `artifact_path`; a copy is queued (the caller may delete its own)."""
        path = Path(path)
        copy = Path(tempfile.mkdtemp(dir=self._staging))
        if path.is_dir():
            shutil.copytree(path, copy, dirs_exist_ok=True)
        else:
            shutil.copy2(path, copy / path.name)
        self._enqueue("artifacts", (str(copy), artifact_path))

    def model(self, directory: str | Path, artifact_path: str) -> str:
        """A save_pretrained folder as artifacts; returns its `runs:/` URI (what model_store.fetch_model reads)."""
        self.artifact(directory, artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}"

    def video(self, frames: np.ndarray, artifact_path: str, name: str, fps: int) -> None:
        """uint8 [L, H, W, 3] as NAME.mp4 and NAME.gif under `artifact_path`."""
        from cmd_model.generate import write_video

        with tempfile.TemporaryDirectory() as tmp:
            for suffix in (".mp4", ".gif"):
                write_video(frames, Path(tmp) / f"{name}{suffix}", fps=fps)
            self.artifact(tmp, artifact_path)

    def image(
        self, image: np.ndarray, artifact_path: str, name: str, step: int | None = None, key: str | None = None
    ) -> None:
        """uint8 [H, W, 3] as NAME.png under `artifact_path`; with `key` and `step` also as MLflow's
        step-indexed image KEY, which the UI's run page shows with a step slider (samples improving)."""
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            Image.fromarray(image).save(Path(tmp) / f"{name}.png")
            self.artifact(tmp, artifact_path)
        if key is not None:
            self._enqueue("image", (image.copy(), key, step or 0))

    def flush(self, keep_unsent_at: str | None = None) -> str | None:
        """Send what is pending and wait until MLflow has it all, up to outage_s().

        Returns None when everything arrived; otherwise what was not sent, after writing it to the
        folder (or storage URI) `keep_unsent_at`, or to a local folder when none is given.
        """
        self.send()
        deadline = time.monotonic() + outage_s()
        with self._wake:
            while self._queue and time.monotonic() < deadline:
                self._wake.wait(timeout=1.0)
            unsent = list(self._queue)
        if not unsent:
            return None
        return self._keep(unsent, keep_unsent_at)

    def _enqueue(self, kind: str, payload) -> None:
        with self._wake:
            self._queue.append((kind, payload))
            self._wake.notify_all()

    def _send_forever(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                kind, payload = self._queue[0]
            try:
                retry_until(
                    functools.partial(self._send_one, kind, payload),
                    float("inf"),
                    f"logging {kind} to run {self.run_id}",
                )
            except Exception as exc:  # refused by the server (not an outage): waiting would not help
                log.error("MLflow refused %s for run %s: %s", kind, self.run_id, exc)
            with self._wake:
                self._queue.popleft()
                self._wake.notify_all()
            if kind == "artifacts":
                shutil.rmtree(payload[0], ignore_errors=True)

    def _send_one(self, kind: str, payload) -> None:
        if kind == "metrics":
            self.client.log_batch(self.run_id, metrics=payload)
        elif kind == "artifacts":
            self.client.log_artifacts(self.run_id, payload[0], payload[1])
        else:
            image, key, step = payload
            self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def _keep(self, unsent: list, where: str | None) -> str:
        """Write the unsent records as files (metrics.jsonl, artifacts/<path>/...) and say what and where."""
        from pipelines.platform import storage

        local = Path(tempfile.mkdtemp(prefix="cmd-unlogged-"))
        metrics = [m for kind, payload in unsent if kind == "metrics" for m in payload]
        with open(local / "metrics.jsonl", "w") as f:
            for m in metrics:
                f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
        folders = [payload for kind, payload in unsent if kind == "artifacts"]
        for source, artifact_path in folders:
            shutil.copytree(source, local / "artifacts" / (artifact_path or ""), dirs_exist_ok=True)
        (local / UNLOGGED_RUN_FILE).write_text(
            json.dumps({"run_id": self.run_id, "tracking_uri": public_uri(self.uri)})
        )
        target = where or str(local)
        if where:
            storage.upload_dir(local, where)
        return (
            f"{len(metrics)} metric values and {len(folders)} artifact folders of run {self.run_id}, kept in {target}"
        )


UNLOGGED_RUN_FILE = "run.json"  # which run a kept folder belongs to
METRICS_PER_REQUEST = 1000  # MLflow's limit on metrics in one log_batch


def upload_unlogged(folder_uri: str, uri: str) -> dict:
    """Send a folder that RunLogger kept (metrics.jsonl, artifacts/) to its run, then end the run
    FINISHED if it is still RUNNING (the job that kept it had finished training)."""
    from mlflow.entities import Metric

    from pipelines.platform import storage

    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(folder_uri, tmp)
        local = Path(tmp)
        run_id = json.loads((local / UNLOGGED_RUN_FILE).read_text())["run_id"]
        mlflow_client = client(uri)
        lines = (local / "metrics.jsonl").read_text().splitlines()
        metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in map(json.loads, lines)]
        for i in range(0, len(metrics), METRICS_PER_REQUEST):
            mlflow_client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_REQUEST])
        artifacts = local / "artifacts"
        files = sum(1 for p in artifacts.rglob("*") if p.is_file()) if artifacts.is_dir() else 0
        if files:
            mlflow_client.log_artifacts(run_id, str(artifacts))
        if mlflow_client.get_run(run_id).info.status == "RUNNING":
            mlflow_client.set_terminated(run_id, status="FINISHED")
    return {"run_id": run_id, "metrics": len(metrics), "artifact_files": files}
