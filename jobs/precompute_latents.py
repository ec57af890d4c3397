"""Precompute CMD content and motion latents from videos into Parquet shards.

Locally (starts a Ray on this machine):
    python jobs/precompute_latents.py --input videos/ --output out/latents --autoencoder out/autoencoder \
        --preset tiny --vae out/tiny-sd
On a cluster:
    ray job submit --working-dir . -- python jobs/precompute_latents.py --input s3://bucket/videos/ \
        --output s3://bucket/latents/v3 --autoencoder runs:/<run-id>/autoencoder --preset webvid-sd21-512x1024 \
        --vae stabilityai/stable-diffusion-2-1-base
Rerunning with the same --output finishes only what is missing; --overwrite starts over.
S3 credentials and endpoint come from the AWS_* variables (or --s3-endpoint-url); they are never printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script too

from cmd_model.presets import PRESETS, get_preset  # noqa: E402
from pipelines import storage  # noqa: E402
from pipelines.precompute import PrecomputeConfig, run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="video folder, s3:// prefix, or CSV/Parquet manifest with a path column")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    p.add_argument("--autoencoder", required=True, help="save_pretrained folder, s3:// prefix or MLflow runs:/ URI")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--vae", "--stable-diffusion", dest="vae", help="latent mode: Stable Diffusion folder (diffusers layout) or hub id")
    p.add_argument("--clips-per-video", type=int, help="N evenly spaced clips per video (default: all non-overlapping)")
    p.add_argument("--frame-stride", type=int, help="take every k-th source frame (default: the preset's)")
    p.add_argument("--target-fps", type=float, help="sample frames at this rate instead of a fixed stride")
    p.add_argument("--labels", choices=["folder"], help="class labels from folder names (UCF-101 layout)")
    p.add_argument("--overwrite", action="store_true", help="delete what the output holds and start over")
    p.add_argument("--encode-batch-size", type=int, default=16)
    p.add_argument("--rows-per-shard", type=int, default=1024, help="clips per Parquet shard")
    p.add_argument("--flush-seconds", type=float, default=10.0, help="a shard is also written after this long, full or not")
    p.add_argument("--writers", type=int, help="shard-writing actors (default: 1 per 16 encoders)")
    p.add_argument("--decode-timeout", type=float, default=120.0, help="seconds before a video's decoder is killed")
    p.add_argument("--decoders", type=int, help="decode actors (default: the cluster's free CPUs)")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.s3_endpoint_url:
        storage.configure_s3(endpoint_url=args.s3_endpoint_url)
    try:
        for name in ("clips_per_video", "frame_stride", "encode_batch_size", "rows_per_shard", "decoders", "writers"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
        cfg = PrecomputeConfig(
            input=args.input, output=args.output, autoencoder=args.autoencoder, preset=get_preset(args.preset),
            stable_diffusion=args.vae, clips_per_video=args.clips_per_video, frame_stride=args.frame_stride,
            target_fps=args.target_fps, labels=args.labels, overwrite=args.overwrite,
            encode_batch_size=args.encode_batch_size, rows_per_shard=args.rows_per_shard,
            decode_timeout_s=args.decode_timeout, decoders=args.decoders, flush_seconds=args.flush_seconds,
            writers=args.writers,
        )
        if not cfg.flush_seconds > 0:
            raise ValueError(f"--flush-seconds must be > 0, got {cfg.flush_seconds}")
        summary = run(cfg)
    except (ValueError, OSError) as exc:  # config, storage and source errors: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
