"""Pixel mode (the UCF-101 path), end to end through the jobs: videos in class folders -> latents
with folder labels -> class-conditional content DiT and motion DiT -> a video for a class.

tiny-pixel stands in for ucf101-64: RGB frames, no Stable Diffusion anywhere.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest

from pipelines.data.synthetic_videos import make_dataset
from tests.fixtures_models import save_autoencoder

ROOT = Path(__file__).resolve().parents[1]


def run_job(script: str, args: list, env: dict) -> str:
    result = subprocess.run(
        [sys.executable, f"jobs/{script}", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory, ray_head, mlflow_server):
    tmp = tmp_path_factory.mktemp("pixel")
    make_dataset(tmp / "ucf", 4)  # UCF-101 layout: <class>/<video>.mp4
    autoencoder = save_autoencoder(tmp / "autoencoder", preset="tiny-pixel")
    env = {**os.environ, **ray_head.env(), "MLFLOW_TRACKING_URI": mlflow_server.url}
    run_job(
        "precompute_latents.py",
        [
            "--input",
            tmp / "ucf",
            "--output",
            tmp / "latents",
            "--autoencoder",
            autoencoder,
            "--preset",
            "tiny-pixel",
            "--labels",
            "folder",
        ],
        env,
    )
    common = [
        "--preset",
        "tiny-pixel",
        "--storage",
        tmp / "runs",
        "--latents",
        tmp / "latents",
        "--max-steps",
        6,
        "--batch-size",
        4,
        "--num-workers",
        1,
        "--eval-every",
        6,
        "--checkpoint-every",
        6,
        "--eval-samples",
        1,
    ]
    results = {}
    for stage in ("content", "motion"):
        extra = ["--autoencoder", autoencoder] if stage == "motion" else []
        out = run_job(f"train_{stage}.py", ["--name", f"pixel-{stage}", *common, *extra], env)
        results[stage] = json.loads([line for line in out.splitlines() if line.startswith('{"run_id"')][-1])
    return {"tmp": tmp, "autoencoder": autoencoder, **results}


def test_labels_come_from_the_class_folders(pixel_run):
    table = pq.read_table(pixel_run["tmp"] / "latents" / "latents", columns=["source", "label"])
    pairs = {(Path(s).parent.name, label) for s, label in zip(table["source"].to_pylist(), table["label"].to_pylist())}
    classes = sorted({folder for folder, _ in pairs})
    assert pairs == {(folder, classes.index(folder)) for folder, _ in pairs}


def test_both_class_conditional_stages_train(pixel_run, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    for stage in ("content", "motion"):
        assert pixel_run[stage]["step"] == 6
        run = client.get_run(pixel_run[stage]["run_id"])
        assert run.info.status == "FINISHED" and run.data.params["preset"] == "tiny-pixel"
        assert "eval/loss" in run.data.metrics


def test_generate_a_video_for_a_class(pixel_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    run_job(
        "generate.py",
        [
            "--preset",
            "tiny-pixel",
            "--autoencoder",
            pixel_run["autoencoder"],
            "--content",
            pixel_run["content"]["model"],
            "--motion",
            pixel_run["motion"]["model"],
            "--label",
            2,
            "--steps-content",
            4,
            "--steps-motion",
            4,
            "--out",
            tmp_path,
        ],
        env,
    )
    with av.open(str(tmp_path / "video_000.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16
