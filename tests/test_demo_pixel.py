"""Pixel mode (the UCF-101 path) end to end, from one demo run on a user's class folders: more
classes than the preset, labels from the folders, both class-conditional stages, every class
generated, and `jobs/generate.py --label` on the demo's models as a user would run it.

Its own file so that pytest-xdist (one file per worker) runs it beside tests/test_demo.py's latent
run. The precompute job's `--labels folder` is tested in tests/test_precompute.py (`ray job submit`);
the training jobs' flags in tests/test_train.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest

from tests.test_demo import ROOT, index_rows, run_demo, users_folders

CLASSES = 20  # more than the preset's 16 (the pixel demo once refused more than 12)


@pytest.fixture(scope="module")
def pixel_demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pixel-demo")
    videos = users_folders(tmp / "mine", CLASSES, 2)  # 40 videos, 4 held out
    out = tmp / "demo"
    stdout = run_demo(out, "--videos", str(videos), "--steps", "4", "--seeds", "1").stdout
    return {"out": out, "stdout": stdout}


def test_pixel_demo_takes_its_classes_from_the_users_folders(pixel_demo):
    out = pixel_demo["out"]
    rows = index_rows(out / "samples")
    assert len(rows) == CLASSES and {int(r["label"]) for r in rows} == set(range(CLASSES))  # every class generated
    assert "colour right:" in pixel_demo["stdout"]  # magenta, yellow and the rest are CSS4 names: judged
    for stage in ("content", "motion"):
        config = json.loads((out / "runs" / f"demo-{stage}" / "model" / "config.json").read_text())
        assert config["num_classes"] == CLASSES  # from the latents' labels, not the preset's 16


def test_the_training_workers_output_is_in_the_log(pixel_demo):
    # `make demo` trains on Ray Train workers; what they print goes to the log, not the terminal.
    assert "(RayTrainWorker" in (pixel_demo["out"] / "logs" / "demo.log").read_text()
    assert "(RayTrainWorker" not in pixel_demo["stdout"]


def test_labels_come_from_the_class_folders(pixel_demo):
    table = pq.read_table(pixel_demo["out"] / "latents" / "latents", columns=["source", "label"])
    pairs = {(Path(s).parent.name, label) for s, label in zip(table["source"].to_pylist(), table["label"].to_pylist())}
    classes = sorted({folder for folder, _ in pairs})
    assert len(classes) == CLASSES and pairs == {(folder, classes.index(folder)) for folder in classes}


def test_both_class_conditional_stages_train_and_are_tracked(pixel_demo):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{pixel_demo['out'] / 'mlflow.db'}")
    for stage in ("content", "motion"):
        experiment = client.get_experiment_by_name(f"cmd-{stage}")
        (run,) = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = 'demo-{stage}'")
        assert run.info.status == "FINISHED" and run.data.params["preset"] == "shapes-pixel"
        assert "eval/loss" in run.data.metrics  # judged on the held-out videos' latents


def test_the_generate_job_makes_a_video_for_a_class(pixel_demo, tmp_path):
    models = pixel_demo["out"] / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    args = {
        "--preset": "shapes-pixel",
        "--autoencoder": models / "demo-autoencoder" / "model",
        "--content": models / "demo-content" / "model",
        "--motion": models / "demo-motion" / "model",
        "--label": 2,
        "--steps-content": 4,
        "--steps-motion": 4,
        "--out": tmp_path,
    }
    result = subprocess.run(
        [sys.executable, "jobs/generate.py", *(str(x) for kv in args.items() for x in kv)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with av.open(str(tmp_path / "video_000.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16
