"""Train the Stable Diffusion VAE on the videos' frames: the offline stand-in for a pretrained SD (Ray Train).

Only for latent-mode presets without a real SD: a real SD folder or hub id (--stable-diffusion)
already has a trained VAE and skips this job. The base folder's other parts (text encoder,
tokenizer, UNet, scheduler) are copied unchanged; the output is a complete SD folder in the
diffusers layout, <storage>/<name>/model (and MLflow runs:/<run-id>/stable_diffusion), to pass as
--stable-diffusion to every later job.

    python jobs/train_vae.py --preset shapes-latent --name vae-shapes --input videos/ \
        --stable-diffusion out/stand-in-sd --max-steps 300
"""

import sys

from pipelines.training.cli import main as train


def main(argv=None) -> int:
    return train("vae", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
