"""`make demo` as a newcomer runs it (fewer steps), and `--videos DIR` on a user's own videos."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import av

from pipelines.demo import classes_of, user_data
from pipelines.synthetic_videos import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path, *flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--out", str(out), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def index_rows(samples: Path) -> list[dict]:
    with open(samples / "index.csv") as f:
        return list(csv.DictReader(f))


def test_demo_runs_the_whole_chain_on_a_users_class_folders(tmp_path):
    # Latent mode (the longer path: the stand-in SD's VAE stage first) on class folders as a user
    # has them; the built-in data and pixel mode go through the same chain (tests/test_learning.py
    # and tests/test_pixel_mode.py cover pixel mode's models and jobs).
    videos = tmp_path / "mine"
    make_dataset(videos, 24)  # red_right/, red_left/, ...: the folder name says what is in it
    (videos / "manifest.csv").unlink()  # only folders, as a user's would be
    out = tmp_path / "demo"
    # No sweep here (tests/test_tune.py runs one, with a fault): each trial is mostly Ray Train's start-up.
    stdout = run_demo(out, "--mode", "latent", "--videos", str(videos), "--steps", "4", "--trials", "0")
    assert (
        "mlflow ui --backend-store-uri sqlite:///" in stdout
        and f"--default-artifact-root {out / 'mlartifacts'}" in stdout
    )
    assert "?workflowType=machine_learning" in stdout  # the link opens MLflow on the runs, not on GenAI traces
    assert "colour right:" in stdout and "direction right:" in stdout  # folder names say colour and direction: judged
    samples = out / "samples"
    rows = index_rows(samples)
    train_classes = classes_of(out / "data" / "train.csv", "latent")
    assert len(rows) == 2 * len(train_classes) and {r["seed"] for r in rows} == {"0", "1"}
    assert {r["prompt"] for r in rows} <= {
        f"{c} {d}" for c in ("red", "green", "blue") for d in ("right", "left", "down", "up")
    }
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in samples.glob("*.mp4"))
    assert (samples / "contact_sheet.gif").is_file()
    with av.open(str(samples / rows[0]["file"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16
    judged = json.loads((out / "judged.json").read_text())
    assert judged["samples"] == len(rows) and {r["file"] for r in judged["rows"]} == {r["file"] for r in rows}
    assert {"psnr", "ssim"} <= set(json.loads((out / "evaluation.json").read_text()))
    # The stand-in SD with its trained VAE is a complete diffusers folder, as a real SD is.
    assert all(
        (out / "runs" / "demo-vae" / "model" / part).is_dir()
        for part in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
    )

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiments = client.search_experiments()
    assert {"cmd-vae", "cmd-autoencoder", "cmd-content", "cmd-motion", "cmd-demo"} <= {e.name for e in experiments}
    for e in experiments:  # everything under --out
        if e.name != "Default":
            assert e.artifact_location.startswith(str(out)), e.artifact_location
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) >= 4 + 1  # four stages and the demo's own run
    assert not (ROOT / "mlruns").exists()
    ae = next(r for r in runs if r.info.run_name == "demo-autoencoder")
    # Step-indexed images (the UI's slider): the autoencoder's input | reconstruction at each evaluation.
    assert any("autoencoder_input_vs_reconstruction" in a.path for a in client.list_artifacts(ae.info.run_id, "images"))


def test_user_manifest_and_folders_become_train_and_held_out(tmp_path):
    manifest = make_dataset(tmp_path / "v", 20)
    train, held = user_data(str(manifest), tmp_path / "out", "latent")
    with open(train) as f:
        train_rows = list(csv.DictReader(f))
    with open(held) as f:
        held_rows = list(csv.DictReader(f))
    assert len(train_rows) == 18 and len(held_rows) == 2
    assert train_rows[0]["caption"] == "a red square moving right" and Path(train_rows[0]["path"]).is_file()
    assert len(classes_of(train, "latent")) == 12

    (tmp_path / "v" / "manifest.csv").unlink()
    train, _ = user_data(str(tmp_path / "v"), tmp_path / "out2", "latent")
    captions = {text for text, _ in classes_of(train, "latent")}
    assert "red right" in captions and "blue up" in captions  # folder name, '_' as spaces
