"""Evaluate CMD models the way the paper reports them, next to the paper's numbers.

- reconstruction: PSNR / SSIM of autoencoder round trips on held-out clips (+ R-FVD with I3D)
- generation: FVD between generated videos and real clips (StyleGAN-V protocol: one clip per video)
- text alignment: CLIPSIM of generated videos against their prompts (a local CLIP)
I3D and CLIP weights are read from local paths only; nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
import torch
from einops import rearrange

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import frames_to_latents, latents_to_frames, load_vae, uint8_to_unit, unit_to_uint8
from cmd_model.i3d import InceptionI3d
from cmd_model.metrics import clipsim, fvd, psnr, ssim
from cmd_model.presets import Preset
from pipelines import storage
from pipelines.model_store import localize
from pipelines.sources import VIDEO_EXTENSIONS, list_sources
from pipelines.video_io import FRAMES, SOURCE, ClipSpec, IsolatedDecoder

# Paper v1 numbers (reference Tables 1-4); PSNR/SSIM are not reported there.
PAPER = {
    "r_fvd": "7.72 (UCF-101), 69.5 (WebVid, D=8), 56.8 (D=16)",
    "fvd": "107 (UCF-101, 2,048 samples), 238.3 (WebVid, 5k)",
    "clipsim": "0.2894 (MSR-VTT), 0.3020 (WebVid)",
    "psnr": "not reported",
    "ssim": "not reported",
}


def one_clip_per_video(uri: str, height: int, width: int, limit: int | None = None, num_frames: int = 16) -> np.ndarray:
    """uint8 [N, L, H, W, 3]: the middle 16-frame window of each video (bad videos are skipped)."""
    files = [s[SOURCE] for s in list_sources(uri)] if not uri.endswith(VIDEO_EXTENSIONS) else [uri]
    spec = ClipSpec(height=height, width=width, num_frames=num_frames, clips_per_video=1)
    clips = []
    with IsolatedDecoder(spec) as decoder:
        for source in files[:limit]:
            with storage.local_copy(source) as path:
                rows, error = decoder.decode(source, open_file=lambda _: path)
            if rows:
                clips.append(rows[0][FRAMES])
    if not clips:
        raise ValueError(f"no usable 16-frame clip in {uri}")
    return np.stack(clips)


@torch.no_grad()
def reconstruct(preset: Preset, autoencoder: str, clips: np.ndarray, stable_diffusion: str | None, batch: int = 4) -> np.ndarray:
    """Autoencoder round trip of uint8 clips [N, L, H, W, 3] (through the SD VAE in latent mode)."""
    ae = VideoAutoencoder.from_pretrained(localize(autoencoder)).eval()
    vae = load_vae(stable_diffusion or preset.stable_diffusion).eval() if preset.mode == "latent" else None
    out = []
    for i in range(0, len(clips), batch):
        x = uint8_to_unit(clips[i:i + batch])  # [n, L, 3, H, W]
        n = x.shape[0]
        if vae is not None:
            x = rearrange(frames_to_latents(vae, rearrange(x, "n l c h w -> (n l) c h w")), "(n l) c h w -> n l c h w", n=n)
        video = rearrange(ae(rearrange(x, "n l c h w -> n c l h w")), "n c l h w -> n l c h w")
        if vae is not None:
            video = rearrange(latents_to_frames(vae, rearrange(video, "n l c h w -> (n l) c h w")), "(n l) c h w -> n l c h w", n=n)
        out.append(unit_to_uint8(video))
    return np.concatenate(out)


def evaluate(preset: Preset, real: str, autoencoder: str | None = None, generated: str | None = None,
             stable_diffusion: str | None = None, i3d: str | None = None, clip: str | None = None,
             prompts: list[str] | None = None, max_videos: int = 2048) -> dict:
    """The metrics the given inputs allow; keys: psnr, ssim, r_fvd, fvd, clipsim, plus sample counts."""
    h, w = preset.video_size
    real_clips = one_clip_per_video(real, h, w, max_videos)
    results: dict = {"real_videos": len(real_clips)}
    i3d_model = InceptionI3d.from_file(i3d) if i3d else None
    if autoencoder:
        recon = reconstruct(preset, autoencoder, real_clips, stable_diffusion)
        results.update(psnr=round(psnr(real_clips, recon), 3), ssim=round(ssim(real_clips, recon), 4))
        if i3d_model is not None:
            results["r_fvd"] = round(fvd(i3d_model, real_clips, recon), 2)
    if generated:
        fake = one_clip_per_video(generated, h, w, max_videos)
        results["generated_videos"] = len(fake)
        if i3d_model is not None:
            results["fvd"] = round(fvd(i3d_model, real_clips, fake), 2)
        if clip:
            from transformers import CLIPModel, CLIPProcessor

            if not prompts:
                raise ValueError("CLIPSIM needs the prompts of the generated videos (--prompt or --prompts-file)")
            prompts = prompts if len(prompts) == len(fake) else [prompts[0]] * len(fake)
            results["clipsim"] = round(clipsim(CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip), fake, prompts), 4)
    return results


def table(results: dict) -> str:
    lines = [f"{'metric':<10} {'ours':>12}   paper", "-" * 72]
    for key in ("psnr", "ssim", "r_fvd", "fvd", "clipsim"):
        if key in results:
            lines.append(f"{key:<10} {results[key]:>12}   {PAPER[key]}")
    return "\n".join(lines)


@torch.no_grad()
def heldout_motion_loss(preset: Preset, held_out: str, autoencoder: str, motion: str, stable_diffusion: str | None,
                        timesteps: int = 10, seed: int = 0) -> float:
    """The motion DiT's loss (MSE to its prediction target) on held-out clips, at fixed timesteps and fixed noise (lower is better).

    Deterministic for given weights and clips, so model versions trained on different data are
    compared on exactly the same problem (the retraining job's promotion metric).
    """
    from cmd_model.content import StableDiffusion
    from cmd_model.diffusion import dit_scheduler
    from cmd_model.dit import DiT

    h, w = preset.video_size
    sources = list_sources(held_out)
    clips = one_clip_per_video(held_out, h, w)
    ae = VideoAutoencoder.from_pretrained(localize(autoencoder)).eval()
    dit = DiT.from_pretrained(localize(motion)).eval()
    x = uint8_to_unit(clips)
    cond = {}
    if preset.mode == "latent":
        sd = StableDiffusion.from_pretrained(stable_diffusion or preset.stable_diffusion)
        n = x.shape[0]
        x = rearrange(frames_to_latents(sd.vae, rearrange(x, "n l c h w -> (n l) c h w")), "(n l) c h w -> n l c h w", n=n)
        cond["text"] = sd.encode_prompts([s.get("caption") or "" for s in sources][: len(clips)])[1]
    else:
        cond["labels"] = torch.tensor([s.get("label") or 0 for s in sources][: len(clips)])
    content, z = ae.encode(rearrange(x, "n l c h w -> n c l h w"))
    scheduler, generator = dit_scheduler(dit.config.prediction_type), torch.Generator().manual_seed(seed)
    losses = []
    for t in torch.linspace(0, scheduler.config.num_train_timesteps - 1, timesteps).long():
        noise = torch.randn(z.shape, generator=generator)
        tt = t.expand(z.shape[0])
        predicted = dit(scheduler.add_noise(z, noise, tt), tt, context=content, drop=torch.zeros(z.shape[0], dtype=torch.bool), **cond)
        target = {"epsilon": noise, "sample": z}.get(dit.config.prediction_type) if dit.config.prediction_type != "v_prediction" \
            else scheduler.get_velocity(z, noise, tt)
        losses.append(torch.nn.functional.mse_loss(predicted, target).item())
    return float(np.mean(losses))
