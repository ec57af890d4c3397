"""The three training jobs on Ray Train: tiny preset, 2 CPU workers, a real Ray head and MLflow server.

Each job runs as users run it (`python jobs/train_<stage>.py ...` with RAY_ADDRESS set, or through
`ray job submit --working-dir .`), so the flags, the checks, the MLflow run and the exported model
are tested together.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import StableDiffusion
from cmd_model.dit import DiT
from cmd_model.generate import CMDGenerator
from cmd_model.presets import get_preset
from pipelines.data import latent_shards as shards
from pipelines.data.video.schema import (
    CAPTION,
    CLIP_INDEX,
    FPS,
    FRAME_STRIDE,
    LABEL,
    NUM_CLIPS,
    SOURCE,
    START_FRAME,
    VIDEO_ID,
)
from pipelines.platform.model_store import fetch_model, model_digest
from pipelines.training import cli

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240
CAPTIONS = ["a red ball bounces", "waves roll onto a beach", "a cat walks left"]
CLIPS = 320  # enough rows that a short run stays within one or two epochs (each epoch restarts the reader)


# ---------------------------------------------------------------------------------------
# Fixtures: latents as precompute writes them, and a runner for the job scripts
# ---------------------------------------------------------------------------------------


def write_latents(output: Path, preset_name: str, digest: str, clips: int = CLIPS, seed: int = 0) -> Path:
    """Smooth, learnable content and motion latents (4 shards) with captions and labels, plus the manifest."""
    p = get_preset(preset_name)
    rng = np.random.default_rng(seed)
    d, frames, width = p.motion_shape
    c, h, w = p.content_shape
    t, j = np.arange(frames)[None, :, None], np.arange(width)[None, None, :]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    kinds = np.arange(clips) % len(CAPTIONS)
    motion = np.stack([np.tanh(np.sin(0.3 * (1 + k) * t + 0.4 * j + rng.uniform(0, 6, (d, 1, 1)))) for k in kinds])
    content = np.stack([np.sin(0.5 * yy + 0.3 * (1 + k) * xx + rng.uniform(0, 6, (c, 1, 1))) for k in kinds])
    batch = {
        VIDEO_ID: np.array([f"video{i // 4}" for i in range(clips)], dtype=object),
        SOURCE: np.array([f"/videos/video{i // 4}.mp4" for i in range(clips)], dtype=object),
        CLIP_INDEX: (np.arange(clips) % 4).astype(np.int32),
        NUM_CLIPS: np.full(clips, 4, np.int32),
        START_FRAME: (16 * (np.arange(clips) % 4)).astype(np.int32),
        FRAME_STRIDE: np.ones(clips, np.int32),
        FPS: np.full(clips, 24, np.float32),
        CAPTION: np.array([CAPTIONS[k] for k in kinds], dtype=object),
        LABEL: np.array([int(k) for k in kinds], dtype=object),
        shards.CONTENT: content.astype(np.float32),
        shards.MOTION: motion.astype(np.float32),
    }
    manifest = {
        "schema_version": shards.SCHEMA_VERSION,
        "autoencoder_digest": digest,
        "preset": preset_name,
        "mode": p.mode,
    }
    schema = shards.latent_schema(p.content_shape, p.motion_shape, manifest)
    for part in np.array_split(np.arange(clips), 4):
        shards.write_atomic(
            shards.latent_table({k: v[part] for k, v in batch.items()}, schema), str(output / shards.LATENTS_DIR)
        )
    shards.write_manifest(str(output), manifest)
    return output


@pytest.fixture(scope="module")
def latents(tmp_path_factory, tiny_autoencoder_dir):
    return write_latents(tmp_path_factory.mktemp("latents") / "tiny", "tiny", model_digest(tiny_autoencoder_dir))


@pytest.fixture
def job_env(ray_head, mlflow_server):
    return {**os.environ, **ray_head.env(), "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONUNBUFFERED": "1"}


def start_job(stage: str, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / f"train_{stage}.py"), *args],
        cwd=log.parent,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def finish_job(proc: subprocess.Popen, log: Path) -> dict:
    try:
        proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"job exited with {proc.returncode}:\n{text[-6000:]}"
    return json.loads([line for line in text.splitlines() if line.startswith('{"run_id"')][-1])


def run_job(stage: str, args: list[str], env: dict, tmp_path: Path, tag: str = "") -> dict:
    log = tmp_path / f"{stage}{tag}.log"
    return finish_job(start_job(stage, args, env, log), log)


def common_args(name: str, storage: Path, steps: int, **extra) -> list[str]:
    values = {
        "--preset": "tiny",
        "--name": name,
        "--storage": str(storage),
        "--max-steps": steps,
        "--batch-size": 8,
        "--num-workers": 2,
        "--eval-every": steps,
        "--checkpoint-every": 10,
        "--eval-samples": 1,
        "--log-every": 1,
        **extra,
    }  # every step's loss: the tests read whole curves
    return [str(x) for flag, value in values.items() for x in ((flag,) if value is True else (flag, value))]


def mlflow_client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def assert_loss_falls(client, run_id: str) -> None:
    """The mean loss of the last 5 steps is well below that of the first 5 (a step logged twice
    after a resume counts once)."""
    losses = [v for _, v in sorted(dict(history(client, run_id, "loss")).items())]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last, losses)


# ---------------------------------------------------------------------------------------
# Motion: a worker killed mid-run (a run stopped early and started again: the local-mode test)
# ---------------------------------------------------------------------------------------


def kill_a_training_worker(ray_head) -> int:
    from ray.util.state import list_actors

    alive = list_actors(
        address=ray_head.address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    assert alive, "no live training worker to kill"
    pid = int(alive[-1].pid)
    os.kill(pid, signal.SIGKILL)
    return pid


MOTION_STEPS = 40


@pytest.fixture(scope="module")
def motion_runs(latents, tiny_sd_dir, tiny_autoencoder_dir, ray_head, mlflow_server, tmp_path_factory):
    """A motion job on two workers loses one after a checkpoint and goes on to its last step.

    (A job stopped early and started again with more steps: the local-mode test below; a killed
    job started again on workers: tests/test_s3_training.py.)"""
    tmp = tmp_path_factory.mktemp("motion")
    env = {**os.environ, **ray_head.env(), "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONUNBUFFERED": "1"}
    data = {
        "--latents": latents,
        "--stable-diffusion": tiny_sd_dir,
        "--autoencoder": tiny_autoencoder_dir,
        "--warmup-steps": 5,
        # Under DDP on two workers: 2 micro-batches a step (no_sync, gradients in the buckets) and
        # checkpointed DiT blocks, through a worker's death.
        "--grad-accum-steps": 2,
        "--grad-checkpointing": True,
        "--max-failures": 1,
    }
    log = tmp / "motion.log"
    proc = start_job("motion", common_args("motion-a", tmp / "runs", MOTION_STEPS, **data), env, log)
    # Ray Train lists a checkpoint in its snapshot once every rank has reported it: from then on
    # a restart must resume from it (the folder alone appears before the other ranks report). Any of
    # this run's before its last (the snapshot keeps the newest three: on a busy machine the first may
    # be gone when this looks).
    snapshot = tmp / "runs" / "motion-a" / "checkpoint_manager_snapshot.json"
    ours = [f"step_{step:08d}" for step in range(10, MOTION_STEPS, 10)]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (snapshot.exists() and any(c in snapshot.read_text(errors="replace") for c in ours)):
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "no checkpoint of the run before its last"
        time.sleep(0.2)
    killed = kill_a_training_worker(ray_head)
    result = finish_job(proc, log)
    return {"result": result, "killed": killed, "storage": tmp / "runs", "tmp": tmp}


def test_motion_run_resumes_after_a_worker_kill(motion_runs, mlflow_server):
    result = motion_runs["result"]
    assert result["step"] == MOTION_STEPS and result["checkpoint"].endswith(f"step_{MOTION_STEPS:08d}")
    client = mlflow_client(mlflow_server.url)
    starts = [v for _, v in history(client, result["run_id"], "resumed_from_step")]
    # From 0, then the workers again from the last checkpoint before the kill (10 or later), never from 0.
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 10, starts
    assert client.get_run(result["run_id"]).info.status == "FINISHED"  # one MLflow run, however often it restarts


def test_motion_run_logs_params_metrics_and_artifacts(motion_runs, mlflow_server, latents, tiny_autoencoder_dir):
    client = mlflow_client(mlflow_server.url)
    run = client.get_run(motion_runs["result"]["run_id"])
    assert run.info.run_name == "motion-a"
    params = run.data.params
    assert params["preset"] == "tiny" and params["num_workers"] == "2" and params["batch_size"] == "8"
    assert params["grad_accum_steps"] == "2" and params["grad_checkpointing"] == "True"
    assert params["preset.motion.hidden_size"] == "32" and params["learning_rate"] == "0.001"
    assert run.data.tags["data.latents"] == str(latents)
    assert run.data.tags["data.autoencoder_digest"] == model_digest(tiny_autoencoder_dir)
    steps = {step for step, _ in history(client, run.info.run_id, "loss")}
    assert steps == set(range(1, MOTION_STEPS + 1))
    for key in ("lr", "steps_per_s", "samples_per_s", "grad_norm"):
        assert {step for step, _ in history(client, run.info.run_id, key)} == steps, key
    assert history(client, run.info.run_id, "lr")[0][1] == pytest.approx(1e-3 / 5)  # linear warm-up
    assert_loss_falls(client, run.info.run_id)
    assert {"eval/loss", "eval/motion_mse"} <= set(run.data.metrics)
    files = artifact_paths(client, run.info.run_id)
    sample = f"samples/step_{MOTION_STEPS:08d}/clip0_true_vs_sampled"  # the evaluation at the end
    assert {f"{sample}.mp4", f"{sample}.gif"} <= files
    assert {"motion/config.json", "motion/diffusion_pytorch_model.safetensors"} <= files


def test_motion_model_loads_and_generates(motion_runs, mlflow_env, tiny_sd_dir, tiny_autoencoder_dir):
    result = motion_runs["result"]
    # The copy in storage and the one in MLflow are the same model.
    assert model_digest(result["model"]) == model_digest(
        fetch_model(result["model_uri"], str(motion_runs["tmp"] / "dl"))
    )
    p = get_preset("tiny")
    sd = StableDiffusion.from_pretrained(str(tiny_sd_dir))
    generator = CMDGenerator(
        p, VideoAutoencoder.from_pretrained(tiny_autoencoder_dir), DiT.from_pretrained(result["model"]), sd=sd
    )
    video = generator(prompts=[CAPTIONS[0]], seed=0)
    assert video.shape == (1, 16, *p.video_size, 3) and video.dtype == np.uint8


# ---------------------------------------------------------------------------------------
# Content and autoencoder
# ---------------------------------------------------------------------------------------


def submit_job(stage: str, args: list[str], ray_head, mlflow_url: str, tmp_path: Path) -> dict:
    """`ray job submit --working-dir .` to the test head, as on a cluster; returns the job's result line."""
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": mlflow_url},
        "excludes": [".venv", ".git", ".whl"],
    }  # the code only, not environments or wheels
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        ray_head.dashboard_url,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        f"jobs/train_{stage}.py",
        *args,
    ]
    log = tmp_path / f"{stage}-submit.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, **ray_head.env()},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=JOB_TIMEOUT_S,
        )
    text = log.read_text(errors="replace")
    assert proc.returncode == 0 and "succeeded" in text, text[-6000:]
    return json.loads([line for line in text.splitlines() if line.startswith('{"run_id"')][-1])


def test_local_mode_keeps_checkpoints_resumes_and_returns_a_finished_run(
    latents, tiny_sd_dir, tiny_autoencoder_dir, ray_head, mlflow_server, monkeypatch, tmp_path, capsys
):
    """--num-workers 0 is Ray Train's local mode: the loop runs in this process, and Ray Train keeps
    no checkpoints there, so the loop keeps them where Ray Train would (a rerun relies on them)."""
    from mlflow import MlflowClient

    from pipelines.training import TrainConfig, fit

    for key, value in {**ray_head.env(), "MLFLOW_TRACKING_URI": mlflow_server.url}.items():
        monkeypatch.setenv(key, value)
    cfg = TrainConfig(
        stage="motion",
        preset="tiny",
        name="local-mode",
        storage=str(tmp_path / "runs"),
        latents=str(latents),
        stable_diffusion=str(tiny_sd_dir),
        autoencoder=str(tiny_autoencoder_dir),
        num_workers=0,
        batch_size=4,
        max_steps=8,
        checkpoint_every=2,
        eval_every=100,
        eval_samples=1,
    )
    first = fit(cfg)
    run_dir = tmp_path / "runs" / "local-mode"
    assert first.step == 8 and first.checkpoint == str(run_dir / "step_00000008")
    assert sorted(p.name for p in run_dir.glob("step_*")) == [f"step_{s:08d}" for s in (4, 6, 8)]  # newest 3

    longer = fit(cfg.replace(max_steps=10))  # resumes from its newest checkpoint, in the same MLflow run
    assert longer.step == 10 and longer.run_id == first.run_id
    client = MlflowClient(mlflow_server.url)
    assert [v for _, v in history(client, first.run_id, "resumed_from_step")] == [0, 8]
    run = client.get_run(first.run_id)  # the run keeps its first params; a changed one is a resumed.* tag
    assert run.data.params["max_steps"] == "8" and run.data.tags["resumed.max_steps"] == "10"

    capsys.readouterr()
    again = fit(cfg.replace(max_steps=10))
    assert "[local-mode] already finished at step 10" in capsys.readouterr().out and again.run_id == first.run_id


def test_content_job_fine_tunes_the_unet(latents, tiny_sd_dir, tiny_autoencoder_dir, ray_head, mlflow_server, tmp_path):
    # One worker: DDP over two is the motion runs' (above); a second worker costs ~15 s on 2 cores.
    result = submit_job(
        "content",
        common_args(
            "content-a",
            tmp_path / "runs",
            30,
            **{"--latents": latents, "--stable-diffusion": tiny_sd_dir, "--num-workers": 1},
        ),
        ray_head,
        mlflow_server.url,
        tmp_path,
    )
    assert result["step"] == 30
    client = mlflow_client(mlflow_server.url)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["preset"] == "tiny"
    assert_loss_falls(client, run.info.run_id)
    files = artifact_paths(client, run.info.run_id)
    assert {"samples/step_00000030/content_true_vs_sampled.png", "content/config.json"} <= files

    # The fine-tuned UNet is the content model of the generator (latent mode).
    p = get_preset("tiny")
    sd = StableDiffusion.from_pretrained(str(tiny_sd_dir), unet=result["model"])
    motion = DiT.from_preset_config(p.motion)
    video = CMDGenerator(p, VideoAutoencoder.from_pretrained(tiny_autoencoder_dir), motion, sd=sd)(
        prompts=[CAPTIONS[1]]
    )
    assert video.shape == (1, 16, *p.video_size, 3)


@pytest.fixture(scope="module")
def training_videos(tmp_path_factory):
    """12 videos of 48 frames: 3 clips each, so a short run needs few passes over the decoder."""
    from tests.fixtures_video import write_video

    root = tmp_path_factory.mktemp("ae_videos")
    for i in range(12):
        write_video(root / f"video{i:02d}.mp4", 48, 96 + 8 * (i % 4), 64 + 8 * (i % 3))
    return root


def test_autoencoder_job_trains_on_videos(training_videos, tiny_sd_dir, job_env, mlflow_server, tmp_path):
    steps = 12  # two passes over the videos: each pass restarts the decoders
    result = run_job(
        "autoencoder",
        common_args(
            "ae-a",
            tmp_path / "runs",
            steps,
            **{"--input": training_videos, "--stable-diffusion": tiny_sd_dir, "--batch-size": 4, "--num-workers": 1},
        ),
        job_env,
        tmp_path,
    )
    assert result["step"] == steps
    client = mlflow_client(mlflow_server.url)
    run = client.get_run(result["run_id"])
    assert run.data.tags["data.videos"] == "12" and run.data.tags["data.held_out_videos"] == "1"
    assert_loss_falls(client, run.info.run_id)
    assert {"eval/psnr", "eval/mse"} <= set(run.data.metrics)
    files = artifact_paths(client, run.info.run_id)
    recon = f"reconstructions/step_{steps:08d}"
    assert {
        f"{recon}/true_over_reconstructed.png",
        f"{recon}/clip0_true_vs_reconstructed.mp4",
        f"{recon}/clip0_true_vs_reconstructed.gif",
        "autoencoder/config.json",
    } <= files

    ae = VideoAutoencoder.from_pretrained(result["model"]).eval()
    with torch.no_grad():
        content, motion = ae.encode(torch.randn(1, *get_preset("tiny").content_shape[:1], 16, 8, 12))
    assert motion.shape == (1, *get_preset("tiny").motion_shape)


# ---------------------------------------------------------------------------------------
# Wrong flags fail in one line, before any Ray work
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_latents(tmp_path_factory):
    return write_latents(tmp_path_factory.mktemp("latents") / "pixel", "tiny-pixel", "0" * 16, clips=8)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--preset": "nope"}, "unknown preset 'nope'"),
        ({"--latents": "/does/not/exist"}, "latents folder not found: /does/not/exist"),
        ({"--latents": "PIXEL"}, "were made for preset 'tiny-pixel', not 'tiny'"),
        ({"--batch-size": 3}, "must divide evenly over --num-workers 2"),
        ({"--max-steps": 0}, "--max-steps must be a positive integer"),
        ({"--max-steps": "ten"}, "argument --max-steps: invalid int value: 'ten'"),
        ({"--name": "a/b"}, "--name 'a/b' must be"),
        ({"--autoencoder": "/does/not/exist"}, "model not found: /does/not/exist"),
        ({"--stable-diffusion": "/does/not/exist"}, "Stable Diffusion folder not found"),
    ],
)
def test_bad_flags_fail_in_one_line(change, message, latents, pixel_latents, tiny_sd_dir, mlflow_env, tmp_path, capsys):
    values = {"--latents": latents, "--stable-diffusion": tiny_sd_dir, **change}
    if values["--latents"] == "PIXEL":
        values["--latents"] = pixel_latents
    try:
        code = cli.main("motion", common_args("bad", tmp_path / "runs", 10, **values))
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs" / "bad").exists()


def test_unreachable_tracking_server_fails_in_seconds(latents, tiny_sd_dir, tmp_path, monkeypatch, capsys):
    from tests.fixtures_s3 import _free_ports

    url = f"http://127.0.0.1:{_free_ports(1)[0]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    start = time.monotonic()
    code = cli.main(
        "motion",
        common_args("nowhere", tmp_path / "runs", 10, **{"--latents": latents, "--stable-diffusion": tiny_sd_dir}),
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"cannot reach MLflow tracking server {url}" in err, err
    assert time.monotonic() - start < 10


def test_eval_latents_must_match_the_training_latents(latents, tiny_autoencoder_dir, tiny_sd_dir, tmp_path):
    # --eval-latents: held-out clips are evaluated only when made like the training latents; a
    # wrong folder fails on the driver in one line, before any worker starts.
    from pipelines.training import TrainConfig
    from pipelines.training.config import ConfigError
    from pipelines.training.motion import MotionStage

    def prepare(eval_latents):
        cfg = TrainConfig(
            stage="motion",
            preset="tiny",
            name="eval-check",
            max_steps=1,
            storage=str(tmp_path / "runs"),
            latents=str(latents),
            eval_latents=str(eval_latents),
            stable_diffusion=tiny_sd_dir,
        )
        return MotionStage.prepare(cfg)

    held = write_latents(tmp_path / "held", "tiny", model_digest(tiny_autoencoder_dir))
    assert prepare(held)["data_version"]["clips"] > 0
    other = write_latents(tmp_path / "other", "tiny", "0" * 16)
    with pytest.raises(ConfigError, match="--eval-latents .* autoencoder"):
        prepare(other)
    with pytest.raises(ConfigError, match="not a precompute_latents output"):
        prepare(tmp_path)


def test_max_failures_minus_one_means_no_limit():
    # Spot clusters restart without limit (issue 27, item 6: -1 was refused).
    from pipelines.training import TrainConfig
    from pipelines.training.config import ConfigError

    common = dict(stage="motion", preset="tiny", name="x", max_steps=1, latents="/nowhere", stable_diffusion="/sd")
    assert TrainConfig(**common, max_failures=-1).max_failures == -1
    with pytest.raises(ConfigError, match="--max-failures must be -1 .no limit. or more, got -2"):
        TrainConfig(**common, max_failures=-2)
    with pytest.raises(ConfigError, match="--seed must be a non-negative integer"):
        TrainConfig(**common, seed=-1)
