"""`make demo` with a smaller step count: the whole chain on the tiny preset, as a newcomer runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_whole_chain(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    result = subprocess.run([sys.executable, "-m", "pipelines.demo", "--out", str(out), "--steps", "4", "--videos", "4", "--trials", "2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout
    videos = sorted((out / "samples").glob("*.mp4"))
    assert len(videos) == 4 and (out / "samples" / "contact_sheet.gif").is_file()
    with av.open(str(videos[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16
    assert {"psnr", "ssim"} <= set(json.loads((out / "evaluation.json").read_text()))

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    names = {e.name for e in client.search_experiments()}
    assert {"cmd-autoencoder", "cmd-content", "cmd-motion"} <= names
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 3 + 1 + 2  # three stages, the sweep's parent and its two trials
