"""VideoMAE-v2 video encoder: the feature network of content-debiased FVD (cd-FVD, Ge et al. 2024).

I3D features are known to weigh per-frame content far more than motion; cd-FVD replaces them with
the self-supervised VideoMAE-v2 ViT-g/14 (`vit_g_hybrid_pt_1200e_ssv2_ft.pth`), 1408-d features
= LayerNorm of the mean of the last block's tokens. Inputs: 16 frames resized to 224x224
(bilinear, no crop), values in [0, 1], no normalisation: what the `cd-fvd` package does, which
tests/test_metrics.py checks against on shared weights. Module names are that checkpoint's, so it
loads as is (`torch.load(weights_only=True)`: no unpickling, nothing downloaded). Written here
because `cd-fvd` downloads its weights at run time and is not a library to depend on.

    video [B, 3, 16, 224, 224] in [0, 1] -> features [B, embed_dim]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cmd_model.content import uint8_to_device


@dataclass(frozen=True)
class VideoMAEConfig:
    embed_dim: int = 1408  # ViT-g/14, the cd-FVD network
    depth: int = 40
    num_heads: int = 16
    mlp_ratio: float = 48 / 11
    patch_size: int = 14
    tubelet_size: int = 2
    image_size: int = 224
    num_frames: int = 16
    num_classes: int = 174  # the SSv2 fine-tuning head: in the checkpoint, unused for features


def sinusoid_positions(n: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sine/cosine table of the original ViT/VideoMAE: [n, dim]."""
    angles = np.arange(n)[:, None] / np.power(10000, 2 * (np.arange(dim) // 2) / dim)[None, :]
    angles[:, 0::2], angles[:, 1::2] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    return torch.tensor(angles, dtype=torch.float32)


class Attention(nn.Module):
    """Multi-head self-attention; the key has no bias (the checkpoint holds q_bias and v_bias only)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = rearrange(
            F.linear(x, self.qkv.weight, bias), "b n (three h d) -> three b h n d", three=3, h=self.num_heads
        )
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, num_heads), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(3, cfg.embed_dim, kernel, stride=kernel)

    def forward(self, x):
        return rearrange(self.proj(x), "b c t h w -> b (t h w) c")


class VideoMAEv2(nn.Module):
    def __init__(self, cfg: VideoMAEConfig = VideoMAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        tokens = (cfg.num_frames // cfg.tubelet_size) * (cfg.image_size // cfg.patch_size) ** 2
        # Fixed, not in checkpoints
        self.register_buffer("pos_embed", sinusoid_positions(tokens, cfg.embed_dim), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 16, 224, 224] in [0, 1] -> features [B, embed_dim]."""
        if tuple(video.shape[2:]) != (self.cfg.num_frames, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"VideoMAE-v2 takes [B, 3, {self.cfg.num_frames}, {self.cfg.image_size}, "
                f"{self.cfg.image_size}], got {list(video.shape)}"
            )
        x = self.patch_embed(video) + self.pos_embed.to(video.dtype)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x.mean(dim=1))

    @classmethod
    def from_file(cls, path: str, cfg: VideoMAEConfig = VideoMAEConfig()) -> "VideoMAEv2":
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "module"):  # the released checkpoints nest the state dict
            if isinstance(state, dict) and key in state:
                state = state[key]
                break
        model = cls(cfg)
        model.load_state_dict(state)
        return model.eval()


def videomae_preprocess(videos: np.ndarray, size: int = 224, device="cpu") -> torch.Tensor:
    """uint8 [N, L, H, W, 3] -> float [N, 3, L, size, size] in [0, 1] (resized, not cropped), on `device`
    (the clips travel there as uint8)."""
    x = rearrange(uint8_to_device(videos, device).float() / 255, "n l h w c -> (n l) c h w")
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return rearrange(x, "(n l) c h w -> n c l h w", n=len(videos))


@torch.no_grad()
def videomae_features(model: VideoMAEv2, videos: np.ndarray, batch_size: int = 8) -> np.ndarray:
    device = next(model.parameters()).device
    out = [
        model(videomae_preprocess(videos[i : i + batch_size], model.cfg.image_size, device)).cpu()
        for i in range(0, len(videos), batch_size)
    ]
    return torch.cat(out).double().numpy()
