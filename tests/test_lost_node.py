"""A node lost mid-job (issue 13, fault 3): a two-node Ray cluster in a network namespace of its
own (tests.fixtures_cluster), the worker node's every process SIGKILLed while the job runs."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data import latent_shards as shards
from pipelines.data.video.schema import CLIP_INDEX, VIDEO_ID
from pipelines.platform.model_store import model_digest
from tests.test_precompute import copies_of, tiny_job
from tests.test_train import common_args, history, mlflow_client, write_latents

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.fixtures_cluster"]
JOB_TIMEOUT_S = 300


def read_clip_keys(output: Path) -> list[tuple[str, int]]:
    tables = [pq.read_table(f) for f in sorted((output / shards.LATENTS_DIR).glob("*.parquet"))]
    table = pa.concat_tables(tables) if tables else pa.table({VIDEO_ID: [], CLIP_INDEX: []})
    return list(zip(table.column(VIDEO_ID).to_pylist(), table.column(CLIP_INDEX).to_pylist()))


def wait_for(proc, condition, log: Path, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}:\n{log.read_text(errors='replace')[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(0.2)


def finish(proc, log: Path, timeout_s: float = JOB_TIMEOUT_S) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except Exception:
        proc.kill()
        proc.wait()
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"job exited with {proc.returncode}:\n{text[-6000:]}"
    return text


def test_precompute_finishes_when_a_node_is_lost(
    netns_cluster_factory, tmp_path, sample_videos, tiny_autoencoder_dir, tiny_sd_dir
):
    """The worker node dies once the first shard is written; the job finishes with every clip once."""
    count = 36
    videos = copies_of(sample_videos["h264_wide.mp4"].path, tmp_path / "videos", count)  # 50 frames -> 3 clips each
    # One CPU a node: the survivor has no CPU to spare for anything an actor holds (the setting that hung).
    cluster = netns_cluster_factory(head_cpus=1, worker_cpus=1)
    out = tmp_path / "out"
    argv = tiny_job(videos, out, tiny_autoencoder_dir, tiny_sd_dir)
    log = tmp_path / "precompute.log"
    started = time.monotonic()
    # Ray Data logs progress every second here (its default, 10 s, is longer than the whole job on
    # an idle machine: the moment below then never showed before the job ended, and the test failed).
    proc = cluster.popen(argv, log, RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL="1")
    # Lost once every video is decoded and before much is encoded: decoded blocks wait on both
    # nodes (the moment the job hung while decoding ran in actors).
    wait_for(
        proc,
        lambda: re.search(r"MapBatches\(decode_videos\): (\d+)/\1\b", log.read_text(errors="replace")),
        log,
        "decoded clips",
    )
    lost_at = time.monotonic() - started
    cluster.lose_worker_node()
    finish(proc, log)
    seconds = time.monotonic() - started
    summary = json.loads((out / shards.SUMMARY).read_text())
    keys = read_clip_keys(out)
    print(
        json.dumps(
            {
                "fault": "node lost in precompute",
                "lost_at_s": round(lost_at, 1),
                "job_s": round(seconds, 1),
                "clips": len(keys),
                "duplicates": len(keys) - len(set(keys)),
            }
        )
    )
    assert len(keys) == len(set(keys)), "a clip was written twice"
    assert set(keys) == {(k, c) for k in {v for v, _ in keys} for c in range(3)} and len(keys) == count * 3
    assert summary["videos_failed"] == 0 and summary["clips_total"] == count * 3


def test_training_resumes_from_its_checkpoint_when_a_node_is_lost(
    netns_cluster_factory, tmp_path, tiny_sd_dir, tiny_autoencoder_dir
):
    """Two workers, one on each node (2 CPUs each; the head keeps one CPU for reading latents). The
    worker node dies after the step-10 checkpoint; a replacement joins, as a cloud autoscaler would
    start one, and the run goes on from its last checkpoint to --max-steps."""
    latents = write_latents(tmp_path / "latents", "tiny", model_digest(tiny_autoencoder_dir))
    cluster = netns_cluster_factory(head_cpus=3, worker_cpus=2)
    runs = tmp_path / "runs"
    args = common_args(
        "lost-node",
        runs,
        30,
        **{
            "--latents": latents,
            "--stable-diffusion": tiny_sd_dir,
            "--autoencoder": tiny_autoencoder_dir,
            "--warmup-steps": 5,
            "--cpus-per-worker": 2,
            "--max-failures": 3,
        },
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the host's test MLflow server is outside the namespace
    log = tmp_path / "train.log"
    started = time.monotonic()
    proc = cluster.popen(
        [sys.executable, str(ROOT / "jobs" / "train_motion.py"), *args],
        log,
        cwd=tmp_path,
        MLFLOW_TRACKING_URI=uri,
        PYTHONUNBUFFERED="1",
    )
    snapshot = runs / "lost-node" / "checkpoint_manager_snapshot.json"
    wait_for(
        proc,
        lambda: snapshot.exists() and "step_00000010" in snapshot.read_text(errors="replace"),
        log,
        "checkpoint at step 10",
    )
    lost_at = time.monotonic() - started
    cluster.lose_worker_node()
    cluster.add_worker_node()
    text = finish(proc, log)
    result = json.loads([line for line in text.splitlines() if line.startswith('{"run_id"')][-1])
    starts = [v for _, v in history(mlflow_client(uri), result["run_id"], "resumed_from_step")]
    print(
        json.dumps(
            {
                "fault": "node lost in training",
                "lost_at_s": round(lost_at, 1),
                "job_s": round(time.monotonic() - started, 1),
                "resumed_from_step": starts,
            }
        )
    )
    assert result["step"] == 30 and result["checkpoint"].endswith("step_00000030")
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 10, starts  # from the checkpoint, not step 0
    assert mlflow_client(uri).get_run(result["run_id"]).info.status == "FINISHED"
