"""The whole CMD chain on the tiny preset, on the CPU, with no network (`make demo`).

Steps:
1. videos     write a few short captioned videos of moving shapes
2. SD         build a tiny Stable Diffusion in the diffusers layout (stands in for SD 1.5 / 2.1)
3. train      the video autoencoder (Ray Train, on the videos)
4. precompute content and motion latents (Ray Data -> Parquet)
5. train      the content model (SD UNet) and the motion DiT (Ray Train, on the latents)
6. sweep      a 2-trial Ray Tune sweep of the motion DiT (one MLflow child run per trial)
7. generate   a few videos from prompts (mp4 + gif contact sheet)
8. evaluate   reconstruction PSNR/SSIM on the videos
Every run lands in a local MLflow store (sqlite) under the output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per training stage")
    p.add_argument("--trials", type=int, default=2, help="Ray Tune trials (0 skips the sweep)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray port on 127.0.0.1
    # The demo prints one line per step; Ray Data's per-operator bars would bury them. The local Ray
    # started below, and so every worker, inherits this variable.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    # Imported here so `--help` answers at once.
    from cmd_model.content import build_tiny_sd
    from cmd_model.presets import get_preset
    from pipelines.evaluation import evaluate, table
    from pipelines.generation import GeneratorSpec, generate
    from pipelines.precompute import PrecomputeConfig, run as precompute
    from pipelines.synthetic_videos import make_dataset
    from pipelines.training import TrainConfig, fit

    preset = get_preset("tiny")
    start = time.monotonic()
    say = lambda msg: print(f"[demo {time.monotonic() - start:6.1f}s] {msg}", flush=True)

    manifest = make_dataset(out / "videos", args.videos)
    held_out = make_dataset(out / "held_out", 2, seed=1)
    sd = str(build_tiny_sd(out / "tiny-sd", text_dim=preset.motion.text_dim))
    say(f"{args.videos} videos in {manifest.parent}, tiny Stable Diffusion in {sd}")

    common = dict(preset=preset.name, storage=str(out / "runs"), max_steps=args.steps, batch_size=4,
                  eval_every=max(1, args.steps // 2), checkpoint_every=max(1, args.steps // 2), stable_diffusion=sd)
    ae = fit(TrainConfig(stage="autoencoder", name="demo-autoencoder", input=str(manifest), **common))
    say(f"autoencoder trained: {ae.model} (MLflow run {ae.run_id})")

    summary = precompute(PrecomputeConfig(input=str(manifest), output=str(out / "latents"), autoencoder=ae.model,
                                          preset=preset, stable_diffusion=sd))
    say(f"latents: {summary['clips_total']} clips in {out / 'latents'}")

    latents = str(out / "latents")
    content = fit(TrainConfig(stage="content", name="demo-content", latents=latents, **common))
    say(f"content model trained: {content.model}")
    motion = fit(TrainConfig(stage="motion", name="demo-motion", latents=latents, autoencoder=ae.model, **common))
    say(f"motion DiT trained: {motion.model}")

    if args.trials:
        from pipelines.tune import SweepConfig, run_sweep

        sweep = run_sweep(SweepConfig(
            stage="motion", name="demo-sweep", search=str(Path(__file__).resolve().parents[1] / "infra" / "sweeps" / "demo.yaml"),
            num_samples=args.trials, max_concurrent=1,
            train=dict(latents=latents, autoencoder=ae.model, **{**common, "max_steps": max(4, args.steps // 4)}),
        ))
        say(f"sweep: best trial {sweep['best_trial']} ({sweep['metric']}={sweep['best_value']:.4f})")

    spec = GeneratorSpec(preset, ae.model, content.model, motion.model, sd)
    videos = generate(spec, str(out / "samples"), prompts=["a red square moving right", "a blue square moving up"] * 2, seed=0)
    say(f"{len(videos)} videos in {out / 'samples'}")

    results = evaluate(preset, str(held_out.parent), autoencoder=ae.model, stable_diffusion=sd)
    print(table(results))
    (out / "evaluation.json").write_text(json.dumps(results, indent=2))

    print(f"\nDone in {time.monotonic() - start:.0f} s.")
    print(f"Videos:     {out / 'samples'}  (contact_sheet.gif shows them all)")
    print(f"MLflow UI:  mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']}   # then open http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
