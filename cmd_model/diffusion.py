"""Diffusion training loss and DDIM sampling with classifier-free guidance, on diffusers schedulers.

A `denoise(x_t, t, drop)` callable is the one interface: it returns the model's prediction for a
batch, using the null condition where `drop` is True. Every model (motion DiT, content DiT, SD
UNet) is wrapped into one, so the loss and the sampler are written once. What the model predicts
is the scheduler's `prediction_type`, used by both the loss and the sampler so they always agree:
"epsilon" (the paper's, SD 1.x, SD 2.x base), "v_prediction" (SD 2.x at 768; the CPU learning
presets' DiTs: it learns the clean sample at high noise, where epsilon-prediction of a nearly
deterministic latent learns slowly) or "sample".
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def dit_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """DiT's training schedule (the paper's): linear betas 1e-4..0.02 over 1000 steps; epsilon unless asked."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=False,
    )


def diffusion_loss(
    denoise: Denoiser, x0: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MSE to the scheduler's prediction target at uniformly drawn timesteps (paper Eq. 7-8 for epsilon)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        target = x0
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (supported: {', '.join(PREDICTION_TYPES)})")
    return F.mse_loss(denoise(x_t, t, None).float(), target.float())


def guided_epsilon(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: p(null) + s * (p(c) - p(null)), both halves in one batch.

    The convention throughout (presets, --cfg-* flags, MLflow params) is this guidance scale s,
    diffusers' `guidance_scale`: s = 1 is no guidance. The paper's Algorithm 1 writes
    (1 + w) p(c) - w p(null), the same thing with w = s - 1; its Tables 3 and 11 ("cfg 7 to 11",
    SD's usual range) and the released code (4.0 on UCF-101) are in s.
    Guidance is linear, so it applies to any prediction type (epsilon, v or x0) alike.
    """
    b = x.shape[0]
    drop = torch.arange(2 * b, device=x.device) >= b  # made on the device: no host copy per step
    eps = denoise(torch.cat([x, x]), torch.cat([t, t]), drop)
    eps_cond, eps_uncond = eps[:b], eps[b:]
    return eps_uncond + scale * (eps_cond - eps_uncond)


def initial_noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Float32 noise of `shape` on the host, from one generator, or row i from generator[i] alone.

    Per-row generators draw each row as a batch of one would: a sample then does not depend on the
    rows it shares a batch with (diffusers' randn_tensor does the same with a list of generators).
    """
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per row")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    shape: tuple[int, ...],
    train_scheduler: DDPMScheduler,
    steps: int,
    cfg_scale: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_sample: bool = False,
) -> torch.Tensor:
    """DDIM (eta = 0) from pure noise to x0 with `steps` steps, on the training schedule's betas.

    generator: one for the whole batch's noise, or one per row (see initial_noise).
    clip_sample: clip each step's predicted x0 to [-1, 1] (pixel-mode content frames, which are
    convex combinations of frames in [-1, 1]: strong guidance overshoots them otherwise).
    """
    scheduler = DDIMScheduler.from_config(train_scheduler.config, clip_sample=clip_sample, clip_sample_range=1.0)
    # Timesteps stay on the host: the scheduler indexes its CPU schedule with them, and a device
    # index there would make the host wait for the GPU at every step.
    scheduler.set_timesteps(steps)
    x = initial_noise(shape, generator).to(device=device, dtype=dtype)
    for t in scheduler.timesteps.tolist():
        tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
        eps = guided_epsilon(denoise, x, tt, cfg_scale)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x
