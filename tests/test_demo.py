"""`make demo` as a newcomer runs it (fewer steps), and `--videos DIR` on a user's own videos.

By default the demo prints its own lines only; Ray's and MLflow's go to OUT/logs/demo.log, whose
tail it shows when it fails.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import av

from pipelines.data.synthetic_videos import make_dataset, make_shapes_dataset
from pipelines.demo import classes_of, error_line, steps_logged, stratified_split, user_data

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path, *flags: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--out", str(out), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if ok:
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def index_rows(samples: Path) -> list[dict]:
    with open(samples / "index.csv") as f:
        return list(csv.DictReader(f))


def users_folders(root: Path, classes: int, per_class: int) -> Path:
    """Class folders as a user has them (red_right/, ..., no manifest): the folder name says what is in it."""
    make_shapes_dataset(root, per_class, classes, seed=7)
    (root / "manifest.csv").unlink()
    return root


def test_demo_runs_the_whole_chain_on_a_users_class_folders(tmp_path):
    # Latent mode (the longer path: the stand-in SD's VAE stage first) on 3 class folders as a user
    # has them; pixel mode in tests/test_demo_pixel.py (tests/test_learning.py covers what its
    # models learn).
    videos = users_folders(tmp_path / "mine", 3, 8)
    out = tmp_path / "demo"
    # No sweep here (tests/test_tune.py runs one, with a fault): each trial is mostly Ray Train's start-up.
    # Ray Train's local mode here; the pixel demo (tests/test_demo_pixel.py) runs on workers, as `make demo` does.
    result = run_demo(
        out, "--mode", "latent", "--videos", str(videos), "--steps", "4", "--seeds", "2", "--num-workers", "0"
    )
    stdout = result.stdout
    # Quiet: the demo's own lines (here 41: each of 9 stages' start and end, a terminal shows one
    # live line instead; the table of 6 videos; where things are). Everything else, Ray's C++ lines
    # and its workers' included, is in the log (before, a run like this printed about 130 lines, most of them Ray's).
    assert len(stdout.splitlines()) < 45 and not result.stderr, stdout + result.stderr
    assert not any(noise in stdout for noise in ("core_worker", " INFO ", "(RayTrainWorker", "(TrainController")), (
        stdout
    )
    log = (out / "logs" / "demo.log").read_text()
    # (Ray Train workers' lines: tests/test_demo_pixel.py; here the loop runs in the demo's process.)
    assert "Started a local Ray instance" in log and "mlflow" in log
    assert f"Logs:       {out / 'logs' / 'demo.log'}" in stdout
    # Warnings fixed at their source: Ray Train's preemption watcher on a local Ray (an error-level
    # core_worker.cc line per fit), torch's on the read-only latents collate_latents got from Ray.
    assert "PreemptionWatcher" not in log and "not writable" not in log
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
    assert {r["prompt"] for r in rows} == {"red right", "red left", "red down"}
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
    # A training stage's bar counts the steps its run has logged.
    uri = f"sqlite:///{out / 'mlflow.db'}"
    assert [
        steps_logged(uri, s, f"demo-{s}", str(out / "runs")) for s in ("vae", "autoencoder", "content", "motion")
    ] == [4] * 4
    assert steps_logged(uri, "motion", "demo-nothing", str(out / "runs")) is None


def test_a_failing_demo_shows_its_error_and_the_tail_of_its_log(tmp_path):
    # One video: the demo refuses it in its first stage, after MLflow made its store (logged to the log).
    videos = users_folders(tmp_path / "mine", 1, 1).resolve()
    out = tmp_path / "demo"
    result = run_demo(out, "--videos", str(videos), ok=False)
    assert result.returncode == 1
    log = out / "logs" / "demo.log"
    assert "the last" in result.stderr and str(log) in result.stderr
    assert "Creating initial MLflow database tables" in result.stderr  # MLflow's line, from the log's tail
    assert (
        result.stderr.splitlines()[-1]
        == f"error in the videos stage: {videos} holds 1 video(s); the demo needs at least 2"
    )
    assert "Creating initial MLflow database tables" not in result.stdout and "videos ..." in result.stdout


def test_error_line_is_the_errors_last_line():
    wrapped = RuntimeError(
        "Training failed due to worker errors:\nTraceback (most recent call last):\nValueError: bad batch"
    )
    assert error_line(wrapped, "motion") == "error in the motion stage: ValueError: bad batch"
    assert error_line(KeyError("x"), None) == "error: KeyError: 'x'"
    assert error_line(SystemExit("error: no videos"), "videos") == "error in the videos stage: no videos"


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


def test_held_out_split_is_stratified_by_class():
    def rows(counts):
        return [{"label": k, "i": i} for k, n in enumerate(counts) for i in range(n)]

    for counts in ([4] * 16, [10, 10, 10], [1, 1, 9], [1, 1]):
        train, held = stratified_split(rows(counts), "label")
        assert len(held) == max(1, sum(counts) // 10) or all(c == 1 for c in counts)
        assert len(train) + len(held) == sum(counts)
        # Every class keeps a training video; a class of one is never held out; none gives up two
        # while another with more than one gave up none.
        assert {r["label"] for r in train} == set(range(len(counts)))
        held_per_class = [sum(r["label"] == k for r in held) for k in range(len(counts))]
        assert all(h == 0 for h, c in zip(held_per_class, counts) if c == 1)
    assert len({r["label"] for r in stratified_split(rows([4] * 16), "label")[1]}) == 6  # 6 classes give one each
