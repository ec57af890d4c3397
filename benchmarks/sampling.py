"""Cost of generating one 16-frame video with CMD, against denoising the full video latent.

    python benchmarks/sampling.py --preset webvid-sd21-512x1024            # GPU: time, memory, FLOPs
    python benchmarks/sampling.py --preset tiny --device cpu               # anywhere
    python benchmarks/sampling.py --preset webvid-sd21-512x1024 --flops-only

CMD: content frame (UNet or DiT, `content_steps` DDIM steps) + motion latent (DiT,
`motion_steps`) + one autoencoder decode. Baseline: a video UNet that denoises all L frames at
every step -- diffusers' UNet3DConditionModel, i.e. the SD UNet inflated with temporal
convolutions and temporal attention over all frames (ModelScope's architecture), at the same
latent size and with the same number of steps as CMD's content model. Both use classifier-free
guidance (a batch of 2 per step). The SD VAE decoder is left out of both, as in the paper's
Fig. 6. Prints one JSON line; `flops_ratio` = baseline FLOPs / CMD FLOPs (paper: 13-20x).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import UNet2DConditionModel, UNet3DConditionModel

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.denoisers import dit_denoiser, unet_denoiser
from cmd_model.diffusion import ddim_sample, dit_scheduler
from cmd_model.dit import DiT
from cmd_model.presets import PRESETS, get_preset
from cmd_model.report import TEXT_TOKENS, count_flops, report, unet_config

PAPER = {"paper_cmd_seconds_a100": 3.13, "paper_cmd_memory_gb_a100": 5.56, "paper_cmd_tflops": 46.8,
         "paper_flops_ratio_vs_modelscope": 20.1, "paper_flops_ratio_vs_lvdm": 13.4}

TINY_VIDEO_UNET = dict(
    block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
)


def video_unet(preset) -> UNet3DConditionModel:
    """The baseline: diffusers' defaults are ModelScope T2V's UNet; cross-attention sized to the preset's text."""
    if preset.name.startswith("tiny"):
        return UNet3DConditionModel(in_channels=4, out_channels=4, **TINY_VIDEO_UNET)
    text_dim = unet_config(preset)["cross_attention_dim"] if preset.mode == "latent" else 1024
    return UNet3DConditionModel(in_channels=preset.content_shape[0], out_channels=preset.content_shape[0], cross_attention_dim=text_dim)


def baseline_step_input(preset, unet, batch: int, device=None):
    c, h, w = preset.content_shape
    x = torch.randn(batch, c, preset.autoencoder.num_frames, h, w, device=device)
    text = torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, device=device)
    return x, text


def flops(preset, content_steps: int, motion_steps: int) -> dict:
    """CMD's and the baseline's FLOPs for one video, on the meta device."""
    cmd = report(preset.replace(sampling=preset.sampling.__class__(content_steps=content_steps, motion_steps=motion_steps)))
    with torch.device("meta"):
        unet = video_unet(preset)
        x, text = baseline_step_input(preset, unet, batch=2)
        per_step = count_flops(lambda: unet(x, torch.zeros(2), encoder_hidden_states=text))
    baseline = content_steps * per_step
    cmd_flops = cmd["sampling"]["tflops"] * 1e12
    return {"cmd_tflops": round(cmd_flops / 1e12, 6), "baseline_tflops": round(baseline / 1e12, 6),
            "flops_ratio": round(baseline / cmd_flops, 2), "cmd_params": cmd["sampling"]["params"],
            "baseline_params": sum(p.numel() for p in unet.parameters())}


def _timed(fn, device) -> tuple[float, float | None]:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
        fn()
    if cuda:
        torch.cuda.synchronize()
    peak = round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None
    return time.perf_counter() - start, peak


def run_cmd(preset, device, content_steps, motion_steps):
    """Random-weight CMD models: the cost does not depend on the weights."""
    ae = VideoAutoencoder.from_preset_config(preset.autoencoder).to(device).eval()
    motion = DiT.from_preset_config(preset.motion).to(device).eval()
    if preset.mode == "latent":
        unet = UNet2DConditionModel(sample_size=preset.latent_size[0], **unet_config(preset)).to(device).eval()
        tokens = torch.randn(1, TEXT_TOKENS, unet.config.cross_attention_dim, device=device)
        content_fn, scheduler = unet_denoiser(unet, tokens, torch.zeros_like(tokens)), dit_scheduler()
        cond = dict(text=torch.randn(1, preset.motion.text_dim, device=device))
    else:
        dit = DiT.from_preset_config(preset.content).to(device).eval()
        labels = torch.zeros(1, dtype=torch.long, device=device)
        content_fn, scheduler, cond = dit_denoiser(dit, labels=labels), dit_scheduler(), dict(labels=labels)

    def generate():
        content = ddim_sample(content_fn, (1, *preset.content_shape), scheduler, content_steps, 7.5, device=device)
        z = ddim_sample(dit_denoiser(motion, content=content, **cond), (1, *preset.motion_shape), dit_scheduler(), motion_steps, 7.5, device=device)
        return ae.decode(content, z)

    generate() if device.type == "cuda" else None  # warm-up: kernels and allocator
    return _timed(generate, device)


def run_baseline(preset, device, steps):
    unet = video_unet(preset).to(device).eval()
    _, text = baseline_step_input(preset, unet, batch=1, device=device)
    c, h, w = preset.content_shape
    denoise = unet_denoiser(unet, text, torch.zeros_like(text))
    shape = (1, c, preset.autoencoder.num_frames, h, w)
    sample = lambda: ddim_sample(denoise, shape, dit_scheduler(), steps, 7.5, device=device)
    sample() if device.type == "cuda" else None
    return _timed(sample, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="webvid-sd21-512x1024", choices=list(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--content-steps", type=int, help="default: the preset's (paper: 50)")
    p.add_argument("--motion-steps", type=int, help="default: the preset's (paper: 100)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device, run nothing")
    args = p.parse_args()
    preset = get_preset(args.preset)
    content_steps = args.content_steps or preset.sampling.content_steps
    motion_steps = args.motion_steps or preset.sampling.motion_steps
    device = torch.device(args.device)
    out = {"benchmark": "sampling", "preset": preset.name, "content_steps": content_steps, "motion_steps": motion_steps,
           **flops(preset, content_steps, motion_steps)}
    if not args.flops_only:
        out["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        out["cmd_seconds"], out["cmd_peak_gb"] = (round(v, 3) if isinstance(v, float) else v for v in run_cmd(preset, device, content_steps, motion_steps))
        out["baseline_seconds"], out["baseline_peak_gb"] = (round(v, 3) if isinstance(v, float) else v for v in run_baseline(preset, device, content_steps))
        out["time_ratio"] = round(out["baseline_seconds"] / out["cmd_seconds"], 2)
    print(json.dumps({**out, **PAPER}))


if __name__ == "__main__":
    main()
