"""VAE stage: train the Stable Diffusion VAE on the training videos' frames (the offline stand-in for a real SD).

Latent-mode CMD runs on frames encoded by SD's VAE. A real SD folder (`--stable-diffusion`)
brings a pretrained VAE and nothing here runs. Where no weights can be downloaded (this
machine, CI, an air-gapped cluster), the stand-in SD built by `cmd_model.content.build_tiny_sd`
has a random VAE whose latents decode to noise; this stage trains it on single frames first, as
SD's VAE was trained on images, so that every later stage (autoencoder, content UNet, motion
DiT, generation) sees latents that decode back to pictures.

Data: the autoencoder stage's clips (Ray Data decoders), FRAMES_PER_CLIP random frames of each.
Loss: l2 reconstruction of a posterior sample + KL_WEIGHT x KL to N(0, I), per element, as the
LDM autoencoders (the perceptual and GAN terms are left out: flat shapes need neither).
Export: the whole SD folder (the base SD's other parts, copied, and the trained vae/) with
`scaling_factor` = 1 / std of the held-out frames' latents, the statistic SD's 0.18215 came from,
so the diffusion models see unit-variance latents. Use it as `--stable-diffusion` of every later job.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmd_model.content import load_vae, uint8_to_unit, unit_to_uint8
from cmd_model.metrics import psnr
from pipelines.platform.model_store import SD_PARTS, is_hub_id
from pipelines.training.autoencoder import AutoencoderStage
from pipelines.training.config import ConfigError
from pipelines.training.latent_stage import check_stable_diffusion
from pipelines.training.optim import OptimizerSpec

FRAMES_PER_CLIP = 4  # frames of one clip are near-duplicates; a few per clip is enough
KL_WEIGHT = 1e-6  # LDM's kl-f8 weight: a near-deterministic, well-conditioned latent


def vae_forward(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction of a posterior sample, KL to N(0, I) per element)."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    return recon, posterior.kl().mean() / posterior.mean[0].numel()


class TrainableVAE(torch.nn.Module):
    """SD's AutoencoderKL with a training forward. Under several workers the loop wraps the stage's
    model in DDP, whose gradient all-reduce is armed only by a call of the wrapper's forward:
    calling encode/decode on the wrapped module (as this stage once did) trained one VAE per
    worker, and exported rank 0's."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae_forward(self.vae, x)

    def enable_gradient_checkpointing(self, func) -> None:  # --grad-checkpointing (loop.build_trainee)
        self.vae.enable_gradient_checkpointing(func)

    @classmethod
    def from_pretrained(cls, path: str) -> TrainableVAE:  # --init-from (loop.init_weights)
        return cls(load_vae(path))


class VAEStage(AutoencoderStage):
    name = "vae"
    artifact = "stable_diffusion"
    eval_metrics = ("eval/mse", "eval/psnr")
    # LDM autoencoders: Adam, betas (0.5, 0.9), no EMA.
    optimizer = OptimizerSpec(betas=(0.5, 0.9), ema_decay=None)

    @classmethod
    def prepare(cls, cfg):
        if cfg.model_preset.mode != "latent":
            raise ConfigError(f"preset {cfg.preset} is in pixel mode: it has no Stable Diffusion VAE to train")
        plan = super().prepare(cfg)  # videos, held-out split, the SD folder's layout
        if is_hub_id(cfg.sd_path) and not Path(cfg.sd_path).is_dir():
            raise ConfigError(
                "the vae stage starts from a Stable Diffusion folder (local, s3:// or MLflow; diffusers layout), "
                f"not the hub id {cfg.sd_path}"
            )
        return plan

    def __init__(self, cfg, plan, device):
        self.cfg, self.plan, self.device = cfg, plan, device
        self.preset = cfg.model_preset
        self.model = TrainableVAE(load_vae(cfg.sd_path))
        self.model.train()

    def frames(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 clips [B, L, H, W, 3] -> FRAMES_PER_CLIP random frames of each, float [N, 3, H, W] in [-1, 1]."""
        b, length = clips.shape[:2]
        pick = torch.stack([torch.randperm(length)[:FRAMES_PER_CLIP] for _ in range(b)])
        chosen = clips[torch.arange(b)[:, None], pick]  # [B, K, H, W, 3]
        return uint8_to_unit(chosen.flatten(0, 1).to(self.device))

    def loss(self, model, batch):
        from pipelines.data.video.schema import FRAMES

        x = self.frames(batch[FRAMES])
        recon, kl = model(x)  # through DDP's forward when there are several workers
        return F.mse_loss(recon.float(), x.float()) + KL_WEIGHT * kl

    @torch.no_grad()
    def evaluate(self, model, step, logger):
        clips = self.eval_frames
        if clips is None:
            return {}
        model = model.vae  # the AutoencoderKL
        x = uint8_to_unit(clips[:, :: max(1, clips.shape[1] // 4)].flatten(0, 1).to(self.device))  # 4 frames per clip
        recon = model.decode(model.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        true, fake = unit_to_uint8(x), unit_to_uint8(recon)
        rows = [np.stack([t, f]) for t, f in zip(true, fake)]  # each frame above its reconstruction
        grid = np.concatenate([np.concatenate(list(pair), axis=0) for pair in rows], axis=1)
        logger.image(
            grid,
            f"reconstructions/step_{step:08d}",
            "frames_true_over_reconstructed",
            step=step,
            key="vae_reconstructions",
        )
        return {
            "eval/mse": float(F.mse_loss(recon.float(), x.float())),
            "eval/psnr": psnr(true, fake),
        }  # per-frame PSNR, averaged

    @torch.no_grad()
    def export(self, model, directory) -> None:
        """The base SD folder with this VAE in vae/, its scaling_factor fitted to the latents."""
        directory, model = Path(directory), model.vae
        for part in SD_PARTS:
            if part != "vae":
                shutil.copytree(Path(self.cfg.sd_path) / part, directory / part)
        clips = self.eval_frames
        if clips is not None:
            x = uint8_to_unit(clips.flatten(0, 1).to(self.device))
            latents = torch.cat([model.encode(part).latent_dist.mode() for part in x.split(64)])
            model.register_to_config(scaling_factor=float(1.0 / latents.float().std().clamp_min(1e-6)))
        model.save_pretrained(directory / "vae")
        check_stable_diffusion(str(directory))


STAGE = VAEStage
