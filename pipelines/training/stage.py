"""The contract between the harness and a training stage, and helpers the stages share.

A stage has two sides:
- driver (classmethods, no Ray workers yet): `prepare` checks the inputs and returns a plan
  (JSON-able: data version, evaluation inputs); `dataset` builds the Ray Data dataset.
- worker (an instance per Ray Train worker): builds `model` (the trainable module, on CPU;
  the harness moves and wraps it), computes `loss` on a batch, `evaluate`s on rank 0 and
  `export`s the final model in save_pretrained layout.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import ClassVar

import numpy as np
import torch
from einops import rearrange
from torch import nn

from cmd_model.content import StableDiffusion, latents_to_video, load_vae, unit_to_uint8
from pipelines.training.config import ConfigError, TrainConfig
from pipelines.training.optim import OptimizerSpec

STAGE_MODULES = {
    "vae": "pipelines.training.vae",
    "autoencoder": "pipelines.training.autoencoder",
    "content": "pipelines.training.content",
    "motion": "pipelines.training.motion",
}


class Stage:
    """Base class; see the module docstring."""

    name: ClassVar[str]
    artifact: ClassVar[str]  # MLflow artifact path of the final model (runs:/<id>/<artifact>)
    eval_metrics: ClassVar[tuple[str, ...]] = ()  # the keys `evaluate` returns (reported with each checkpoint)
    optimizer: ClassVar[OptimizerSpec] = OptimizerSpec()
    model: nn.Module

    # -- driver ------------------------------------------------------------------------
    @classmethod
    def prepare(cls, cfg: TrainConfig) -> dict:
        raise NotImplementedError

    @classmethod
    def dataset(cls, cfg: TrainConfig, plan: dict):
        raise NotImplementedError

    # -- worker ------------------------------------------------------------------------
    def __init__(self, cfg: TrainConfig, plan: dict, device: torch.device):
        self.cfg, self.plan, self.device = cfg, plan, device
        self.preset = cfg.model_preset
        if plan.get("num_classes"):  # the data's class count (LatentStage.prepare)
            model = getattr(self.preset, cfg.stage)
            self.preset = self.preset.replace(
                **{cfg.stage: dataclasses.replace(model, num_classes=plan["num_classes"])}
            )

    collate: ClassVar[type]  # a ray.data NumpyBatchCollateFn: numpy batch -> dict of tensors (and captions)
    rows_per_fetch: ClassVar[int] = 0  # rows asked of Ray Data at once (0: one batch); see loop.batches

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, step: int, logger) -> dict[str, float]:
        raise NotImplementedError

    def export(self, model: nn.Module, directory) -> None:
        model.save_pretrained(directory)


def check_init_from(cfg: TrainConfig) -> None:
    """--init-from is a save_pretrained folder whose config matches the model this run builds."""
    from pipelines.platform.model_store import ModelNotFound, fetch_model, model_config

    try:
        folder = fetch_model(cfg.init_from)
    except ModelNotFound as exc:
        raise ConfigError(f"--init-from: {exc}") from None
    want = getattr(cfg.model_preset, cfg.stage, None)
    if want is None:  # latent-mode content: SD's UNet, whose config is SD's
        return
    have = model_config(folder)
    for key, value in dataclasses.asdict(want).items():
        if key in have and _plain(have[key]) != _plain(value):
            raise ConfigError(
                f"--init-from {cfg.init_from} has {key}={have[key]}, this run's {cfg.stage} model has {value}"
            )


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def get_stage(name: str) -> type[Stage]:
    if name not in STAGE_MODULES:
        raise ConfigError(f"unknown stage {name!r}; choose one of: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name]).STAGE


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def frozen_dtype(device: torch.device) -> torch.dtype:
    """Frozen models (SD's VAE and text encoder) run in bf16 on a GPU, as the trained ones under
    autocast: half their memory (docs/memory.md); on the CPU in float32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_text_encoder(sd_path: str, device: torch.device) -> StableDiffusion:
    """Only SD's tokenizer and text encoder (frozen): the motion DiT and the UNet read its features."""
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(sd_path, subfolder="text_encoder", torch_dtype=frozen_dtype(device))
    text_encoder = text_encoder.to(device).eval()
    text_encoder.requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(sd_path, subfolder="tokenizer")
    # encode_prompts needs only these two parts; the UNet and VAE are not loaded for it.
    return StableDiffusion(unet=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=None)


def load_frozen_vae(sd_path: str, device: torch.device):
    vae = load_vae(sd_path, torch_dtype=frozen_dtype(device)).to(device).eval()
    vae.requires_grad_(False)
    return vae


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def video_to_uint8(video: torch.Tensor, vae=None) -> np.ndarray:
    """Autoencoder-space video [B, C, L, H, W] -> uint8 RGB [B, L, H', W', 3] (SD-decoded in latent mode)."""
    frames = rearrange(video.float(), "b c l h w -> b l c h w")
    return unit_to_uint8(latents_to_video(vae, frames) if vae is not None else frames)


def image_to_uint8(images: torch.Tensor, vae=None) -> np.ndarray:
    """Content frames [B, C, H, W] -> uint8 RGB [B, H', W', 3]."""
    return video_to_uint8(images[:, :, None], vae)[:, 0]


def frame_grid(rows: list[np.ndarray], max_frames: int = 8) -> np.ndarray:
    """Rows of frames uint8 [L, H, W, 3] -> one image: up to max_frames evenly spaced frames per row."""
    pick = np.linspace(0, rows[0].shape[0] - 1, min(max_frames, rows[0].shape[0])).round().astype(int)
    return np.concatenate([np.concatenate(list(row[pick]), axis=1) for row in rows], axis=0)


def side_by_side(*videos: np.ndarray) -> np.ndarray:
    """Videos uint8 [L, H, W, 3] of equal length -> one video with them left to right."""
    return np.concatenate(videos, axis=2)
