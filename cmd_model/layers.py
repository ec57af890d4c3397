"""Building blocks shared by the autoencoder and the DiTs: positions and transformer blocks.

Attention and MLPs are timm's; sin-cos tables and timestep embeddings are diffusers'.
Only the wiring (divided space-time attention, adaLN-Zero modulation) is written here.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid, get_2d_sincos_pos_embed_from_grid
from einops import rearrange
from timm.layers import Attention, Mlp
from torch import nn

# ---------------------------------------------------------------------------------------
# Fixed sin-cos positional tables (not learned, so any grid size, square or not, works)
# ---------------------------------------------------------------------------------------


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """[height * width, dim] table for a row-major (h w) token grid."""
    grid = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"))
    return get_2d_sincos_pos_embed_from_grid(dim, grid.reshape(2, -1).float()).float()


def sincos_1d(dim: int, length: int) -> torch.Tensor:
    """[length, dim] table."""
    return get_1d_sincos_pos_embed_from_grid(dim, torch.arange(length).float()).float()


def checkpointed(module: nn.Module, *args):
    """module(*args), keeping only its inputs: autograd runs it again in the backward pass for the rest.

    The function every model here is given by `enable_gradient_checkpointing(checkpointed)`
    (diffusers' switch; the SD UNet's blocks call it the same way). Non-reentrant: it works under
    DDP and with inputs that need no gradient, and it recomputes with the forward's autocast state.
    """
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)


# ---------------------------------------------------------------------------------------
# TimeSformer block: divided space-time attention (Bertasius et al. 2021)
# ---------------------------------------------------------------------------------------


# CUDA's fused attention kernels fail on batches of more than 65,535 sequences (grid limit,
# pytorch/pytorch#142228). Temporal attention attends over B * h' * w' sequences: 32 clips at
# 512x1024 are 65,536. Larger batches go through in chunks of this many (the results are the same).
MAX_ATTENTION_BATCH = 32_768


def attend(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """attn(x) for x [S, T, C], in chunks of at most MAX_ATTENTION_BATCH sequences."""
    if x.shape[0] <= MAX_ATTENTION_BATCH:
        return attn(x)
    return torch.cat([attn(part) for part in x.split(MAX_ATTENTION_BATCH)])


class SpaceTimeBlock(nn.Module):
    """Temporal attention per pixel, then spatial attention per frame, then an MLP; x: [B, L, N, C]."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_t = nn.LayerNorm(dim)
        self.attn_t = Attention(dim, num_heads=num_heads, attn_head_dim=head_dim, qkv_bias=True)
        self.norm_s = nn.LayerNorm(dim)
        self.attn_s = Attention(dim, num_heads=num_heads, attn_head_dim=head_dim, qkv_bias=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[1]
        xt = rearrange(x, "b l n c -> (b n) l c")
        xt = xt + attend(self.attn_t, self.norm_t(xt))
        xs = rearrange(xt, "(b n) l c -> (b l) n c", l=frames, n=x.shape[2])
        xs = xs + attend(self.attn_s, self.norm_s(xs))
        xs = xs + self.mlp(self.norm_mlp(xs))
        return rearrange(xs, "(b l) n c -> b l n c", l=frames)


class SpaceTimeTransformer(nn.Module):
    """A stack of SpaceTimeBlocks with fixed space (2D) and time (1D) sin-cos positions.

    The released CMD autoencoder builds rotary tables but never applies them, so its
    attention sees no positions at all; here the tables are added to the tokens before
    the first block, so every attention layer is position-aware.
    """

    def __init__(
        self, dim: int, depth: int, num_heads: int, head_dim: int, frames: int, grid: tuple[int, int], mlp_ratio: float
    ):
        super().__init__()
        self.register_buffer("pos_space", sincos_2d(dim, *grid), persistent=False)  # [N, C]
        self.register_buffer("pos_time", sincos_1d(dim, frames), persistent=False)  # [L, C]
        self.blocks = nn.ModuleList(SpaceTimeBlock(dim, num_heads, head_dim, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        # Set by the owning model's enable_gradient_checkpointing (diffusers finds every module with this flag).
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, N, C] -> [B, L, N, C]."""
        x = x + self.pos_space[None, None].to(x.dtype) + self.pos_time[None, :, None].to(x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------
# DiT block with adaLN-Zero conditioning (Peebles & Xie 2023)
# ---------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class AdaLNBlock(nn.Module):
    """Self-attention + MLP whose norms are shifted, scaled and gated by the condition c."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def zero_init_(self) -> None:
        """Zero gates make every block start as the identity (the "-Zero" in adaLN-Zero)."""
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C], c: [B, C]."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class AdaLNFinal(nn.Module):
    """Final norm modulated by c, then a linear map from tokens to patches."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_features)

    def zero_init_(self) -> None:
        """The model starts by predicting zero noise, as in DiT."""
        for layer in (self.ada[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))
