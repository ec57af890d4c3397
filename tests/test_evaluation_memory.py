"""Streaming evaluation (issue 30, part 4): videos go through in fixed-size batches and only per-video
features and scores are kept, so

- the streamed metrics equal the whole-array ones of cmd_model.metrics on the same clips;
- the held-out motion loss (retraining's promotion metric) does not depend on the batch size;
- the evaluation's peak memory is the same for 64 and for 256 videos (each run in its own process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.dit import DiT
from cmd_model.i3d import InceptionI3d
from cmd_model.metrics import cd_fvd, clipsim, fvd, psnr, ssim
from cmd_model.presets import get_preset
from pipelines.data.sources import write_manifest
from pipelines.data.synthetic_videos import write_clip_video
from pipelines.evaluation.evaluate import (
    Networks,
    Reconstructor,
    generated_batches,
    heldout_motion_loss,
    measure,
    one_clip_per_video,
    reconstruct,
)
from pipelines.evaluation.generation import write_outputs

ROOT = Path(__file__).resolve().parents[1]
MOVES = [("red", "right"), ("blue", "up"), ("green", "left"), ("red", "down"), ("blue", "right")]


def narrow_i3d(seed: int = 0) -> InceptionI3d:
    """I3D at 1/8 width (same input and output shapes), He-initialised so that its logits are not ~0."""
    torch.manual_seed(seed)
    model = InceptionI3d(width=0.125).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(module.weight)
    return model


def write_real_videos(folder: Path, height: int, width: int, count: int = len(MOVES)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (colour, direction) in enumerate(MOVES[:count]):
        write_clip_video(
            folder / f"v{i}.mp4", colour, direction, num_frames=24, width=width, height=height, start=(i, i)
        )
    return folder


def test_streamed_metrics_equal_the_whole_array_ones(tmp_path, tiny_sd_dir, tiny_autoencoder_dir, tiny_clip_dir):
    """Latent mode (the tiny SD's VAE in the round trip), every metric, batches of 2 over 5 real and 3
    generated videos (so the last batch is short): the numbers of cmd_model.metrics on whole arrays."""
    from transformers import CLIPModel, CLIPProcessor

    from cmd_model.videomae import VideoMAEConfig, VideoMAEv2

    p = get_preset("tiny")
    h, w = p.video_size
    real = write_real_videos(tmp_path / "real", h, w)
    fake = np.random.default_rng(0).integers(0, 256, (3, 16, h, w, 3), dtype=np.uint8)
    prompts = ["a red square", "a blue square moving up", "noise"]
    index = [{"file": f"f{i}.mp4", "prompt": prompt, "label": "", "seed": 0} for i, prompt in enumerate(prompts)]
    write_outputs(fake, ["f0", "f1", "f2"], str(tmp_path / "gen"), fps=8, index=index)
    torch.manual_seed(0)
    videomae = VideoMAEv2(VideoMAEConfig(embed_dim=48, depth=2, num_heads=4, image_size=112)).eval()
    clip = (CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir))
    networks = Networks(
        torch.device("cpu"),
        Reconstructor(p, str(tiny_autoencoder_dir), str(tiny_sd_dir), "cpu"),
        narrow_i3d(),
        videomae,
        clip,
        i3d_size=64,
    )
    streamed = measure(networks, p, str(real), str(tmp_path / "gen"), batch=2)

    clips, _ = one_clip_per_video(str(real), h, w)
    recon = reconstruct(p, str(tiny_autoencoder_dir), clips, str(tiny_sd_dir))
    assert streamed["protocol"]["real_videos"] == 5 and streamed["protocol"]["generated_videos"] == 3
    assert streamed["protocol"]["device"] == "cpu"
    # Integer sums of squares and float64 SSIM maps: equal but for the order of the last additions.
    assert streamed["psnr"] == pytest.approx(psnr(clips, recon), rel=1e-12)
    assert streamed["ssim"] == pytest.approx(ssim(clips, recon), rel=1e-12)
    # float32 networks run on batches of 2 here and of 8 there: last-bit differences in the features.
    assert streamed["r_fvd"] > 0 and streamed["r_fvd"] == pytest.approx(fvd(networks.i3d, clips, recon, 64), rel=1e-5)
    assert streamed["fvd"] > 0 and streamed["fvd"] == pytest.approx(fvd(networks.i3d, clips, fake, 64), rel=1e-5)
    assert streamed["cd_fvd"] > 0 and streamed["cd_fvd"] == pytest.approx(cd_fvd(videomae, clips, fake), rel=1e-5)
    assert streamed["clipsim"] == pytest.approx(clipsim(*clip, fake, prompts), rel=1e-6)


def test_heldout_loss_does_not_depend_on_the_batch_size(tmp_path):
    p = get_preset("tiny-pixel")
    torch.manual_seed(0)
    VideoAutoencoder.from_preset_config(p.autoencoder).save_pretrained(tmp_path / "ae")
    motion = DiT.from_preset_config(p.motion)
    for weight in motion.parameters():  # an untrained DiT outputs zeros, whatever its input
        torch.nn.init.normal_(weight, std=0.2)
    motion.save_pretrained(tmp_path / "motion")
    h, w = p.video_size
    write_real_videos(tmp_path / "videos", h, w)
    manifest = write_manifest(
        [{"path": f"videos/v{i}.mp4", "label": i % 3 if i != 4 else None} for i in range(5)],
        str(tmp_path / "held_out.csv"),
    )
    loss = lambda batch: heldout_motion_loss(
        p, manifest, str(tmp_path / "ae"), str(tmp_path / "motion"), None, batch=batch
    )
    one_at_a_time, all_at_once, uneven = loss(1), loss(5), loss(2)
    assert one_at_a_time > 0
    assert all_at_once == pytest.approx(one_at_a_time, rel=1e-5) and uneven == pytest.approx(one_at_a_time, rel=1e-5)


# ---------------------------------------------------------------------------------------
# Memory: the same peak for 64 and 256 videos
# ---------------------------------------------------------------------------------------
# Pixel mode at 32x48 (tiny-pixel's autoencoder at that size): the tiny preset's latent round trip
# through the SD VAE costs ~60 ms a clip on this CPU, too slow for 512 clips in a test. A clip is
# 16 x 32 x 48 x 3 = 74 KB, 37.7 MB for 512. The whole-array path held the real clips, their
# reconstructions and the fakes (113 MB at 512 videos, 14 MB at 64), and PSNR made float64 copies
# of them (302 MB each at 512). Measured on this run with that code (the commit before streaming):
# peak RSS 1,232 MB at 64 videos and 1,642 MB at 512, +410 MB, ten times the slack allowed here;
# streaming, 937 and 948 MB. (Importing torch and the pipeline is ~900 MB of it.)
SIZE = (32, 48)
I3D_SIZE = 32  # the narrow I3D's input side (shorter side resized to it, centre crop)
SLACK_MB = 40  # allowed growth: features are 3 x 400 float64 a video (4.9 MB at 512), plus allocator noise
# Four times the small run: the whole-array code grew ~0.9 MB a video (+410 MB from 64 to 512), ~170 MB
# here, four times the slack; 512 (measured once, below) took 19 s more of the suite for the same answer.
LARGE = 256


def memory_preset():
    p = get_preset("tiny-pixel")
    ae = dataclasses.replace(p.autoencoder, height=SIZE[0], width=SIZE[1], patch_size=8)
    return p.replace(video_size=SIZE, autoencoder=ae)


def child(root: str, videos: int) -> None:
    """Evaluate `videos` real and generated videos (PSNR, SSIM, R-FVD, FVD) and print the process's peak RSS."""
    preset = memory_preset()
    networks = Networks(
        torch.device("cpu"), Reconstructor(preset, f"{root}/ae", None, "cpu"), narrow_i3d(), i3d_size=I3D_SIZE
    )
    start = time.monotonic()
    results = measure(networks, preset, f"{root}/real.csv", f"{root}/gen", max_videos=videos)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mb": peak_mb, "seconds": time.monotonic() - start, **results}))


def run_child(root: Path, videos: int) -> dict:
    # One thread: the measure is memory, and each thread's allocator arena would add to it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, str(root), str(videos)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_evaluation_memory_is_flat_from_64_to_256_videos(tmp_path):
    preset = memory_preset()
    torch.manual_seed(0)
    VideoAutoencoder.from_preset_config(preset.autoencoder).save_pretrained(tmp_path / "ae")
    write_real_videos(tmp_path / "videos", *SIZE, count=4)
    # 256 real videos: a manifest naming the four files in turn (each row is decoded on its own).
    write_manifest([{"path": f"videos/v{i % 4}.mp4"} for i in range(LARGE)], str(tmp_path / "real.csv"))
    # 256 generated videos: one lossless array and hard links to it (each is read on its own).
    fake = np.random.default_rng(0).integers(0, 256, (16, *SIZE, 3), dtype=np.uint8)
    write_outputs(fake[None], ["g0000"], str(tmp_path / "gen"), fps=8)
    for i in range(1, LARGE):
        os.link(tmp_path / "gen" / "g0000.npz", tmp_path / "gen" / f"g{i:04d}.npz")
    assert len(generated_batches(str(tmp_path / "gen"), *SIZE)[1]) == LARGE

    small, large = run_child(tmp_path, 64), run_child(tmp_path, LARGE)
    assert (small["protocol"]["real_videos"], large["protocol"]["real_videos"]) == (64, LARGE)
    assert (small["protocol"]["generated_videos"], large["protocol"]["generated_videos"]) == (64, LARGE)
    assert all(key in large for key in ("psnr", "ssim", "r_fvd", "fvd"))
    growth = large["peak_mb"] - small["peak_mb"]
    print(f"peak RSS: {small['peak_mb']:.0f} MB at 64 videos, {large['peak_mb']:.0f} MB at {LARGE} ({growth:+.0f} MB)")
    assert growth < SLACK_MB, (small["peak_mb"], large["peak_mb"])


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]))
