"""Autoencoder stage: the CMD video autoencoder learns to reconstruct clips (paper Sec. 3.1).

Clips stream from Ray Data (decode + clip in killable decoder processes); in latent mode each
frame goes through the frozen SD VAE on the worker first (as the released code does, online), so
the autoencoder sees 4-channel SD latents. Loss: l2 reconstruction, as the paper says, or l1
(`--recon-loss l1`), or l1 + LPIPS as the released pixel-mode code (`--recon-loss l1+lpips
--lpips-vgg FILE`, VGG-16 weights from a local file). Optimiser: Adam lr 1e-5, betas (0.5, 0.9), no EMA
(paper App. B.3 and the released code). Evaluation on rank 0: clips of held-out videos, PSNR in
RGB (latent mode: both sides decoded by the same VAE, so it measures the autoencoder alone), a
[true / reconstructed] frame grid and side-by-side mp4/gif.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from einops import rearrange

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import clips_to_input
from cmd_model.metrics import psnr
from pipelines.data.sources import source_table
from pipelines.data.video.isolated import decode_clips_isolated
from pipelines.data.video.schema import FRAMES, SOURCE, ClipSpec
from pipelines.platform import storage
from pipelines.platform.cluster import nothing_up, resources_now
from pipelines.training import data
from pipelines.training.config import ConfigError
from pipelines.training.latent_stage import check_stable_diffusion
from pipelines.training.optim import OptimizerSpec
from pipelines.training.stage import Stage, frame_grid, load_frozen_vae, side_by_side, video_to_uint8

log = logging.getLogger(__name__)
CACHE_BYTES = 256 * 2**20  # as the latent stages' cache (latent_stage.CACHE_BYTES)
CLIPS_PER_VIDEO_ESTIMATE = 8  # the sizes are known only after decoding; a generous guess


def clip_spec(cfg) -> ClipSpec:
    """The preset's clips, cut inside shots unless --scene-cuts off (as precompute cuts them)."""
    return ClipSpec.for_preset(
        cfg.model_preset, scene_cuts=cfg.scene_cuts == "on", scene_cut_threshold=cfg.scene_cut_threshold
    )


def split_sources(sources: pa.Table, held_out: int) -> tuple[pa.Table, pa.Table]:
    """(train, eval): the last `held_out` videos in listing order are never trained on."""
    n = sources.num_rows
    if n < 2:
        return sources, sources  # one video: evaluate on what is trained (plan says held_out_videos=0)
    held_out = min(held_out, n - 1)
    return sources.slice(0, n - held_out), sources.slice(n - held_out)


@functools.lru_cache(maxsize=4)
def listed_sources(uri: str, labels: str | None) -> pa.Table:
    """The input's sources as an Arrow table, listed once per driver (prepare and dataset both read them)."""
    return source_table(uri, labels=labels)


class AutoencoderStage(Stage):
    name = "autoencoder"
    artifact = "autoencoder"
    eval_metrics = ("eval/mse", "eval/psnr")
    optimizer = OptimizerSpec(betas=(0.5, 0.9), ema_decay=None)
    collate = data.FrameCollate

    @classmethod
    def prepare(cls, cfg):
        listed_sources.cache_clear()  # a new job lists afresh; its dataset() below reuses this listing
        sources = listed_sources(cfg.input, cfg.labels)
        if cfg.model_preset.mode == "latent":
            check_stable_diffusion(cfg.sd_path)
        if cfg.reconstruction_loss == "l1+lpips" and not storage.exists(cfg.lpips_vgg):
            raise ConfigError(
                f"--lpips-vgg {cfg.lpips_vgg} not found (torchvision's VGG-16 state dict; nothing is downloaded)"
            )
        train, held = split_sources(sources, cfg.eval_samples)
        spec = clip_spec(cfg)
        clip_bytes = spec.num_frames * spec.height * spec.width * 3
        return {
            "data_version": {
                "input": cfg.input,
                "videos": sources.num_rows,
                "held_out_videos": held.num_rows if sources.num_rows > 1 else 0,
            },
            "eval_sources": held.column(SOURCE).to_pylist(),
            # Decoded once and kept in Ray's object store when even CLIPS_PER_VIDEO_ESTIMATE clips
            # per video fit CACHE_BYTES: a small set's epochs then cost no decoding at all (the
            # moving-shapes demo: 17 s of decoding per 15-step epoch before, on 2 cores).
            "cache": train.num_rows * CLIPS_PER_VIDEO_ESTIMATE * clip_bytes <= CACHE_BYTES,
        }

    @classmethod
    def dataset(cls, cfg, plan):

        train, _ = split_sources(listed_sources(cfg.input, cfg.labels), cfg.eval_samples)
        # Decoders: the flag, else the CPUs the training workers leave free on the cluster as it is
        # now (at least one). A cluster scaling from zero has none up yet: the flag is needed there.
        _, cpus = resources_now()
        if cfg.decoders is None and cpus < 1:
            raise ConfigError(nothing_up("CPU", "--decoders N"))
        free = cpus - cfg.num_workers * cfg.cpus_per_worker
        errors_to = storage.join(cfg.storage, cfg.name)  # bad videos: <storage>/<name>/errors/*.parquet
        decoders = cfg.decoders or max(1, math.floor(free))
        ds = data.clip_dataset(train, clip_spec(cfg), errors_to, decoders=decoders)
        return ds.materialize() if plan.get("cache") else ds  # held: data.held_data_config shuffles it per epoch

    def __init__(self, cfg, plan, device):
        super().__init__(cfg, plan, device)
        self.model = VideoAutoencoder.from_preset_config(self.preset.autoencoder)
        self.vae = load_frozen_vae(cfg.sd_path, device) if self.preset.mode == "latent" else None
        self.lpips = None
        if cfg.reconstruction_loss == "l1+lpips":
            from cmd_model.perceptual import load_lpips

            self.lpips = load_lpips(cfg.lpips_vgg).to(device)

    def to_input(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 clips [B, L, H, W, 3] -> autoencoder input [B, C, L, H', W'] (SD latents in latent mode)."""
        return clips_to_input(frames.to(self.device), self.vae)  # what cmd_model.memory measures

    def loss(self, model, batch):
        x = self.to_input(batch[FRAMES])
        recon = model(x).float()
        if self.cfg.reconstruction_loss == "l2":
            return F.mse_loss(recon, x)
        loss = F.l1_loss(recon, x)
        if self.lpips is not None:  # pixel mode: every frame as an RGB image, weight 1 as the released code
            frames = lambda v: rearrange(v, "b c l h w -> (b l) c h w")
            loss = loss + self.lpips(frames(recon), frames(x)).mean()
        return loss

    @torch.no_grad()
    def evaluate(self, model, step, logger):
        frames = self.eval_frames
        if frames is None:
            return {}
        x = self.to_input(frames)
        recon = model(x)
        true, fake = video_to_uint8(x, self.vae), video_to_uint8(recon, self.vae)
        metrics = {
            "eval/mse": float(F.mse_loss(recon.float(), x)),
            "eval/psnr": psnr(true, fake),
        }  # per-clip PSNR, averaged: as jobs/evaluate.py reports it
        rows = [row for t, f in zip(true, fake) for row in (t, f)]
        logger.image(frame_grid(rows), f"reconstructions/step_{step:08d}", "true_over_reconstructed")
        # One row per clip, each frame as input | reconstruction: the UI's step slider shows it sharpen.
        logger.image(
            frame_grid([side_by_side(t, f) for t, f in zip(true, fake)]),
            "reconstructions",
            "latest",
            step=step,
            key="autoencoder_input_vs_reconstruction",
        )
        for i in range(len(true)):
            logger.video(
                side_by_side(true[i], fake[i]),
                f"reconstructions/step_{step:08d}",
                f"clip{i}_true_vs_reconstructed",
                self.preset.sampling.fps,
            )
        return metrics

    @functools.cached_property
    def eval_frames(self) -> torch.Tensor | None:
        """uint8 [N, L, H, W, 3]: the first clips of the held-out videos, decoded once."""
        clips = []
        for source in self.plan["eval_sources"]:
            with storage.local_copy(source) as path:
                rows, error = decode_clips_isolated(source, clip_spec(self.cfg), open_file=lambda _: path)
            if error:
                log.warning("evaluation video skipped: %s", error)
            clips.extend(r[FRAMES] for r in rows[:1])
        clips = clips[: self.cfg.eval_samples]
        return torch.from_numpy(np.stack(clips)) if clips else None


STAGE = AutoencoderStage
