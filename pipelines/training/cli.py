"""The flags of the training jobs, generated from TrainConfig's fields (pipelines.platform.flags), and their main()."""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.data.sources import SourceError
from pipelines.platform import storage
from pipelines.platform.flags import OneLineParser, add_flags, values
from pipelines.platform.tracking import TrackingError
from pipelines.training.config import ConfigError, TrainConfig

__all__ = ["DATA_FLAGS", "OneLineParser", "build_parser", "config_from_args", "main"]

# What each job trains on (TrainConfig's stage-specific fields; tests/test_infra.py reads this).
DATA_FLAGS = {
    "vae": ("input", "labels", "stable_diffusion"),
    "autoencoder": ("input", "labels", "stable_diffusion"),
    "content": ("latents", "stable_diffusion"),
    "motion": ("latents", "stable_diffusion", "autoencoder"),
}


def build_parser(stage: str, description: str = "") -> argparse.ArgumentParser:
    p = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, TrainConfig, stage)
    # Not a TrainConfig field: it configures this process's S3 access (pipelines.platform.storage), not the run.
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    return p


def config_from_args(stage: str, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(stage=stage, **values(TrainConfig, args))


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
    print(
        json.dumps(
            {
                "run_id": result.run_id,
                "step": result.step,
                "model": result.model,
                "model_uri": result.model_uri,
                "checkpoint": result.checkpoint,
                "metrics": result.metrics,
            }
        )
    )
    return 0
