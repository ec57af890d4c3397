"""jobs/generate.py and jobs/evaluate.py as users run them: a registered CMD bundle, a prompt file
through Ray Data (RAY_ADDRESS set), videos logged to an MLflow run, then the paper's metrics on them.

The models are untrained tiny ones (the training tests train real ones): what is checked here is
the plumbing a user sees, i.e. files written, their frame count, the table and the MLflow run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import StableDiffusion
from cmd_model.dit import DiT
from cmd_model.i3d import InceptionI3d
from cmd_model.presets import get_preset
from pipelines.data.synthetic_videos import make_dataset
from pipelines.platform import registry

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red square moving right", "a blue square moving up"]


def run_job(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, f"jobs/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_sd_dir, mlflow_server):
    """Untrained tiny models registered as version 1 of a CMD bundle, and the run it belongs to."""
    import mlflow

    tmp = tmp_path_factory.mktemp("bundle")
    p = get_preset("tiny")
    torch.manual_seed(0)
    VideoAutoencoder.from_preset_config(p.autoencoder).save_pretrained(tmp / "parts" / "autoencoder")
    DiT.from_preset_config(p.motion).save_pretrained(tmp / "parts" / "motion")
    StableDiffusion.from_pretrained(str(tiny_sd_dir)).unet.save_pretrained(tmp / "parts" / "content")
    folder = registry.make_bundle(
        tmp / "bundle", "tiny", str(tiny_sd_dir), **{part: str(tmp / "parts" / part) for part in registry.PARTS}
    )
    client = mlflow.MlflowClient(mlflow_server.url)
    run = client.create_run(client.create_experiment("cmd-generate-test"), run_name="samples")
    version = registry.register_bundle(mlflow_server.url, "cmd-gen-test", run.info.run_id, folder, {"round": "1"})
    return {"model": f"models:/cmd-gen-test/{version}", "run_id": run.info.run_id, "parts": tmp / "parts", "tmp": tmp}


@pytest.fixture(scope="module")
def generated(bundle, ray_head, mlflow_server):
    prompts = bundle["tmp"] / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # blank lines are skipped
    out = bundle["tmp"] / "samples"
    env = {**os.environ, **ray_head.env(), "MLFLOW_TRACKING_URI": mlflow_server.url}
    run_job(
        "generate.py",
        [
            "--model",
            bundle["model"],
            "--prompts-file",
            str(prompts),
            "--num",
            "2",
            "--steps-content",
            "4",
            "--steps-motion",
            "4",
            "--out",
            str(out),
            "--mlflow-run-id",
            bundle["run_id"],
        ],
        env,
    )
    return out


def test_prompt_file_generates_every_video_through_ray_data(generated):
    videos = sorted(generated.glob("*.mp4"))
    assert [v.stem for v in videos] == [f"video_{i:04d}_{k}" for i in range(len(PROMPTS)) for k in range(2)]
    assert sorted(json.loads((generated / "videos.json").read_text())) == sorted(str(v) for v in videos)
    p = get_preset("tiny")
    with av.open(str(videos[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (*p.video_size, 3)


def test_generated_videos_are_logged_to_the_mlflow_run(generated, bundle, mlflow_server):
    import mlflow

    logged = {
        Path(a.path).name for a in mlflow.MlflowClient(mlflow_server.url).list_artifacts(bundle["run_id"], "samples")
    }
    assert {f"video_{i:04d}_{k}.mp4" for i in range(len(PROMPTS)) for k in range(2)} <= logged


def test_single_prompt_from_folders(bundle, tiny_sd_dir, tmp_path):
    parts = bundle["parts"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    result = run_job(
        "generate.py",
        [
            "--preset",
            "tiny",
            "--autoencoder",
            str(parts / "autoencoder"),
            "--content",
            str(parts / "content"),
            "--motion",
            str(parts / "motion"),
            "--stable-diffusion",
            str(tiny_sd_dir),
            "--prompt",
            PROMPTS[0],
            "--num",
            "2",
            "--steps-content",
            "3",
            "--steps-motion",
            "3",
            "--out",
            str(tmp_path),
        ],
        env,
    )
    assert len(result.stdout.split()) == 2 and (tmp_path / "contact_sheet.gif").is_file()


def test_generate_rejects_a_label_for_a_text_model_in_one_line(bundle, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "jobs/generate.py",
            "--model",
            str(bundle["tmp"] / "bundle"),
            "--label",
            "3",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: preset tiny is text-conditional: use --prompt"
    ]


def test_evaluate_prints_the_paper_table_and_logs_to_mlflow(generated, bundle, tiny_sd_dir, mlflow_server, tmp_path):
    import mlflow

    held_out = make_dataset(tmp_path / "held_out", 3, seed=5).parent
    torch.manual_seed(0)
    i3d = tmp_path / "i3d_pretrained_400.pt"  # random weights in the real I3D layout, a plain state dict
    torch.save(InceptionI3d().state_dict(), i3d)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url}
    result = run_job(
        "evaluate.py",
        [
            "--preset",
            "tiny",
            "--real",
            str(held_out),
            "--autoencoder",
            str(bundle["parts"] / "autoencoder"),
            "--stable-diffusion",
            str(tiny_sd_dir),
            "--generated",
            str(generated),
            "--i3d",
            str(i3d),
            "--mlflow-run-id",
            bundle["run_id"],
        ],
        env,
    )
    results = json.loads(result.stdout.strip().splitlines()[-1])
    protocol = results["protocol"]
    assert protocol["real_videos"] == 3 and protocol["generated_videos"] == 2 * len(PROMPTS)
    assert (
        protocol["fakes"].startswith("lossless") and protocol["seed"] == 0 and "i3d_pretrained_400" in protocol["i3d"]
    )
    assert "fakes: lossless" in result.stdout  # the protocol is printed with the numbers
    assert 0 < results["psnr"] < 100 and -1 <= results["ssim"] <= 1 and results["r_fvd"] >= 0 and results["fvd"] >= 0
    assert "107 (UCF-101" in result.stdout  # the paper's FVD beside ours
    metrics = mlflow.MlflowClient(mlflow_server.url).get_run(bundle["run_id"]).data.metrics
    assert metrics["eval/fvd"] == pytest.approx(results["fvd"]) and "eval/psnr" in metrics
    assert "eval/protocol.json" in {
        a.path for a in mlflow.MlflowClient(mlflow_server.url).list_artifacts(bundle["run_id"], "eval")
    }


def test_readme_evaluate_example_runs_as_written(generated, tiny_clip_dir, tmp_path):
    """--clip without --prompt: the prompts come from the generated folder's index.csv."""
    held_out = make_dataset(tmp_path / "held_out", 2, seed=6).parent
    result = run_job(
        "evaluate.py",
        ["--preset", "tiny", "--real", str(held_out), "--generated", str(generated), "--clip", str(tiny_clip_dir)],
        dict(os.environ),
    )
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert -1 <= results["clipsim"] <= 1 and results["protocol"]["fakes"].startswith("lossless")


def test_evaluate_refuses_missing_weights_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "jobs/evaluate.py",
            "--preset",
            "tiny",
            "--real",
            str(tmp_path),
            "--i3d",
            str(tmp_path / "nope.pt"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        result.returncode == 2 and "nope.pt not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    )
