"""What the evaluation measures, item by item (issue 11): fakes read losslessly, one seeded random
real clip per video, each held-out clip scored with its own video's condition, pixel content
frames clipped, one PSNR, batched SSIM, the guidance convention."""

import csv

import numpy as np
import pytest
import torch

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.dit import DiT
from cmd_model.metrics import psnr, ssim
from cmd_model.presets import get_preset
from pipelines.data.synthetic_videos import write_clip_video
from pipelines.data.video.decode import decode_clips
from pipelines.data.video.schema import FRAMES, ClipSpec
from pipelines.evaluation.evaluate import (
    LOSSLESS,
    generated_batches,
    generated_prompts,
    heldout_motion_loss,
    one_clip_per_video,
)
from pipelines.evaluation.generation import write_outputs


def test_generated_videos_are_evaluated_on_the_generator_arrays_not_the_mp4s(tmp_path):
    # H.264 would change every pixel
    videos = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 24, 3), dtype=np.uint8)
    index = [{"file": f"v{i}.mp4", "prompt": f"prompt {i}", "label": "", "seed": 0} for i in range(3)]
    write_outputs(videos, ["v0", "v1", "v2"], str(tmp_path), fps=8, index=index)
    which, names, batches = generated_batches(str(tmp_path), 16, 24, batch=2)
    assert which == LOSSLESS and names == ["v0", "v1", "v2"]
    read = list(batches)
    assert [name for _, batch_names in read for name in batch_names] == names
    np.testing.assert_array_equal(np.concatenate([batch for batch, _ in read]), videos)
    assert generated_prompts(str(tmp_path), names) == ["prompt 0", "prompt 1", "prompt 2"]


def test_the_real_clip_is_one_seeded_random_window_per_video(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(6):
        write_clip_video(folder / f"video_{i}.mp4", "red", "right", num_frames=48, width=16, height=16, start=(i, 0))
    clips, rows = one_clip_per_video(str(folder), 16, 16, seed=0)
    starts = [row["start_frame"] for row in rows]
    assert len(set(starts)) > 1 and all(0 <= s <= 32 for s in starts)  # not always the first 16 frames
    again, rows_again = one_clip_per_video(str(folder), 16, 16, seed=0)
    np.testing.assert_array_equal(again, clips)  # the same seed, the same clips
    other = [row["start_frame"] for row in one_clip_per_video(str(folder), 16, 16, seed=1)[1]]
    assert other != starts
    whole = decode_clips(rows[0]["source"], ClipSpec(height=16, width=16, num_frames=48, clips_per_video=1))[0][FRAMES]
    np.testing.assert_array_equal(clips[0], whole[starts[0] : starts[0] + 16])


def _manifest(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_heldout_loss_scores_each_clip_with_its_own_condition(tmp_path):
    """A broken held-out video must not shift the labels of the clips after it, and a clip
    without a label is scored with the null class (class 0 before)."""
    p = get_preset("tiny-pixel")
    torch.manual_seed(0)
    VideoAutoencoder.from_preset_config(p.autoencoder).save_pretrained(tmp_path / "ae")
    motion = DiT.from_preset_config(p.motion)
    for weight in motion.parameters():  # an untrained DiT's zero-initialised output ignores its condition
        torch.nn.init.normal_(weight, std=0.2)
    motion.save_pretrained(tmp_path / "motion")
    h, w = p.video_size
    for i, direction in enumerate(("right", "up", "left")):
        write_clip_video(tmp_path / f"v{i}.mp4", "red", direction, num_frames=20, width=w, height=h)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500)
    good = [{"path": "v0.mp4", "label": 1}, {"path": "v1.mp4", "label": 2}, {"path": "v2.mp4", "label": ""}]
    loss = lambda rows, name: heldout_motion_loss(
        p, _manifest(tmp_path / name, rows), str(tmp_path / "ae"), str(tmp_path / "motion"), None
    )
    clean = loss(good, "clean.csv")
    assert loss([{"path": "broken.mp4", "label": 4}, *good], "with_broken.csv") == pytest.approx(clean, rel=1e-6)
    assert loss([*good[:2], {"path": "v2.mp4", "label": 0}], "class0.csv") != pytest.approx(clean, rel=1e-6)


def test_psnr_is_the_mean_of_per_video_psnrs_everywhere():
    from pipelines.training import autoencoder, vae

    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (2, 4, 8, 8, 3), dtype=np.uint8)
    fake = real.copy()
    fake[0] = np.clip(fake[0].astype(int) + 40, 0, 255)  # one bad video, one perfect: means of dB, not of MSE
    fake[1] = np.clip(fake[1].astype(int) + 2, 0, 255)
    expected = np.mean([10 * np.log10(255**2 / np.mean((real[i].astype(float) - fake[i]) ** 2)) for i in range(2)])
    assert psnr(real, fake) == pytest.approx(expected)
    assert autoencoder.psnr is psnr and vae.psnr is psnr  # training's eval/psnr is the same function


def test_ssim_is_computed_in_batches_with_the_same_result():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (5, 4, 16, 16, 3), dtype=np.uint8)
    fake = np.clip(real + rng.normal(0, 20, real.shape), 0, 255).astype(np.uint8)
    assert ssim(real, fake, batch_frames=3) == pytest.approx(ssim(real, fake, batch_frames=1000), rel=1e-12)


def test_guidance_is_the_scale_s_and_the_presets_use_the_papers_values():
    from cmd_model.diffusion import guided_epsilon

    cond, null = torch.full((2, 3), 2.0), torch.full((2, 3), 0.5)
    denoise = lambda x, t, drop: torch.where(drop[:, None], null.repeat(2, 1), cond.repeat(2, 1))
    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert torch.equal(guided_epsilon(denoise, x, t, 1.0), cond)  # s = 1: no guidance
    assert torch.allclose(guided_epsilon(denoise, x, t, 9.0), null + 9.0 * (cond - null))
    for name in ("webvid-sd15-512", "webvid-sd21-512x1024"):
        assert (get_preset(name).sampling.cfg_content, get_preset(name).sampling.cfg_motion) == (9.0, 9.0)  # Table 3
    assert get_preset("ucf101-64").sampling.cfg_content == 4.0
    import subprocess
    import sys
    from pathlib import Path

    help_text = subprocess.run(
        [sys.executable, "jobs/generate.py", "--help"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "eps(null) + s * (eps(c) - eps(null))" in " ".join(help_text.split())


def test_pixel_content_frames_are_clipped_to_the_decoders_range():
    """Guidance overshoots x0; the pixel decoder only ever saw content frames in [-1, 1]."""
    from cmd_model.generate import CMDGenerator

    p = get_preset("tiny-pixel")
    torch.manual_seed(0)
    content_dit = DiT.from_preset_config(p.content)
    torch.nn.init.constant_(content_dit.final.linear.bias, 3.0)  # predicts far outside [-1, 1]
    generator = CMDGenerator(
        p, VideoAutoencoder.from_preset_config(p.autoencoder), DiT.from_preset_config(p.motion), content_dit
    )
    content = generator.sample_content(labels=[0, 1], steps=4, cfg=4.0, generator=torch.Generator().manual_seed(0))
    assert content.abs().max() <= 1.0 and content.abs().max() > 0.99


def test_each_stage_has_its_own_batch_default_and_the_autoencoder_loss_is_a_choice(tmp_path):
    from pipelines.training import ConfigError, TrainConfig
    from pipelines.training.autoencoder import AutoencoderStage

    common = dict(preset="ucf101-64", name="recipe", max_steps=1, storage=str(tmp_path))
    assert TrainConfig(stage="autoencoder", input="videos/", **common).global_batch == 24  # App. B.3
    assert TrainConfig(stage="motion", latents="latents/", **common).global_batch == 256
    assert TrainConfig(stage="autoencoder", input="videos/", **common).reconstruction_loss == "l2"  # the paper's
    with pytest.raises(ConfigError, match="--recon-loss"):
        TrainConfig(stage="autoencoder", input="videos/", recon_loss="lpips", **common)

    cfg = TrainConfig(
        stage="autoencoder",
        preset="tiny-pixel",
        name="l1",
        max_steps=1,
        storage=str(tmp_path),
        input="v/",
        recon_loss="l1",
    )
    stage = AutoencoderStage(cfg, {}, torch.device("cpu"))
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 24, 3), dtype=np.uint8))
    x = stage.to_input(frames)
    expected = torch.nn.functional.l1_loss(stage.model(x), x)
    assert stage.loss(stage.model, {"frames": frames}).item() == pytest.approx(expected.item(), rel=1e-5)

    # l1 + LPIPS (the released pixel-mode recipe), the VGG-16 backbone from a local torchvision state dict.
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, tmp_path / "vgg16.pth")
    with pytest.raises(ConfigError, match="--lpips-vgg"):
        TrainConfig(stage="autoencoder", input="v/", recon_loss="l1+lpips", **common)
    cfg = cfg.replace(recon_loss="l1+lpips", lpips_vgg=str(tmp_path / "vgg16.pth"))
    stage = AutoencoderStage(cfg, {}, torch.device("cpu"))
    recon = stage.model(x)
    flat = lambda v: v.permute(0, 2, 1, 3, 4).flatten(0, 1)
    with torch.no_grad():  # the backbone is the file's: lpips' slices compute torchvision's features
        vgg.eval()
        scaled = (flat(x) - stage.lpips.scaling_layer.shift) / stage.lpips.scaling_layer.scale
        assert torch.allclose(stage.lpips.net(scaled).relu5_3, vgg.features[:30](scaled), atol=1e-5)
    expected = torch.nn.functional.l1_loss(recon, x) + stage.lpips(flat(recon), flat(x)).mean()
    assert stage.loss(stage.model, {"frames": frames}).item() == pytest.approx(expected.item(), rel=1e-4)
