"""Training with everything on S3 (issue 13, fault 1): latents read from a bucket, checkpoints and
the exported model written to it, the driver killed mid-run and the job started again; the same
for a sweep (jobs/tune.py).

SeaweedFS on loopback with keys, the session Ray head and MLflow server; the motion job runs as
users run it (`python jobs/train_motion.py --storage s3://... --latents s3://...`). The driver is
killed with SIGKILL once Ray Train has recorded a checkpoint in the bucket; the same command again
resumes from that checkpoint (not step 0), in the same MLflow run, and finishes. While the first
job runs, a second one with the same --name and --storage refuses in one line (fault 5): the lease
in the bucket names the running job; the killed job's lease does not hold up the rerun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pipelines.platform import storage
from pipelines.platform.model_store import model_digest
from pipelines.training import lease
from tests.test_train import (
    JOB_TIMEOUT_S,
    ROOT,
    common_args,
    finish_job,
    history,
    mlflow_client,
    start_job,
    write_latents,
)

# Four checkpoints before the last: the driver is still training when the test sees one of them and
# kills it (each is a save and an upload to the bucket; 100 steps before cost ~10 s more of steps and uploads).
STEPS, CHECKPOINT_EVERY = 50, 10


def s3fs_of(s3_server):
    import s3fs

    return s3fs.S3FileSystem(
        key=s3_server.access_key,
        secret=s3_server.secret_key,
        endpoint_url=s3_server.endpoint_url,
        skip_instance_cache=True,
    )


def test_a_killed_s3_run_resumes_from_its_s3_checkpoint(
    s3_server, s3_bucket, ray_head, mlflow_server, tiny_sd_dir, tiny_autoencoder_dir, tmp_path
):
    local = write_latents(tmp_path / "latents", "tiny", model_digest(tiny_autoencoder_dir), clips=64)
    latents = f"{s3_bucket}/latents"
    storage.upload_dir(local, latents)
    runs = f"{s3_bucket}/runs"
    env = {**os.environ, **ray_head.env(), "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONUNBUFFERED": "1"}
    args = common_args(
        "motion-s3",
        runs,
        STEPS,
        **{
            "--latents": latents,
            "--stable-diffusion": tiny_sd_dir,
            "--num-workers": 1,
            "--checkpoint-every": CHECKPOINT_EVERY,
        },
    )
    fs = s3fs_of(s3_server)
    snapshot = f"{runs}/motion-s3/checkpoint_manager_snapshot.json".removeprefix("s3://")

    log = tmp_path / "first.log"
    proc = start_job("motion", args, env, log)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not fs.exists(f"{runs}/motion-s3/{lease.LEASE}".removeprefix("s3://")):
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "the first job never took its lease"
        time.sleep(0.3)
        fs.invalidate_cache()
    # Fault 5: the same run started again while the first job runs refuses in one line, before Ray.
    second = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train_motion.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2 and second.stderr.strip().splitlines()[-1].startswith(
        "error: [motion-s3] another job is running this run"
    ), second.stderr[-3000:]
    # Ray Train lists a checkpoint in its snapshot once it is complete in storage. Any before the last:
    # the snapshot keeps the newest three, so on a busy machine the first may be gone when this looks.
    before_last = [f"step_{step:08d}" for step in range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY)]
    while not (fs.exists(snapshot) and any(c in fs.cat(snapshot).decode(errors="replace") for c in before_last)):
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "no checkpoint in the bucket"
        time.sleep(0.3)
        fs.invalidate_cache()
    proc.kill()  # SIGKILL: no clean-up in the driver, as when a node is preempted
    proc.wait()

    result = finish_job(start_job("motion", args, env, tmp_path / "second.log"), tmp_path / "second.log")
    assert result["step"] == STEPS
    client = mlflow_client(mlflow_server.url)
    starts = [v for _, v in history(client, result["run_id"], "resumed_from_step")]
    # From the S3 checkpoint, not 0
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= CHECKPOINT_EVERY, starts
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["data.latents"] == latents
    assert {s for s, _ in history(client, result["run_id"], "loss")} == set(range(1, STEPS + 1))
    # Checkpoints and the exported model are objects in the bucket; nothing was written locally.
    fs.invalidate_cache()
    stored = fs.find(f"{runs}/motion-s3".removeprefix("s3://"))
    assert all(
        any(p.endswith(f"step_{STEPS:08d}/{name}") for p in stored) for name in ("state.json", "model.safetensors")
    ), stored
    assert any(p.endswith("model/config.json") for p in stored), stored
    assert result["model"] == f"{runs}/motion-s3/model"
    assert json.loads(fs.cat(f"{runs}/motion-s3/model/config.json".removeprefix("s3://")))["_class_name"] == "DiT"


def test_a_killed_s3_sweep_resumes_its_unfinished_trials(
    s3_server, s3_bucket, ray_head, mlflow_server, tiny_sd_dir, tiny_autoencoder_dir, tmp_path
):
    """Fault 1 for sweeps: `jobs/tune.py --storage s3://...` killed (SIGKILL of the driver) once a trial has a
    checkpoint in the bucket; the same command again resumes the unfinished trials from their S3 checkpoints,
    in the same parent and child MLflow runs, and reports the whole sweep."""
    from tests.test_tune import SWEEP, SWEEP_TIMEOUT_S, tune_args

    local = write_latents(tmp_path / "latents", "tiny", model_digest(tiny_autoencoder_dir), clips=64)
    latents = f"{s3_bucket}/latents"
    storage.upload_dir(local, latents)
    runs = f"{s3_bucket}/runs"
    search = tmp_path / "sweep.yaml"
    search.write_text(SWEEP)
    env = {**os.environ, **ray_head.env(), "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONUNBUFFERED": "1"}
    args = tune_args(
        search,
        "sweep-s3",
        runs,
        latents,
        tiny_sd_dir,
        "--num-samples",
        "2",
        "--max-concurrent",
        "1",
        "--experiment",
        "tune-s3-test",
    )
    command = [sys.executable, str(ROOT / "jobs" / "tune.py"), *args]
    fs = s3fs_of(s3_server)
    trials = f"{runs}/sweep-s3-trial-*/checkpoint_manager_snapshot.json".removeprefix("s3://")

    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    try:
        while not any("step_00000003" in fs.cat(p).decode(errors="replace") for p in fs.glob(trials)):
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "no trial checkpoint in the bucket"
            time.sleep(0.3)
            fs.invalidate_cache()
    finally:
        proc.kill()  # SIGKILL: the driver dies with its trials, as on a preempted head
        proc.wait()
    checkpointed = {p.split("/")[-2] for p in fs.glob(trials) if "step_00000003" in fs.cat(p).decode(errors="replace")}

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-8000:]
    summary = json.loads(again.stdout[again.stdout.rindex('{"parent_run_id"') :].splitlines()[0])
    assert summary["trials"] == 2 and summary["failed"] == 0 and summary["best_trial"] is not None, summary
    client = mlflow_client(mlflow_server.url)
    experiment = client.get_experiment_by_name("tune-s3-test")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.runName` = 'sweep-s3'")
    assert [p.info.run_id for p in parents] == [summary["parent_run_id"]]  # the killed sweep's parent, not a second one
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'"
    )
    assert len(children) == 2 and all(r.info.status in ("FINISHED", "KILLED") for r in children), children
    for run in children:
        starts = [v for _, v in history(client, run.info.run_id, "resumed_from_step")]
        if run.info.run_name in checkpointed:  # resumed from its S3 checkpoint, not from step 0
            assert starts[0] == 0 and max(starts) >= 3, (run.info.run_name, starts)
    fs.invalidate_cache()
    stored = fs.find(runs.removeprefix("s3://"))
    for name in checkpointed:  # the resumed trials' checkpoints are objects in the bucket, the last step's included
        assert any(f"/{name}/step_" in p and p.endswith("model.safetensors") for p in stored), (name, stored[:20])
