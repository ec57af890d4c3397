"""Does CMD learn? Fails when the models stop learning the moving shapes, not only when shapes break.

In one process on the CPU (no Ray: the plumbing is tested elsewhere), at the shapes-pixel
preset's sizes and about the demo's steps: the autoencoder must reach a PSNR floor on held-out clips,
and the chain (content DiT -> motion DiT -> decoder) must generate videos of the asked colour
moving the asked way, judged by pipelines.shape_detector from the decoded video alone. Thresholds
are below what measured runs reached (see each assert), and the same test with the DiT left
untrained scores near chance, so neither a seed nor a lenient detector can pass it.
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
from pipelines.synthetic_videos import CLASSES, SPEED, caption, draw, lane_start
from pipelines.training.optim import make_ema, update_ema

PRESET = get_preset("shapes-pixel")
AE_STEPS, CONTENT_STEPS, MOTION_STEPS = 300, 400, 500


def clips(count: int, seed: int, starts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """count clips like the demo's videos (every class in turn, on its lane, from one of `starts`
    places: 1 as the training videos, 4 as the held-out ones) as [N, 3, 16, 32, 32] in [-1, 1], and labels."""
    rng = np.random.default_rng(seed)
    size = PRESET.video_size[0]
    frames, labels = [], []
    for i in range(count):
        colour, direction = CLASSES[i % 12]
        start = lane_start(direction, int(rng.integers(0, starts)) * (size // starts))
        frames.append(np.stack([draw(colour, direction, f, size, size, start, SPEED) for f in range(16)]))
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
    held_out, _ = clips(24, seed=1, starts=4)
    with torch.no_grad():
        value = psnr(trained_autoencoder(held_out), held_out)
    assert value > 24.0, value  # a floor below the demo's Ray runs (28.7-30.5 dB on its held-out videos at 200 steps)


def train_dit(config, x0, condition, steps: int):
    """A DiT trained as the Ray stage trains it (AdamW, clipping 1.0, EMA 0.999 with warm-up); returns the EMA."""
    dit = DiT.from_preset_config(config)
    scheduler = dit_scheduler(config.prediction_type)
    ema = make_ema(dit)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=PRESET.diffusion_lr)
    for step in range(steps):
        idx = torch.randint(0, len(x0), (32,))
        loss = diffusion_loss(dit_denoiser(dit, **condition(idx)), x0[idx], scheduler)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, dit, 0.999, step)
    return ema


def generated_videos(content_dit, motion_dit, autoencoder, labels) -> np.ndarray:
    """The chain as cmd_model.generate runs it: class -> content frame -> motion latent -> decoded uint8 video."""
    s = PRESET.sampling
    with torch.no_grad():
        content = ddim_sample(
            dit_denoiser(content_dit, labels=labels),
            (len(labels), *PRESET.content_shape),
            dit_scheduler(PRESET.content.prediction_type),
            25,
            s.cfg_content,
            torch.Generator().manual_seed(0),
            clip_sample=True,
        )
        z = ddim_sample(
            dit_denoiser(motion_dit, content=content, labels=labels),
            (len(labels), *PRESET.motion_shape),
            dit_scheduler(PRESET.motion.prediction_type),
            25,
            s.cfg_motion,
            torch.Generator().manual_seed(1),
        )
        return unit_to_uint8(autoencoder.decode(content, z).transpose(1, 2))


def test_the_chain_generates_the_asked_colour_and_direction(trained_autoencoder):
    # The demo's chain, reduced: content DiT and motion DiT on the autoencoder's latents, then
    # every class twice through generation, judged from the decoded videos alone.
    torch.manual_seed(0)
    x, labels = clips(192, seed=2)
    with torch.no_grad():
        content, motion = trained_autoencoder.encode(x)
    asked = torch.arange(24) % 12
    prompts = [caption(*CLASSES[int(y)]) for y in asked]
    untrained = judge(
        list(
            generated_videos(
                DiT.from_preset_config(PRESET.content).eval(),
                DiT.from_preset_config(PRESET.motion).eval(),
                trained_autoencoder,
                asked,
            )
        ),
        prompts,
    )
    content_dit = train_dit(PRESET.content, content, lambda idx: dict(labels=labels[idx]), CONTENT_STEPS)
    motion_dit = train_dit(
        PRESET.motion, motion, lambda idx: dict(content=content[idx], labels=labels[idx]), MOTION_STEPS
    )
    trained = judge(list(generated_videos(content_dit, motion_dit, trained_autoencoder, asked)), prompts)
    print(
        f"untrained: colour {untrained['colour_accuracy']:.2f} direction {untrained['direction_accuracy']:.2f}; "
        f"trained: colour {trained['colour_accuracy']:.2f} direction {trained['direction_accuracy']:.2f}"
    )
    assert untrained["both_accuracy"] <= 0.25, untrained  # no square, or one by chance
    # Measured (2 cores, this test's seeds, 2026-12-02): untrained colour 0%, direction 50% (no
    # square to judge, or a still one), both 0%; trained colour 100%, direction 96%.
    assert trained["colour_accuracy"] >= 0.8 and trained["both_accuracy"] >= 0.75, trained


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
    assert torch.isclose(loss, (target**2).mean())
    with pytest.raises(ValueError, match="prediction_type"):
        DiT(input_size=(16, 8), in_channels=8, hidden_size=32, depth=1, num_heads=2, prediction_type="eps")
