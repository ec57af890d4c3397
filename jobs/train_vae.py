"""Train the Stable Diffusion VAE on the videos' frames: the offline stand-in for a pretrained SD (Ray Train).

Only for latent-mode presets without a real SD: a real SD folder or hub id (--stable-diffusion)
already has a trained VAE and skips this job. The base folder's other parts (text encoder,
tokenizer, UNet, scheduler) are copied unchanged; the output is a complete SD folder in the
diffusers layout, <storage>/<name>/model (and MLflow runs:/<run-id>/stable_diffusion), to pass as
--stable-diffusion to every later job.

    python jobs/train_vae.py --preset shapes-latent --name vae-shapes --input videos/ \
        --stable-diffusion out/stand-in-sd --max-steps 300
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script too

from pipelines.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("vae", description=__doc__.splitlines()[0]))
