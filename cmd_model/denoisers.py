"""Wrap each model into the `denoise(x_t, t, drop) -> epsilon` interface of cmd_model.diffusion.

Conditions are bound once; when the sampler doubles the batch for guidance, they are
repeated to match. `drop=None` in training mode drops conditions at random (CFG training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cmd_model.diffusion import Denoiser
from cmd_model.dit import DiT

if TYPE_CHECKING:  # a type only: the UNet's modules load where SD is used (cmd_model.content)
    from diffusers import UNet2DConditionModel


def _repeat_to(cond: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if cond is None or cond.shape[0] == n:
        return cond
    return cond.repeat(n // cond.shape[0], *([1] * (cond.ndim - 1)))


def dit_denoiser(model: DiT, content=None, labels=None, text=None) -> Denoiser:
    """Motion DiT (content = the clean content frame) or pixel-mode content DiT (content=None)."""

    def denoise(x, t, drop):
        n = x.shape[0]
        return model(
            x, t, context=_repeat_to(content, n), labels=_repeat_to(labels, n), text=_repeat_to(text, n), drop=drop
        )

    return denoise


def unet_denoiser(
    unet: UNet2DConditionModel, text_tokens: torch.Tensor, null_tokens: torch.Tensor, cond_dropout: float = 0.0
) -> Denoiser:
    """SD UNet on content latents; the null condition is the empty prompt's token features, as SD."""

    def denoise(x, t, drop):
        n = x.shape[0]
        cond = _repeat_to(text_tokens, n)
        if drop is None and unet.training and cond_dropout > 0:
            drop = torch.rand(n, device=x.device) < cond_dropout
        if drop is not None:
            cond = torch.where(drop[:, None, None], null_tokens.to(cond.dtype).expand_as(cond), cond)
        return unet(x, t, encoder_hidden_states=cond.to(x.dtype)).sample

    return denoise
