"""The tracking server goes away during a training job (issue 13, fault 4).

A motion job on the session Ray head logs to its own `mlflow server`, which the test stops once
the job has opened its run and before its training loop logs (so every step's metrics meet it away).
The loop runs in Ray Train's local mode (`--num-workers 0`): its logger is the code a worker runs
on any node, and the subject here is the server going away, not the workers (tests/test_train.py);
a worker group would add about 15 s of start-up per scenario.
- started again (same port, same store) a little later: the job finishes, the run ends FINISHED
  with every step's metrics and its model, all sent after the server came back; that server keeps
  its artifacts on S3 (SeaweedFS; fault 2), and the model loads back through runs:/ and models:/;
- never started again: training still finishes and checkpoints, and the job exits 2 with one
  line saying what was not logged and where it is kept (beside the checkpoints); the command that
  line names sends it all to the run once a server is back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_services import start_mlflow_server, stop_mlflow_server
from tests.test_train import JOB_TIMEOUT_S, ROOT, common_args, history, mlflow_client, start_job

STEPS = 30
AWAY_S = 6  # how long the server stays away in the first scenario: several MLflow requests fail meanwhile


@pytest.fixture(scope="module")
def outage_latents(tmp_path_factory, tiny_autoencoder_dir):
    from pipelines.platform.model_store import model_digest
    from tests.test_train import write_latents

    return write_latents(
        tmp_path_factory.mktemp("latents") / "tiny", "tiny", model_digest(tiny_autoencoder_dir), clips=32
    )


def start_training(tmp: Path, name: str, server, ray_head, latents, sd, autoencoder, **env_extra):
    env = {
        **os.environ,
        **ray_head.env(),
        "MLFLOW_TRACKING_URI": server.url,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        **env_extra,
    }  # each failed request fails at once: the job's own retries are tested
    args = common_args(
        name,
        tmp / "runs",
        STEPS,
        **{
            "--latents": latents,
            "--stable-diffusion": sd,
            "--autoencoder": autoencoder,
            "--num-workers": 0,
            "--batch-size": 4,
            "--eval-every": 15,
            "--checkpoint-every": 15,
        },
    )
    log = tmp / f"{name}.log"
    return start_job("motion", args, env, log), log


def wait_for_training(proc, log: Path, server, name: str) -> None:
    """Until the driver has made its last MLflow call before the loop (the run's params, then its
    data version as `data.*` tags): the loop starts next, after building its input and model."""
    client = mlflow_client(server.url)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], f"attributes.run_name = '{name}'"
        )
        if runs and any(tag.startswith("data.") for tag in runs[0].data.tags):
            return
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "the job never opened its run"
        time.sleep(0.2)


def test_a_server_that_comes_back_gets_everything(
    outage_latents, tiny_sd_dir, tiny_autoencoder_dir, ray_head, s3_server, s3_bucket, tmp_path
):
    # The server keeps its artifacts on S3 (fault 2: --artifacts-destination s3://..., SeaweedFS
    # with keys): the job uploads through the server, as workers on any node do.
    on_s3 = {
        "artifacts": f"{s3_bucket}/mlflow",
        "env": {**s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url},
    }
    server, proc_server = start_mlflow_server(tmp_path, **on_s3)
    port = int(server.url.rsplit(":", 1)[1])
    try:
        job, log = start_training(
            tmp_path, "outage-back", server, ray_head, outage_latents, tiny_sd_dir, tiny_autoencoder_dir
        )
        wait_for_training(job, log, server, "outage-back")
        stop_mlflow_server(proc_server)
        time.sleep(AWAY_S)
        server, proc_server = start_mlflow_server(tmp_path, port, **on_s3)
        job.wait(timeout=JOB_TIMEOUT_S)
        text = log.read_text(errors="replace")
        assert job.returncode == 0, text[-6000:]
        assert "tracking server unreachable" in text and "tracking server reachable again" in text
        result = json.loads([line for line in text.splitlines() if line.startswith('{"run_id"')][-1])
        client = mlflow_client(server.url)
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert [step for step, _ in history(client, run.info.run_id, "loss")] == list(range(1, STEPS + 1))
        assert "eval/loss" in run.data.metrics
        assert any(item.path == "motion" for item in client.list_artifacts(run.info.run_id))
        assert not (tmp_path / "runs" / "outage-back" / "unlogged").exists()
        assert_artifacts_on_s3(s3_server, s3_bucket, tmp_path, server.url, run.info.run_id)
    finally:
        stop_mlflow_server(proc_server)


def assert_artifacts_on_s3(s3_server, bucket: str, root: Path, url: str, run_id: str) -> None:
    """The run's model and samples are objects in the bucket, nothing is on the server's disk, and the
    model loads back through runs:/ and, once registered, models:/ (what generate and retrain read)."""
    import mlflow
    import s3fs

    from cmd_model.dit import DiT
    from pipelines.platform import tracking
    from pipelines.platform.model_store import fetch_model

    fs = s3fs.S3FileSystem(
        key=s3_server.access_key,
        secret=s3_server.secret_key,
        endpoint_url=s3_server.endpoint_url,
        skip_instance_cache=True,
    )
    stored = fs.find(f"{bucket}/mlflow")
    assert any(p.endswith(f"{run_id}/artifacts/motion/config.json") for p in stored), stored
    assert any("/artifacts/samples/" in p for p in stored), stored
    assert not (root / "artifacts").exists()
    mlflow.set_tracking_uri(url)
    try:
        DiT.from_pretrained(str(fetch_model(f"runs:/{run_id}/motion", into=str(root / "from-run"))))
        # Registered as the retraining job registers its bundles (pipelines.platform.registry.register_bundle).
        client = tracking.client(url)
        tracking.ensure_registered_model(client, "outage-motion", "a motion DiT whose files are on S3")
        version = client.create_model_version("outage-motion", f"runs:/{run_id}/motion", run_id=run_id)
        DiT.from_pretrained(
            str(fetch_model(f"models:/outage-motion/{version.version}", into=str(root / "from-registry")))
        )
    finally:
        mlflow.set_tracking_uri(None)


def test_a_server_that_never_comes_back_fails_the_job_in_one_line_and_keeps_the_records(
    outage_latents, tiny_sd_dir, tiny_autoencoder_dir, ray_head, tmp_path
):
    server, proc_server = start_mlflow_server(tmp_path)
    port = int(server.url.rsplit(":", 1)[1])
    try:
        job, log = start_training(
            tmp_path,
            "outage-gone",
            server,
            ray_head,
            outage_latents,
            tiny_sd_dir,
            tiny_autoencoder_dir,
            CMD_TRACKING_OUTAGE_S="5",
        )
        wait_for_training(job, log, server, "outage-gone")
    finally:
        stop_mlflow_server(proc_server)
    job.wait(timeout=JOB_TIMEOUT_S)
    text = log.read_text(errors="replace")
    assert job.returncode == 2, text[-6000:]
    last = text.strip().splitlines()[-1]
    kept = tmp_path / "runs" / "outage-gone" / "unlogged"
    assert last.startswith("error: [outage-gone] training finished at step 30") and f"kept in {kept}" in last, last
    assert (tmp_path / "runs" / "outage-gone" / "step_00000030").is_dir()  # the checkpoint is saved
    metrics = [json.loads(line) for line in (kept / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m["step"] for m in metrics if m["key"] == "loss") == list(range(1, STEPS + 1))
    assert (kept / "artifacts" / "motion" / "config.json").is_file()  # the exported model, not uploaded
    assert f"python jobs/upload_unlogged.py {kept}" in last

    # The server is back (days later): the command the line gave sends everything to the run.
    server, proc_server = start_mlflow_server(tmp_path, port)
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
        sent = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "upload_unlogged.py"), str(kept)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        run_id = json.loads(sent.stdout.strip().splitlines()[-1])["run_id"]
        client = mlflow_client(server.url)
        assert [step for step, _ in history(client, run_id, "loss")] == list(range(1, STEPS + 1))
        assert any(item.path == "motion" for item in client.list_artifacts(run_id))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        stop_mlflow_server(proc_server)
