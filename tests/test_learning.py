"""Does CMD learn? Fails when the models stop learning the moving shapes, not only when shapes break.

In one process on the CPU (no Ray: the plumbing is tested elsewhere), at the shapes-pixel
preset's sizes, with fewer steps than the demo: the autoencoder must reach a PSNR floor, and the
motion DiT given the true content frame must move the square in the asked direction, judged by
pipelines.shape_detector from the decoded video alone. Thresholds are below what measured runs
reached (see each assert), and the same test with the DiT left untrained scores near chance, so
neither a seed nor a lenient detector can pass it.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import uint8_to_unit, unit_to_uint8
from cmd_model.denoisers import dit_denoiser
from cmd_model.diffusion import ddim_sample, diffusion_loss, dit_scheduler
from cmd_model.dit import DiT
from cmd_model.presets import get_preset
from pipelines.shape_detector import judge
from pipelines.synthetic_videos import CLASSES, caption, draw
from pipelines.training.optim import make_ema, update_ema

PRESET = get_preset("shapes-pixel")
AE_STEPS, MOTION_STEPS = 300, 1000


def clips(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """count clips (every class in turn, starts on the 8-pixel grid) as [N, 3, 16, 32, 32] in [-1, 1], and labels."""
    rng = np.random.default_rng(seed)
    size = PRESET.video_size[0]
    frames, labels = [], []
    for i in range(count):
        colour, direction = CLASSES[i % 12]
        start = tuple(int(v) * 8 for v in rng.integers(0, size // 8, 2))
        frames.append(np.stack([draw(colour, direction, f, size, size, start) for f in range(16)]))
        labels.append(i % 12)
    return uint8_to_unit(torch.from_numpy(np.stack(frames))).transpose(1, 2).contiguous(), torch.tensor(labels)


def psnr(a, b) -> float:
    return float(10 * torch.log10(4 / F.mse_loss(a, b)))


@pytest.fixture(scope="module")
def trained_autoencoder():
    torch.manual_seed(0)
    x, _ = clips(192, seed=0)
    ae = VideoAutoencoder.from_preset_config(PRESET.autoencoder)
    optimizer = torch.optim.AdamW(ae.parameters(), lr=PRESET.autoencoder_lr, betas=(0.5, 0.9))
    for _ in range(AE_STEPS):
        batch = x[torch.randint(0, len(x), (PRESET.batch_size,))]
        loss = F.mse_loss(ae(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ae.eval()


def test_autoencoder_reaches_a_psnr_floor_on_held_out_clips(trained_autoencoder):
    held_out, _ = clips(24, seed=1)
    with torch.no_grad():
        value = psnr(trained_autoencoder(held_out), held_out)
    assert value > 24.0, value  # a floor below the measured runs' (26 dB at 125 steps in the demo's Ray run)


def test_motion_dit_moves_the_square_the_asked_way(trained_autoencoder):
    torch.manual_seed(0)
    x, labels = clips(192, seed=2)
    with torch.no_grad():
        content, motion = trained_autoencoder.encode(x)
    dit = DiT.from_preset_config(PRESET.motion)
    scheduler = dit_scheduler(PRESET.motion.prediction_type)
    ema = make_ema(dit)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=PRESET.diffusion_lr)

    def directions_right(model) -> float:
        test = slice(0, 24)
        with torch.no_grad():
            z = ddim_sample(dit_denoiser(model, content=content[test], labels=labels[test]), tuple(motion[test].shape),
                            scheduler, 25, PRESET.sampling.cfg_motion, torch.Generator().manual_seed(0))
            video = unit_to_uint8(trained_autoencoder.decode(content[test], z).transpose(1, 2))
        return judge(list(video), [caption(*CLASSES[int(y)]) for y in labels[test]])["direction_accuracy"]

    before = directions_right(dit.eval())
    dit.train()
    for step in range(MOTION_STEPS):
        idx = torch.randint(0, len(x), (32,))
        loss = diffusion_loss(dit_denoiser(dit, content=content[idx], labels=labels[idx]), motion[idx], scheduler)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, dit, 0.999, step)
    after = directions_right(ema)
    assert before <= 0.4, before  # untrained: no motion, or motion by chance
    print(f"direction right: untrained {before:.2f}, trained {after:.2f}")
    # Measured (2 cores, this test's seeds): 29% right at 250 steps, 29% at 500, 100% at 1,000 (with
    # guidance 2 and 4, EMA and raw weights alike): direction is learned late and then all at once.
    assert after >= 0.75, after


def test_v_prediction_is_what_loss_and_sampler_share():
    scheduler = dit_scheduler("v_prediction")
    x0 = torch.randn(4, 8, 16, 8)
    captured = {}

    def denoise(x_t, t, drop):
        captured["t"], captured["x_t"] = t, x_t
        return torch.zeros_like(x_t)

    loss = diffusion_loss(denoise, x0, scheduler, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    target = scheduler.get_velocity(x0, noise, captured["t"])
    assert torch.isclose(loss, (target ** 2).mean())
    with pytest.raises(ValueError, match="prediction_type"):
        DiT(input_size=(16, 8), in_channels=8, hidden_size=32, depth=1, num_heads=2, prediction_type="eps")
