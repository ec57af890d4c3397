"""Seconds per training step and peak memory of each CMD component, as the paper's Table 8.

    python benchmarks/train_step.py --preset webvid-sd15-512            # on a GPU
    python benchmarks/train_step.py --preset tiny --device cpu          # anywhere

Prints one JSON line per component (autoencoder, content, motion): median seconds per
optimizer step (forward + backward + AdamW) at batch 1, peak GPU memory, params, and the
paper's A100-80GB figures at 512x512 beside it (0.109 / 0.151 / 0.100 s; 8.93 / 21.5 / 18.7 GB).
Mixed precision (bf16 autocast) on CUDA, as in the paper's setting; no gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.dit import DiT
from cmd_model.presets import PRESETS, get_preset
from cmd_model.report import TEXT_TOKENS, dit_inputs, unet_config

PAPER = {  # Table 8: 16 frames at 512x512, batch 1, one A100-80GB
    "autoencoder": {"paper_s_per_step": 0.109, "paper_memory_gb": 8.93},
    "content": {"paper_s_per_step": 0.151, "paper_memory_gb": 21.5},
    "motion": {"paper_s_per_step": 0.100, "paper_memory_gb": 18.7},
}


def components(preset, device):
    """name -> (model, step_fn returning a scalar loss)."""
    ae = VideoAutoencoder.from_preset_config(preset.autoencoder).to(device)
    video = torch.randn(1, preset.content_shape[0], preset.autoencoder.num_frames, *preset.latent_size, device=device)
    yield "autoencoder", ae, lambda: (ae(video) - video).pow(2).mean()

    if preset.mode == "latent":
        unet = UNet2DConditionModel(sample_size=preset.latent_size[0], **unet_config(preset)).to(device)
        x = torch.randn(1, *preset.content_shape, device=device)
        text = torch.randn(1, TEXT_TOKENS, unet.config.cross_attention_dim, device=device)
        t = torch.tensor([500], device=device)
        yield "content", unet, lambda: (unet(x, t, encoder_hidden_states=text).sample - x).pow(2).mean()
    else:
        content = DiT.from_preset_config(preset.content).to(device)
        kw = {k: v.to(device) for k, v in dit_inputs(content, 1).items()}
        yield "content", content, lambda: (content(**kw) - kw["x"]).pow(2).mean()

    motion = DiT.from_preset_config(preset.motion).to(device)
    kw = {k: v.to(device) for k, v in dit_inputs(motion, 1).items()}
    yield "motion", motion, lambda: (motion(**kw) - kw["x"]).pow(2).mean()


def measure(model, loss_fn, device, steps: int, warmup: int) -> tuple[float, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None
    return statistics.median(times), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="webvid-sd15-512", choices=list(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    preset = get_preset(args.preset)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for name, model, loss_fn in components(preset, device):
        seconds, peak = measure(model, loss_fn, device, args.steps, args.warmup)
        print(
            json.dumps(
                {
                    "benchmark": "train_step",
                    "component": name,
                    "preset": preset.name,
                    "device": card,
                    "batch": 1,
                    "s_per_step": round(seconds, 4),
                    "peak_memory_gb": peak,
                    "params": sum(q.numel() for q in model.parameters()),
                    **PAPER[name],
                }
            ),
            flush=True,
        )
        del model, loss_fn
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
