"""Scheduled incremental retraining: process new videos only, retrain, register, promote if better.

    python jobs/retrain.py --input videos/ --workdir out/retrain --preset tiny --held-out held_out/ \
        --stable-diffusion out/tiny-sd --max-steps 40 --model-name cmd-demo
    ray job submit --working-dir . -- python jobs/retrain.py --input s3://bucket/videos/ \
        --workdir s3://bucket/retrain --preset webvid-sd21-512x1024 --held-out s3://bucket/held-out/ \
        --model-name cmd-webvid --num-workers 8 --use-gpu
Run it on a schedule (infra/kuberay/raycronjob-retrain.yaml). Idempotent: with nothing new it
says so and stops; a round that died midway is finished by the next run.
"""

from __future__ import annotations

import argparse
import sys

from cmd_model.presets import PRESETS
from pipelines.retrain import RetrainConfig, run_round


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="where new videos land (folder, s3:// prefix or manifest)")
    p.add_argument("--workdir", required=True, help="state, latents and checkpoints (folder or s3:// prefix)")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--held-out", required=True, help="fixed held-out videos for the promotion metric")
    p.add_argument("--model-name", default="cmd", help="MLflow registered model name")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true", help="train and encode on GPUs (one per worker)")
    p.add_argument(
        "--decoders",
        type=int,
        help="video-decoding tasks (default: the CPUs the cluster has up now; give it where it scales from zero)",
    )
    p.add_argument(
        "--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step (every training job)"
    )
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute activations in the backward pass (every job)"
    )
    p.add_argument(
        "--gpu-gib", type=float, default=80.0, help="GPU memory, GiB: a round whose jobs cannot fit refuses to start"
    )
    p.add_argument("--stable-diffusion", help="latent mode: the SD folder or hub id")
    p.add_argument("--experiment", default="cmd-retrain")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = RetrainConfig(
        input=args.input,
        workdir=args.workdir,
        preset=args.preset,
        held_out=args.held_out,
        model_name=args.model_name,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        decoders=args.decoders,
        grad_accum_steps=args.grad_accum_steps,
        grad_checkpointing=args.grad_checkpointing,
        gpu_gib=args.gpu_gib,
        stable_diffusion=args.stable_diffusion,
        experiment=args.experiment,
    )
    try:
        run_round(cfg)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
