"""Evaluate CMD models: reconstruction PSNR/SSIM (+ R-FVD), FVD, cd-FVD and CLIPSIM, beside the paper's numbers.

    python jobs/evaluate.py --preset tiny --real held_out_videos/ --autoencoder out/ae --stable-diffusion out/tiny-sd
    python jobs/evaluate.py --preset ucf101-64 --real ucf101/test/ --generated out/samples --i3d weights/i3d
Protocol (StyleGAN-V's, as the paper): one random 16-frame clip per real video, seeded (--seed);
generated videos are read from the generator's lossless .npz arrays when present (else the mp4s
are decoded, and the output says so); I3D (400 logits) is DeepMind's Kinetics-400 network from a
folder `cmd-weights i3d` wrote, or the PyTorch port with TATS/PVDM/CMD's i3d_pretrained_400.pt;
the covariance divides by N. CLIPSIM prompts come from the
generated folder's index.csv unless --prompt / --prompts-file is given. I3D weights and CLIP (a
transformers folder) are local paths only. --mlflow-run-id logs the metrics (eval/*) and the
protocol (eval/protocol.json) to that run. Videos stream through 8 at a time and only per-video
features are kept, so memory does not grow with --max-videos; every network runs on the GPU when
there is one (the protocol's `device` line says where).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cmd_model.presets import PRESETS, get_preset
from pipelines.evaluation.evaluate import evaluate, table
from pipelines.platform import storage


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--real", required=True, help="held-out real videos (folder, s3:// prefix or manifest)")
    p.add_argument("--autoencoder", help="reconstruction metrics of this autoencoder")
    p.add_argument("--generated", help="a folder of generated videos (jobs/generate.py --out)")
    p.add_argument("--stable-diffusion", help="latent mode: the SD folder whose VAE the autoencoder works on")
    p.add_argument(
        "--i3d",
        help="I3D Kinetics-400 weights, for FVD / R-FVD: a folder from `cmd-weights i3d` (DeepMind's) or the "
        "PyTorch port's i3d_pretrained_400.pt",
    )
    p.add_argument(
        "--videomae", help="VideoMAE-v2 ViT-g/14 weights (vit_g_hybrid_pt_1200e_ssv2_ft.pth), for content-debiased FVD"
    )
    p.add_argument("--clip", help="CLIP folder (transformers layout), for CLIPSIM")
    p.add_argument("--prompt", help="the prompt of every generated video (CLIPSIM)")
    p.add_argument("--prompts-file", help="one prompt per generated video, in file-name order (CLIPSIM)")
    p.add_argument("--max-videos", type=int, default=2048, help="videos per side (the paper: 2,048)")
    p.add_argument(
        "--seed", type=int, default=0, help="chooses each real video's random clip (recorded with the results)"
    )
    p.add_argument("--mlflow-run-id")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        for flag in ("i3d", "videomae", "clip"):
            if getattr(args, flag) and not os.path.exists(getattr(args, flag)):
                raise ValueError(f"--{flag} {getattr(args, flag)} not found (weights load from local paths only)")
        prompts = [args.prompt] if args.prompt else None
        if args.prompts_file:
            prompts = [line.strip() for line in storage.read_text(args.prompts_file).splitlines() if line.strip()]
        results = evaluate(
            get_preset(args.preset),
            args.real,
            args.autoencoder,
            args.generated,
            args.stable_diffusion,
            args.i3d,
            args.clip,
            prompts,
            args.max_videos,
            args.seed,
            args.videomae,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(results))
    print(json.dumps(results))
    if args.mlflow_run_id:
        from pipelines.platform import tracking

        client = tracking.client(tracking.tracking_uri())
        for key, value in results.items():
            if key != "protocol":
                client.log_metric(args.mlflow_run_id, f"eval/{key}", float(value))
        client.log_dict(args.mlflow_run_id, results["protocol"], "eval/protocol.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
