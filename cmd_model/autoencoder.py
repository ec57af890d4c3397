"""CMD video autoencoder: a clip becomes one content frame plus a small motion latent.

    encode: video [B, C, L, H, W] -> content [B, C, H, W], motion [B, D, L, h + w]
    decode: content, motion -> video [B, C, L, H, W]
with h = H / p and w = W / p (p = patch size). The motion latent holds z_x [D, L, h]
(features averaged over columns) followed by z_y [D, L, w] (averaged over rows); decode
splits it at h, the same place encode joined it, so non-square inputs work (the released
code split at the wrong index and only ran square inputs).

Weights and config are saved by diffusers' ModelMixin: config.json + safetensors, no pickle.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

from cmd_model.layers import SpaceTimeTransformer
from cmd_model.presets import AutoencoderConfig


class VideoAutoencoder(ModelMixin, ConfigMixin):
    """TimeSformer encoder with content (softmax-over-time) and motion (axis-mean) heads, and a TimeSformer decoder."""

    # enable_gradient_checkpointing(cmd_model.layers.checkpointed) reaches the SpaceTimeTransformers'
    # blocks: each keeps only its input and runs again in the backward pass (--grad-checkpointing).
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        num_frames: int = 16,
        height: int = 64,
        width: int = 64,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 8,
        head_dim: int = 64,
        motion_channels: int = 8,
        mlp_ratio: float = 4.0,
        output_activation: str = "none",
        content_weights: str = "per_channel",
    ):
        super().__init__()
        if height % patch_size or width % patch_size:
            raise ValueError(f"frame size {height}x{width} is not divisible by patch size {patch_size}")
        if content_weights not in ("per_channel", "per_pixel"):
            raise ValueError(f"content_weights must be 'per_channel' or 'per_pixel', got {content_weights!r}")
        if output_activation not in ("none", "tanh"):
            raise ValueError(f"output_activation must be 'none' or 'tanh', got {output_activation!r}")
        p, dim = patch_size, hidden_size
        self.grid = (height // p, width // p)
        blocks = dict(
            dim=dim,
            depth=depth,
            num_heads=num_heads,
            head_dim=head_dim,
            frames=num_frames,
            grid=self.grid,
            mlp_ratio=mlp_ratio,
        )

        # Encoder: conv pre-layer (patchify), TimeSformer, then the two heads.
        self.patch_in = nn.Conv2d(in_channels, dim, kernel_size=p, stride=p)
        self.encoder = SpaceTimeTransformer(**blocks)
        weights = in_channels if content_weights == "per_channel" else 1
        self.content_logits = nn.ConvTranspose2d(dim, weights, kernel_size=p, stride=p)
        self.motion_x = nn.Conv2d(dim, motion_channels, kernel_size=1)
        self.motion_y = nn.Conv2d(dim, motion_channels, kernel_size=1)

        # Decoder: embed content (g_I) and motion (g_M), broadcast-sum, TimeSformer, conv post-layer.
        self.content_embed = nn.Conv2d(in_channels, dim, kernel_size=p, stride=p)
        self.motion_x_embed = nn.Conv2d(motion_channels, dim, kernel_size=1)
        self.motion_y_embed = nn.Conv2d(motion_channels, dim, kernel_size=1)
        self.decoder = SpaceTimeTransformer(**blocks)
        self.patch_out = nn.ConvTranspose2d(dim, in_channels, kernel_size=p, stride=p)

    @classmethod
    def from_preset_config(cls, config: AutoencoderConfig) -> "VideoAutoencoder":
        return cls(**dataclasses.asdict(config))

    def _check_video(self, video: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.num_frames, c.height, c.width)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"expected video [B, {', '.join(map(str, expected))}] (B, C, L, H, W), got {list(video.shape)}"
            )

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, C, L, H, W] -> (content [B, C, H, W], motion [B, D, L, h + w])."""
        self._check_video(video)
        b, _, frames, _, _ = video.shape
        h, w = self.grid
        tokens = self.patch_in(rearrange(video, "b c l hh ww -> (b l) c hh ww"))
        u = self.encoder(rearrange(tokens, "(b l) c h w -> b l (h w) c", b=b))
        u = rearrange(u, "b l (h w) c -> b c l h w", h=h, w=w)

        # Content: per-pixel, per-channel importance weights over time, softmax-normalised;
        # the content frame is the weighted sum of the input frames (paper Eq. 2). "per_pixel"
        # shares one weight over a pixel's channels (the CPU learning presets): per-channel weights
        # mix the red of one frame with the green of another where a shape passed, and such
        # speckled streaks are what a small content model, trained minutes, cannot draw.
        logits = self.content_logits(rearrange(u, "b c l h w -> (b l) c h w"))
        weights = rearrange(logits, "(b l) c hh ww -> b c l hh ww", b=b).softmax(dim=2)
        content = (weights * video).sum(dim=2)

        # Motion: average out one spatial axis at a time, 1x1 conv to D channels.
        # tanh bounds z to [-1, 1] (released code; the paper does not say) so diffusion needs no rescaling.
        z_x = self.motion_x(u.mean(dim=4))  # [B, D, L, h]
        z_y = self.motion_y(u.mean(dim=3))  # [B, D, L, w]
        motion = torch.tanh(torch.cat([z_x, z_y], dim=-1))
        return content, motion

    def decode(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """(content [B, C, H, W], motion [B, D, L, h + w]) -> video [B, C, L, H, W]."""
        h, w = self.grid
        if motion.shape[-1] != h + w:
            raise ValueError(f"motion latent width {motion.shape[-1]} != h + w = {h + w}")
        v_t = self.content_embed(content)  # [B, C', h, w]
        v_x = self.motion_x_embed(motion[..., :h])  # [B, C', L, h]
        v_y = self.motion_y_embed(motion[..., h:])  # [B, C', L, w]
        v = v_t[:, :, None] + v_x[..., :, None] + v_y[..., None, :]  # [B, C', L, h, w]
        x = self.decoder(rearrange(v, "b c l h w -> b l (h w) c"))
        frames = self.patch_out(rearrange(x, "b l (h w) c -> (b l) c h w", h=h, w=w))
        video = rearrange(frames, "(b l) c hh ww -> b c l hh ww", b=content.shape[0])
        return torch.tanh(video) if self.config.output_activation == "tanh" else video

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction of video [B, C, L, H, W]."""
        return self.decode(*self.encode(video))
