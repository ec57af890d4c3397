"""Motion stage: the motion DiT learns z | content frame, text or class (paper Sec. 3.2, Eq. 8).

Batch: motion [B, D, L, h'+w'] (x0), content [B, C, H, W] (dense context tokens), and a
caption (latent mode: SD's pooled text feature, through the DiT's linear projection) or a
class label (pixel mode). Evaluation samples z for fixed clips with their true content frame
(the paper's "motion prediction" setting, Table 4a) and, given --autoencoder, decodes
[true | sampled] side by side into mp4/gif.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.denoisers import dit_denoiser
from cmd_model.diffusion import ddim_sample, diffusion_loss, dit_scheduler
from cmd_model.dit import DiT
from pipelines.data.latent_shards import CONTENT, MOTION
from pipelines.data.video.schema import CAPTION
from pipelines.platform.model_store import fetch_model
from pipelines.training.latent_stage import LatentStage
from pipelines.training.optim import OptimizerSpec
from pipelines.training.stage import frame_grid, load_frozen_vae, load_text_encoder, side_by_side, video_to_uint8


class MotionStage(LatentStage):
    name = "motion"
    artifact = "motion"
    eval_metrics = ("eval/loss", "eval/motion_mse")
    # Paper App. B.3: Adam 1e-4 (preset), betas (0.9, 0.999), no weight decay, EMA 0.999.
    optimizer = OptimizerSpec(betas=(0.9, 0.999), ema_decay=0.999)

    @classmethod
    def columns(cls, cfg):
        return [MOTION, CONTENT, cls.condition_column(cfg)]

    def __init__(self, cfg, plan, device):
        super().__init__(cfg, plan, device)
        self.model = DiT.from_preset_config(self.preset.motion)
        self.scheduler = dit_scheduler(self.preset.motion.prediction_type)
        self.text = load_text_encoder(cfg.sd_path, device) if self.preset.motion.text_dim else None

    def condition(self, batch: dict) -> dict:
        if self.text is not None:
            _, pooled = self.text.encode_prompts(batch[CAPTION])
            return {"text": pooled}
        return {"labels": self.labels(batch, self.preset.motion.num_classes)}

    def loss(self, model, batch):
        denoise = dit_denoiser(model, content=batch[CONTENT], **self.condition(batch))
        return diffusion_loss(denoise, batch[MOTION], self.scheduler)

    @torch.no_grad()
    def evaluate(self, model, step, logger):
        batch = self.eval_batch
        cond = self.condition(batch)
        # Fixed noise and timesteps: a validation loss comparable across evaluations.
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        eval_loss = diffusion_loss(
            dit_denoiser(model, content=batch[CONTENT], **cond), batch[MOTION], self.scheduler, generator
        )
        s = self.preset.sampling
        sampled = ddim_sample(
            dit_denoiser(model, content=batch[CONTENT], **cond),
            tuple(batch[MOTION].shape),
            self.scheduler,
            s.motion_steps,
            s.cfg_motion,
            torch.Generator().manual_seed(self.cfg.seed),
            self.device,
        )
        metrics = {"eval/loss": float(eval_loss), "eval/motion_mse": float(F.mse_loss(sampled, batch[MOTION]))}
        if self.cfg.autoencoder:
            decoder, vae = self.decoders
            true = video_to_uint8(decoder.decode(batch[CONTENT], batch[MOTION]), vae)
            fake = video_to_uint8(decoder.decode(batch[CONTENT], sampled), vae)
            for i in range(len(true)):
                logger.video(
                    side_by_side(true[i], fake[i]), f"samples/step_{step:08d}", f"clip{i}_true_vs_sampled", s.fps
                )
            # Frame strips (true | sampled motion) as a step-indexed image: the UI's slider shows them improve.
            logger.image(
                frame_grid([side_by_side(t, f) for t, f in zip(true, fake)]),
                "samples",
                "latest",
                step=step,
                key="motion_true_vs_sampled",
            )
        return metrics

    @functools.cached_property
    def decoders(self):
        """The autoencoder (and SD VAE in latent mode) that turn latents into RGB, loaded once."""
        ae = VideoAutoencoder.from_pretrained(fetch_model(self.cfg.autoencoder)).to(self.device).eval()
        vae = load_frozen_vae(self.cfg.sd_path, self.device) if self.preset.mode == "latent" else None
        return ae, vae


STAGE = MotionStage
