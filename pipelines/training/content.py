"""Content stage: the model of content frames x̄ (paper Sec. 3.2, Eq. 7).

Latent mode: fine-tune the Stable Diffusion UNet on the `content` latents (already SD latents,
so no re-encoding) with caption features from SD's frozen text encoder, on SD's own noise
schedule; captions are dropped at random for classifier-free guidance.
Pixel mode (UCF-101): train the class-conditional content DiT, labels dropped at random.
Evaluation samples content frames for fixed clips' captions or labels (DDIM + CFG) and logs a
[true | sampled] image grid.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from cmd_model.denoisers import dit_denoiser, unet_denoiser
from cmd_model.diffusion import ddim_sample, diffusion_loss, dit_scheduler
from cmd_model.dit import DiT
from pipelines.data.latent_shards import CONTENT
from pipelines.data.video.schema import CAPTION
from pipelines.training.latent_stage import LatentStage
from pipelines.training.optim import OptimizerSpec
from pipelines.training.stage import image_to_uint8, load_frozen_vae, load_text_encoder

# Text dropout for classifier-free guidance: the pixel DiT's label dropout (0.1, released code)
# applied to captions; SD fine-tunes usually drop 5-10%.
CAPTION_DROPOUT = 0.1


class ContentStage(LatentStage):
    name = "content"
    artifact = "content"
    eval_metrics = ("eval/loss",)
    # Paper App. B.3: Adam 1e-4 (preset), betas (0.9, 0.999), no weight decay, EMA 0.999.
    optimizer = OptimizerSpec(betas=(0.9, 0.999), ema_decay=0.999)

    @classmethod
    def columns(cls, cfg):
        return [CONTENT, cls.condition_column(cfg)]

    def __init__(self, cfg, plan, device):
        super().__init__(cfg, plan, device)
        if self.preset.mode == "latent":
            self.model = UNet2DConditionModel.from_pretrained(cfg.sd_path, subfolder="unet")
            self.scheduler = DDPMScheduler.from_pretrained(cfg.sd_path, subfolder="scheduler")  # SD's own schedule
            self.text = load_text_encoder(cfg.sd_path, device)
            self.null_tokens, _ = self.text.encode_prompts([""])  # SD's unconditional input
        else:
            self.model = DiT.from_preset_config(self.preset.content)
            self.scheduler = dit_scheduler(self.preset.content.prediction_type)
            self.text = None

    def denoiser(self, model, batch: dict, dropout: float = 0.0):
        if self.text is not None:
            tokens, _ = self.text.encode_prompts(batch[CAPTION])
            return unet_denoiser(model, tokens, self.null_tokens, cond_dropout=dropout)
        return dit_denoiser(model, labels=self.labels(batch, self.preset.content.num_classes))

    def loss(self, model, batch):
        return diffusion_loss(self.denoiser(model, batch, CAPTION_DROPOUT), batch[CONTENT], self.scheduler)

    @torch.no_grad()
    def evaluate(self, model, step, logger):
        batch = self.eval_batch
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        eval_loss = diffusion_loss(self.denoiser(model, batch), batch[CONTENT], self.scheduler, generator)
        s = self.preset.sampling
        sampled = ddim_sample(
            self.denoiser(model, batch),
            tuple(batch[CONTENT].shape),
            self.scheduler,
            s.content_steps,
            s.cfg_content,
            torch.Generator().manual_seed(self.cfg.seed),
            self.device,
            clip_sample=self.preset.clip_content,
        )
        vae = self.vae if self.preset.mode == "latent" else None
        true, fake = image_to_uint8(batch[CONTENT], vae), image_to_uint8(sampled, vae)
        grid = np.concatenate([np.concatenate([t, f], axis=1) for t, f in zip(true, fake)], axis=0)
        logger.image(
            grid, f"samples/step_{step:08d}", "content_true_vs_sampled", step=step, key="content_true_vs_sampled"
        )
        return {"eval/loss": float(eval_loss)}

    @functools.cached_property
    def vae(self):
        """The frozen SD VAE that turns sampled content latents into pictures (latent mode), loaded once."""
        return load_frozen_vae(self.cfg.sd_path, self.device)


STAGE = ContentStage
