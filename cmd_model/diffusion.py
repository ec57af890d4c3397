"""Diffusion training loss and DDIM sampling with classifier-free guidance, on diffusers schedulers.

A `denoise(x_t, t, drop)` callable is the one interface: it returns epsilon for a batch,
using the null condition where `drop` is True. Every model (motion DiT, content DiT, SD UNet)
is wrapped into one, so the loss and the sampler are written once.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def dit_scheduler() -> DDPMScheduler:
    """DiT's training schedule (the paper's): linear betas 1e-4..0.02 over 1000 steps, epsilon."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", clip_sample=False,
    )


def diffusion_loss(denoise: Denoiser, x0: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator | None = None) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps (paper Eq. 7-8)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    return F.mse_loss(denoise(x_t, t, None).float(), noise.float())


def guided_epsilon(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + scale * (eps_c - eps_u), both halves in one batch."""
    b = x.shape[0]
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
    eps = denoise(torch.cat([x, x]), torch.cat([t, t]), drop)
    eps_cond, eps_uncond = eps[:b], eps[b:]
    return eps_uncond + scale * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    shape: tuple[int, ...],
    train_scheduler: DDPMScheduler,
    steps: int,
    cfg_scale: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DDIM (eta = 0) from pure noise to x0 with `steps` steps, on the training schedule's betas."""
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    for t in scheduler.timesteps:
        tt = t.expand(shape[0]).to(device)
        eps = guided_epsilon(denoise, x, tt, cfg_scale)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x
