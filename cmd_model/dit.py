"""DiT with adaLN-Zero, used for the motion model and for the pixel-mode content model.

Motion DiT (paper Sec. 3.2): the noisy motion latent z [B, D, L, h+w] is an image of
height L and width h+w, patchified 2x2; the clean content frame [B, C, H, W] gets its
own patch embedding and its own positional table; both token sets are concatenated
along the sequence and attend to each other; only the motion tokens are read out.
The condition c = timestep embedding + class or text embedding drives adaLN-Zero
(the released code passed the label but never embedded it: here it is used).

Content DiT (pixel mode, UCF-101): the same model without context tokens, on the
content frame [B, C, H, W], class-conditional.

Both predict epsilon (paper Eq. 7-8) unless their config says v_prediction or sample. The released
code also learns the variance (iDDPM hybrid loss); with DDIM eta=0 sampling the variance is never
used, so we drop it.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from timm.layers import PatchEmbed
from torch import nn

from cmd_model.layers import AdaLNBlock, AdaLNFinal, sincos_2d
from cmd_model.presets import DiTConfig

# ---------------------------------------------------------------------------------------
# Condition embedding: timestep + (class | text | nothing), with a learned null for CFG
# ---------------------------------------------------------------------------------------


class ConditionEmbedder(nn.Module):
    """c = t_emb + y_emb; rows where `drop` is True get the null condition."""

    def __init__(self, dim: int, num_classes: int, text_dim: int, cond_dropout: float):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, dim)
        self.num_classes, self.text_dim, self.cond_dropout = num_classes, text_dim, cond_dropout
        if num_classes:
            self.class_embed = nn.Embedding(num_classes + 1, dim)  # index num_classes = null class
        if text_dim:
            self.text_proj = nn.Linear(text_dim, dim)  # paper: trained linear projection of text features
            self.null_text = nn.Parameter(torch.zeros(dim))

    def forward(self, t: torch.Tensor, labels=None, text=None, drop=None) -> torch.Tensor:
        c = self.time_embed(self.time_proj(t).to(self.time_embed.linear_1.weight.dtype))
        if drop is None and self.training:
            # Random condition dropout trains the unconditional model used by classifier-free guidance.
            # Drawn even at cond_dropout 0 (all False): the null condition then stays in the graph
            # with a zero gradient, and DDP, which wants a gradient for every parameter, does not
            # fail at the second step.
            drop = torch.rand(t.shape[0], device=t.device) < self.cond_dropout
        if self.num_classes:
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels")
            if drop is not None:
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            c = c + self.class_embed(labels)
        if self.text_dim:
            if text is None:
                raise ValueError("this model is text-conditional: pass text embeddings")
            y = self.text_proj(text.to(c.dtype))
            if drop is not None:
                y = torch.where(drop[:, None], self.null_text.to(y.dtype).expand_as(y), y)
            c = c + y
        return c


# ---------------------------------------------------------------------------------------
# Aligned content: each motion token also reads the content frame's rows or columns it stands for
# ---------------------------------------------------------------------------------------


class AlignedContext(nn.Module):
    """Adds to every motion token the content frame's pixels of the rows (z_x) or columns (z_y) it covers.

    A departure from the paper (whose motion DiT reads the content frame only as context tokens
    through attention, which it must learn to line up with the motion latent): motion latent index
    j < h is the autoencoder's token row j, so it gets the content frame's row band j (C x p_ae x W
    values), and index h + k gets column band k. A motion patch spans `patch_size` indices of one
    kind (h must divide by it); their bands are projected to hidden/patch_size each and joined, then
    added to the tokens of that spatial patch at every time. So where a shape sits in the content
    frame reaches the matching motion tokens directly: measured on the built-in shapes
    (docs/how_the_demo_learns.md), it is what lets the motion DiT place motion at positions it never saw.
    """

    def __init__(self, input_size, patch_size: int, channels: int, context_size, hidden_size: int):
        super().__init__()
        (height, width), span = context_size, input_size[1]
        ae_patch = (height + width) // span
        if ae_patch * span != height + width or height % ae_patch or width % ae_patch:
            raise ValueError(
                f"motion width {span} does not split a {height}x{width} content frame into rows and columns"
            )
        self.rows, self.ae_patch, self.patch = height // ae_patch, ae_patch, patch_size
        if self.rows % patch_size or hidden_size % patch_size:
            raise ValueError(f"aligned context needs h={self.rows} and hidden {hidden_size} divisible by {patch_size}")
        self.row_proj = nn.Linear(channels * ae_patch * width, hidden_size // patch_size)
        self.col_proj = nn.Linear(channels * height * ae_patch, hidden_size // patch_size)

    def forward(self, tokens: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """tokens [B, T * S, C'] (time-major, S spatial patches), content [B, C, H, W] -> tokens + aligned."""
        a = self.ae_patch
        rows = self.row_proj(rearrange(content, "b c (h a) w -> b h (c a w)", a=a))  # [B, h, C'/p]
        cols = self.col_proj(rearrange(content, "b c h (w a) -> b w (c h a)", a=a))  # [B, w, C'/p]
        bands = rearrange(torch.cat([rows, cols], dim=1), "b (s p) d -> b s (p d)", p=self.patch)  # [B, S, C']
        t = tokens.shape[1] // bands.shape[1]
        return (rearrange(tokens, "b (t s) d -> b t s d", t=t) + bands[:, None]).flatten(1, 2)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


class DiT(ModelMixin, ConfigMixin):
    """epsilon(x_t, t, [context], [class | text]) for x [B, C, H, W]; see the module docstring."""

    # enable_gradient_checkpointing(cmd_model.layers.checkpointed): each block keeps only its input
    # and is run again in the backward pass (--grad-checkpointing; docs/memory.md has what it saves).
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        input_size: tuple[int, int] = (16, 64),
        in_channels: int = 8,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        text_dim: int = 0,
        cond_dropout: float = 0.1,
        context_channels: int = 0,
        context_size: tuple[int, int] = (0, 0),
        context_patch_size: int = 4,
        prediction_type: str = "epsilon",  # what the output means; stored so samplers read it from config.json
        class_embed_std: float = 0.02,
        context_aligned: bool = False,
    ):
        super().__init__()
        from cmd_model.diffusion import PREDICTION_TYPES

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        input_size, context_size = tuple(input_size), tuple(context_size)
        for name, size, p in (("input", input_size, patch_size), ("context", context_size, context_patch_size)):
            if size[0] % p or size[1] % p:
                raise ValueError(f"{name} size {size} is not divisible by patch size {p}")
        self.grid = (input_size[0] // patch_size, input_size[1] // patch_size)
        self.x_embed = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.register_buffer("pos_x", sincos_2d(hidden_size, *self.grid), persistent=False)
        if context_channels:
            grid = (context_size[0] // context_patch_size, context_size[1] // context_patch_size)
            self.context_embed = PatchEmbed(context_size, context_patch_size, context_channels, hidden_size)
            self.register_buffer("pos_context", sincos_2d(hidden_size, *grid), persistent=False)
        if context_aligned:
            self.aligned = AlignedContext(input_size, patch_size, context_channels, context_size, hidden_size)
        self.cond = ConditionEmbedder(hidden_size, num_classes, text_dim, cond_dropout)
        self.blocks = nn.ModuleList(AdaLNBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final = AdaLNFinal(hidden_size, patch_size * patch_size * in_channels)
        self.gradient_checkpointing = False
        self._init_weights()

    @classmethod
    def from_preset_config(cls, config: DiTConfig) -> "DiT":
        return cls(**dataclasses.asdict(config))

    def _init_weights(self) -> None:
        """DiT's initialisation: xavier linears, patch embeddings like linears, zeroed adaLN gates."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias) if module.bias is not None else None
        embeds = [self.x_embed] + ([self.context_embed] if self.config.context_channels else [])
        for embed in embeds:
            nn.init.xavier_uniform_(embed.proj.weight.view(embed.proj.weight.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        for module in self.modules():
            if isinstance(module, (AdaLNBlock, AdaLNFinal)):
                module.zero_init_()
        if self.config.num_classes:
            nn.init.normal_(self.cond.class_embed.weight, std=self.config.class_embed_std)
        for layer in (self.cond.time_embed.linear_1, self.cond.time_embed.linear_2):
            nn.init.normal_(layer.weight, std=0.02)

    def forward(self, x, t, context=None, labels=None, text=None, drop=None) -> torch.Tensor:
        """x [B, C, H, W], t [B], context [B, C_ctx, H_ctx, W_ctx], labels [B] long, text [B, text_dim],
        drop [B] bool (True: use the null condition) -> epsilon [B, C, H, W]."""
        tokens = self.x_embed(x) + self.pos_x.to(x.dtype)  # [B, N, C']
        num_x = tokens.shape[1]
        if self.config.context_channels:
            if context is None:
                raise ValueError("this model reads a content frame: pass context")
            ctx = self.context_embed(context.to(x.dtype)) + self.pos_context.to(x.dtype)
            if self.config.context_aligned:
                tokens = self.aligned(tokens, context.to(x.dtype))
            tokens = torch.cat([tokens, ctx], dim=1)  # [B, N + N_ctx, C']
        c = self.cond(t, labels=labels, text=text, drop=drop).to(tokens.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = self._gradient_checkpointing_func(block, tokens, c)
            else:
                tokens = block(tokens, c)
        out = self.final(tokens[:, :num_x], c)  # [B, N, p * p * C]
        p = self.config.patch_size
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid[0], w=self.grid[1], p=p, q=p)
