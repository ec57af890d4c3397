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

    python benchmarks/sampling.py --paper-setting --compile reduce-overhead   # GPU: Table 9's setting
    python benchmarks/sampling.py --preset tiny --device cpu --paper-setting --compile default

--paper-setting adds the paper's Table 9 setting (both models 50 DDIM steps, fp16 on CUDA,
memory-efficient attention, SD decoder excluded; batch 1 and 4): one JSON line per batch, timed
from noise to the decoded autoencoder output, eager and, with --compile MODE, compiled
(cmd_model.speed; the first, compiling call is timed apart and left out); the median of
--repeats runs. Per video seconds are the batch's time / its size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import UNet2DConditionModel, UNet3DConditionModel

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.denoisers import dit_denoiser, unet_denoiser
from cmd_model.diffusion import ddim_sample, dit_scheduler
from cmd_model.dit import DiT
from cmd_model.presets import PRESETS, get_preset
from cmd_model.report import TEXT_TOKENS, count_flops, report, unet_config
from cmd_model.speed import COMPILE_MODES, SamplingSpeed

PAPER = {
    "paper_cmd_seconds_a100": 3.13,
    "paper_cmd_memory_gb_a100": 5.56,
    "paper_cmd_tflops": 46.8,
    "paper_flops_ratio_vs_modelscope": 20.1,
    "paper_flops_ratio_vs_lvdm": 13.4,
}

TINY_VIDEO_UNET = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
)


def video_unet(preset) -> UNet3DConditionModel:
    """The baseline: diffusers' defaults are ModelScope T2V's UNet; cross-attention sized to the preset's text."""
    if preset.name.startswith("tiny"):
        channels = preset.content_shape[0]  # 4 SD latent channels, or 3 RGB in pixel mode
        return UNet3DConditionModel(in_channels=channels, out_channels=channels, **TINY_VIDEO_UNET)
    text_dim = unet_config(preset)["cross_attention_dim"] if preset.mode == "latent" else 1024
    return UNet3DConditionModel(
        in_channels=preset.content_shape[0], out_channels=preset.content_shape[0], cross_attention_dim=text_dim
    )


def baseline_step_input(preset, unet, batch: int, device=None):
    c, h, w = preset.content_shape
    x = torch.randn(batch, c, preset.autoencoder.num_frames, h, w, device=device)
    text = torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, device=device)
    return x, text


def flops(preset, content_steps: int, motion_steps: int) -> dict:
    """CMD's and the baseline's FLOPs for one video, on the meta device."""
    cmd = report(
        preset.replace(sampling=preset.sampling.__class__(content_steps=content_steps, motion_steps=motion_steps))
    )
    with torch.device("meta"):
        unet = video_unet(preset)
        x, text = baseline_step_input(preset, unet, batch=2)
        per_step = count_flops(lambda: unet(x, torch.zeros(2), encoder_hidden_states=text))
    baseline = content_steps * per_step
    cmd_flops = cmd["sampling"]["tflops"] * 1e12
    return {
        "cmd_tflops": round(cmd_flops / 1e12, 6),
        "baseline_tflops": round(baseline / 1e12, 6),
        "flops_ratio": round(baseline / cmd_flops, 2),
        "cmd_params": cmd["sampling"]["params"],
        "baseline_params": sum(p.numel() for p in unet.parameters()),
    }


def _timed(fn, device) -> tuple[float, float | None]:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    if cuda:
        torch.cuda.synchronize()
    peak = round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None
    return time.perf_counter() - start, peak


def run_cmd(
    preset, device, content_steps, motion_steps, batch: int = 1, speed: SamplingSpeed | None = None, repeats: int = 1
) -> dict:
    """Random-weight CMD models (the cost does not depend on the weights); the denoisers run as
    `speed` says (CMDGenerator's options), the autoencoder decode in float32."""
    speed = speed or SamplingSpeed(precision="float16" if device.type == "cuda" else "float32")
    ae = VideoAutoencoder.from_preset_config(preset.autoencoder).to(device).eval()
    motion = speed.prepare(DiT.from_preset_config(preset.motion).to(device).eval())
    if preset.mode == "latent":
        unet = UNet2DConditionModel(sample_size=preset.latent_size[0], **unet_config(preset)).to(device).eval()
        tokens = torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, device=device)
        content_fn, scheduler = (
            unet_denoiser(speed.prepare(unet), tokens, torch.zeros_like(tokens[:1])),
            dit_scheduler(),
        )
        cond = dict(text=torch.randn(batch, preset.motion.text_dim, device=device))
    else:
        dit = speed.prepare(DiT.from_preset_config(preset.content).to(device).eval())
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        content_fn, scheduler, cond = dit_denoiser(dit, labels=labels), dit_scheduler(), dict(labels=labels)

    def generate():
        with speed.autocast(device):
            content = ddim_sample(
                content_fn, (batch, *preset.content_shape), scheduler, content_steps, 7.5, device=device
            )
            z = ddim_sample(
                dit_denoiser(motion, content=content, **cond),
                (batch, *preset.motion_shape),
                dit_scheduler(),
                motion_steps,
                7.5,
                device=device,
            )
        return ae.decode(content, z)

    first = None
    if device.type == "cuda" or speed.compile:  # warm-up: kernels, the allocator, and compiling
        first, _ = _timed(generate, device)
    timed = [_timed(generate, device) for _ in range(repeats)]
    seconds = statistics.median(t for t, _ in timed)
    peak = max((p for _, p in timed if p is not None), default=None)
    return {
        "seconds": round(seconds, 3),
        "peak_gb": peak,
        "repeats": repeats,
        "first_call_seconds": None if first is None else round(first, 1),
    }


def run_baseline(preset, device, steps):
    unet = video_unet(preset).to(device).eval()
    _, text = baseline_step_input(preset, unet, batch=1, device=device)
    c, h, w = preset.content_shape
    denoise = unet_denoiser(unet, text, torch.zeros_like(text))
    shape = (1, c, preset.autoencoder.num_frames, h, w)
    fp16 = SamplingSpeed(precision="float16" if device.type == "cuda" else "float32")

    def sample():
        with fp16.autocast(device):
            return ddim_sample(denoise, shape, dit_scheduler(), steps, 7.5, device=device)

    sample() if device.type == "cuda" else None
    return _timed(sample, device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="webvid-sd21-512x1024", choices=list(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--content-steps", type=int, help="default: the preset's (paper: 50)")
    p.add_argument("--motion-steps", type=int, help="default: the preset's (paper: 100)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device, run nothing")
    p.add_argument(
        "--paper-setting",
        action="store_true",
        help="also the paper's Table 9 setting: 50 + 50 steps, fp16, batch 1 and 4",
    )
    p.add_argument(
        "--compile", choices=COMPILE_MODES, help="--paper-setting: also compiled (torch.compile mode), beside eager"
    )
    p.add_argument(
        "--batches", type=int, nargs="+", default=[1, 4], help="--paper-setting: videos per batch (paper: 1 and 4)"
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="--paper-setting: timed runs per line (the median is printed)"
    )
    args = p.parse_args(argv)
    preset = get_preset(args.preset)
    content_steps = args.content_steps or preset.sampling.content_steps
    motion_steps = args.motion_steps or preset.sampling.motion_steps
    device = torch.device(args.device)
    out = {
        "benchmark": "sampling",
        "preset": preset.name,
        "content_steps": content_steps,
        "motion_steps": motion_steps,
        **flops(preset, content_steps, motion_steps),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if not args.flops_only:
        out["device"] = name
        cmd = run_cmd(preset, device, content_steps, motion_steps)
        out["cmd_seconds"], out["cmd_peak_gb"] = cmd["seconds"], cmd["peak_gb"]
        out["baseline_seconds"], out["baseline_peak_gb"] = (
            round(v, 3) if isinstance(v, float) else v for v in run_baseline(preset, device, content_steps)
        )
        out["time_ratio"] = round(out["baseline_seconds"] / out["cmd_seconds"], 2)
    print(json.dumps({**out, **PAPER}), flush=True)
    if args.paper_setting and not args.flops_only:
        # Fp16 on the CPU is emulated: slower, not the paper's
        precision = "float16" if device.type == "cuda" else "float32"
        for batch in args.batches:
            for mode in (None, *([args.compile] if args.compile else [])):
                timed = run_cmd(
                    preset, device, 50, 50, batch, SamplingSpeed(compile=mode, precision=precision), args.repeats
                )
                print(
                    json.dumps(
                        {
                            "benchmark": "sampling",
                            "setting": "paper",
                            "preset": preset.name,
                            "device": name,
                            "content_steps": 50,
                            "motion_steps": 50,
                            "precision": precision,
                            "batch": batch,
                            "compile": mode or "eager",
                            **timed,
                            "seconds_per_video": round(timed["seconds"] / batch, 3),
                            **PAPER,
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
