"""The flags of the three training jobs (one parser, stage-specific data flags) and their main()."""
from __future__ import annotations

import argparse
import json
import sys

from pipelines import storage
from pipelines.sources import SourceError
from pipelines.tracking import TrackingError
from pipelines.training.config import DEFAULT_STORAGE, ConfigError, TrainConfig

DATA_FLAGS = {
    "vae": ("input", "labels", "stable_diffusion"),
    "autoencoder": ("input", "labels", "stable_diffusion"),
    "content": ("latents", "stable_diffusion"),
    "motion": ("latents", "stable_diffusion", "autoencoder"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object such as {\"depth\": 3}")
    return value


def build_parser(stage: str, description: str = "") -> argparse.ArgumentParser:
    p = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", required=True, help="model preset (cmd_model.presets.PRESETS), e.g. tiny, ucf101-64, webvid-sd21-512x1024")
    p.add_argument("--name", required=True, help="run name; with --storage it identifies the run, and the same pair resumes it")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="checkpoint root: a local folder or s3:// prefix (shared storage on a multi-node cluster)")
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps in all (a resumed run continues to this step)")
    p.add_argument("--batch-size", type=int, help="global batch over all workers (default: the preset's for this stage; paper: 24 autoencoder, 256 diffusion)")
    p.add_argument("--lr", type=float, help="learning rate (default: the paper's for this stage, from the preset)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps (paper: none)")
    p.add_argument("--eval-every", type=int, default=5000, help="steps between evaluations (samples, reconstructions) on rank 0")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (data-parallel replicas)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (bf16 autocast, TF32)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves")
    p.add_argument("--max-failures", type=int, default=0, help="worker-group restarts from the last checkpoint before failing (-1: no limit)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiment", help=f"MLflow experiment (default: cmd-{stage})")
    p.add_argument("--eval-samples", type=int, default=2, help="clips sampled or reconstructed per evaluation")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--ema-decay", type=float, help="EMA decay of the exported weights (default: the stage's; paper 0.999, none for the autoencoder)")
    p.add_argument("--init-from", help="a save_pretrained folder or URI (runs:/, models:/, s3://) whose weights start a run with no checkpoint yet")
    p.add_argument("--model-overrides", type=json_object, default={},
                   help='JSON changes to the stage\'s model config from the preset, e.g. \'{"hidden_size": 64, "depth": 3}\'')
    flags = DATA_FLAGS[stage]
    if stage == "autoencoder":
        p.add_argument("--recon-loss", choices=["l2", "l1", "l1+lpips"],
                       help="reconstruction loss (default: the preset's; paper: l2; the released pixel-mode code: l1+lpips)")
        p.add_argument("--lpips-vgg", help="l1+lpips: torchvision's VGG-16 ImageNet state dict (vgg16-397923af.pth), a local file")
    if "input" in flags:
        p.add_argument("--input", required=True, help="videos: a folder, s3:// prefix, or CSV/Parquet manifest")
        p.add_argument("--labels", choices=["folder"], help="class labels from folder names (UCF-101 layout)")
    if "latents" in flags:
        p.add_argument("--latents", required=True, help="a precompute_latents output folder or s3:// prefix")
    p.add_argument("--stable-diffusion", "--vae", dest="stable_diffusion",
                   help="latent-mode presets: the Stable Diffusion folder (diffusers layout) or hub id")
    if "autoencoder" in flags:
        p.add_argument("--autoencoder", help="the autoencoder that made the latents (folder, s3:// or runs:/); decodes sample videos")
    return p


def config_from_args(stage: str, args: argparse.Namespace) -> TrainConfig:
    fields = {k: v for k, v in vars(args).items() if k != "s3_endpoint_url"}
    return TrainConfig(stage=stage, **fields)


def main(stage: str, argv=None, description: str = "") -> int:
    """Parse, check, train; a wrong value is one line on stderr and exit code 2."""
    from pipelines.training.trainer import fit

    args = build_parser(stage, description).parse_args(argv)
    if args.s3_endpoint_url:
        storage.configure_s3(endpoint_url=args.s3_endpoint_url)
    try:
        result = fit(config_from_args(stage, args))
    except (ConfigError, SourceError, TrackingError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"run_id": result.run_id, "step": result.step, "model": result.model,
                      "model_uri": result.model_uri, "checkpoint": result.checkpoint, "metrics": result.metrics}))
    return 0
