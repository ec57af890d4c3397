"""Optimiser, learning-rate warm-up and EMA: the pieces every stage shares."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OptimizerSpec:
    """Adam(W) settings of one stage (CMD_REFERENCE.md: paper App. B.3)."""

    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0  # the paper uses none for any stage
    ema_decay: float | None = 0.999  # paper: EMA 0.999 for both diffusion models; None: no EMA


def make_optimizer(params, lr: float, spec: OptimizerSpec) -> torch.optim.Optimizer:
    # With weight_decay=0, AdamW and Adam are the same update (the paper writes Adam, the code AdamW).
    # foreach: one fused kernel launch per step instead of one per tensor.
    return torch.optim.AdamW(params, lr=lr, betas=spec.betas, weight_decay=spec.weight_decay, foreach=True)


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant (DiT and CMD use a constant rate)."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model, with d = min(decay, (1 + step) / (10 + step)).

    The warm-up of d (diffusers' EMAModel default) keeps a short run or a fine-tune from
    exporting weights that are mostly the initialisation; after ~10k steps d is the paper's 0.999.
    """
    d = min(decay, (1 + step) / (10 + step))
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
