"""Does CMD learn? Fails when the models stop learning the moving shapes, not only when shapes break.

In one process on the CPU (no Ray: the plumbing is tested elsewhere), at the shapes-pixel
preset's sizes and fewer steps than the demo, on the demo's diverse data (any shape, any place,
textured backgrounds, 16 classes): the autoencoder must reach a PSNR floor on held-out clips; the
motion DiT must read where the shape is from the content frame of held-out clips at new places,
and must not with the content frame zeroed (the ablation); the chain (content DiT -> motion DiT ->
decoder) must generate the asked colour moving the asked way at places that spread over seeds,
judged by pipelines.evaluation.shape_detector from the decoded videos alone. Thresholds are below what
measured runs reached (see each assert); the ablation and an untrained content DiT score near
chance, so neither a seed nor a lenient detector can pass.
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
from pipelines.data.synthetic_videos import SHAPES, draw_shape_video, shape_caption, shape_classes
from pipelines.evaluation.shape_detector import judge, spread
from pipelines.training.optim import make_ema, update_ema

PRESET = get_preset("shapes-pixel")
AE_STEPS, MOTION_STEPS, CONTENT_STEPS = 500, 800, 600  # the demo trains longer (pipelines/demo.py)
CLASSES = shape_classes(16)


def clips(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class clips of every class drawn as the demo's built-in videos (any shape, any place, its
    own background) as [N, 3, 16, 32, 32] in [-1, 1], and labels. Other seeds: other places."""
    rng = np.random.default_rng(seed)
    frames, labels = [], []
    for label, (colour, direction) in enumerate(CLASSES):
        for _ in range(per_class):
            video, _ = draw_shape_video(rng, colour, direction, SHAPES[rng.integers(len(SHAPES))])
            frames.append(video)
            labels.append(label)
    return uint8_to_unit(torch.from_numpy(np.stack(frames))).transpose(1, 2).contiguous(), torch.tensor(labels)


def psnr(a, b) -> float:
    return float(10 * torch.log10(4 / F.mse_loss(a, b)))


def prompts(labels) -> list[str]:
    return [shape_caption(*CLASSES[int(y)]) for y in labels]


@pytest.fixture(scope="module")
def shapes():
    """Training clips (32 a class), held-out clips at places of their own (3 a class), and the
    shapes-pixel autoencoder trained on the training clips, with both sets encoded."""
    torch.manual_seed(0)
    x, y = clips(32, seed=0)
    held, held_y = clips(3, seed=1)
    ae = VideoAutoencoder.from_preset_config(PRESET.autoencoder)
    optimizer = torch.optim.AdamW(ae.parameters(), lr=PRESET.autoencoder_lr, betas=(0.5, 0.9))
    for _ in range(AE_STEPS):
        batch = x[torch.randint(0, len(x), (PRESET.autoencoder_batch_size,))]
        loss = F.mse_loss(ae(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ae.eval()
    with torch.no_grad():
        latents, held_latents = ae.encode(x), ae.encode(held)
    return dict(ae=ae, labels=y, latents=latents, held=held, held_labels=held_y, held_latents=held_latents)


def test_autoencoder_reaches_a_psnr_floor_on_held_out_clips(shapes):
    with torch.no_grad():
        value = psnr(shapes["ae"](shapes["held"]), shapes["held"])
    print(f"held-out PSNR {value:.2f} dB")
    # Measured (2026-12-07, one thread): 25.6 dB at 500 steps (torch seed 1: 25.3), 26.0 at 600, 24.8 at
    # 400, 21.3 at 100; the demo reaches 30.5 at 1,200 steps.
    assert value > 24.0, value


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


def sample(dit, shape, seed: int, **condition) -> torch.Tensor:
    config = dit.config
    scale = PRESET.sampling.cfg_motion if config.context_channels else PRESET.sampling.cfg_content
    return ddim_sample(
        dit_denoiser(dit, **condition),
        (len(condition["labels"]), *shape),
        dit_scheduler(config.prediction_type),
        25,
        scale,
        torch.Generator().manual_seed(seed),
        clip_sample=not config.context_channels,
    )


def decoded(ae, content, motion) -> list[np.ndarray]:
    with torch.no_grad():
        return list(unit_to_uint8(ae.decode(content, motion).transpose(1, 2)))


@pytest.fixture(scope="module")
def motion_dit(shapes):
    content, motion = shapes["latents"]
    return train_dit(
        PRESET.motion, motion, lambda idx: dict(content=content[idx], labels=shapes["labels"][idx]), MOTION_STEPS
    )


def test_the_motion_dit_reads_the_place_from_the_content_frame(shapes, motion_dit):
    # CMD's dense conditioning: given the true content frames of held-out clips, whose shapes sit
    # at places no training clip had, the motion DiT must move the shape the asked way from where
    # the content frame has it. The same DiT given a zeroed content frame must not: the content
    # frame, not the class or a seed, is what places the motion.
    ae, labels = shapes["ae"], shapes["held_labels"]
    content, true_motion = shapes["held_latents"]
    asked = prompts(labels)
    with torch.no_grad():
        truth = judge(decoded(ae, content, true_motion), asked)
        seen = judge(
            decoded(ae, content, sample(motion_dit, PRESET.motion_shape, 1, content=content, labels=labels)), asked
        )
        blind = judge(
            decoded(
                ae,
                content,
                sample(motion_dit, PRESET.motion_shape, 1, content=torch.zeros_like(content), labels=labels),
            ),
            asked,
        )
    errors = [
        abs(t["across"] - s["across"])
        for t, s in zip(truth["rows"], seen["rows"])
        if t["across"] is not None and s["across"] is not None
    ]
    print(
        f"held out: truth direction {truth['direction_accuracy']:.2f}; content frame given: direction "
        f"{seen['direction_accuracy']:.2f}, colour {seen['colour_accuracy']:.2f}, median place error "
        f"{np.median(errors):.2f} px over {len(errors)}; zeroed: direction {blind['direction_accuracy']:.2f}"
    )
    # Measured (2026-12-07, one thread): round trip 100%; with the content frame direction 100%, colour
    # 96%, median place error 0.17 px over 48 clips; zeroed 42%. (With torch seed 1 instead of 0 the
    # zeroed DiT reached 79%: this ablation is the test's weakest, docs/how_the_demo_learns.md.)
    assert truth["direction_accuracy"] >= 0.9, truth  # the autoencoder's own round trip
    assert seen["direction_accuracy"] >= 0.9, seen
    assert len(errors) >= 0.9 * len(labels) and np.median(errors) <= 2.0, errors
    assert blind["direction_accuracy"] <= 0.6, blind  # the ablation fails


def test_the_chain_generates_the_asked_colour_and_direction_at_many_places(shapes, motion_dit):
    # The demo's chain, reduced: class -> content DiT -> motion DiT -> decoder, every class with
    # 4 seeds, judged from the decoded videos alone; the places spread over seeds. An untrained
    # content DiT scores near chance.
    content, _ = shapes["latents"]
    asked = torch.arange(len(CLASSES)).repeat(4)

    def judged(content_dit):
        with torch.no_grad():
            frames = sample(content_dit, PRESET.content_shape, 0, labels=asked)
            motion = sample(motion_dit, PRESET.motion_shape, 1, content=frames, labels=asked)
        return judge(decoded(shapes["ae"], frames, motion), prompts(asked))

    untrained = judged(DiT.from_preset_config(PRESET.content).eval())
    content_dit = train_dit(PRESET.content, content, lambda idx: dict(labels=shapes["labels"][idx]), CONTENT_STEPS)
    trained = judged(content_dit)
    print(
        f"untrained: colour {untrained['colour_accuracy']:.2f} direction {untrained['direction_accuracy']:.2f}; "
        f"trained: colour {trained['colour_accuracy']:.2f} direction {trained['direction_accuracy']:.2f} "
        f"spread {spread(trained['rows'])} px"
    )
    # Measured (2026-12-07, one thread, 600 content steps): untrained colour 0%, direction 0%; trained
    # colour 88%, direction 83%, spread 3.3 px (torch seed 1: 78%, 81%, both 72%, 3.73 px; at 1,000
    # steps 94%, 91%, 3.14 px; at 1,500 98%, 97%, 3.42 px). The training clips spread about 6.9 px.
    assert untrained["both_accuracy"] <= 0.15, untrained
    assert trained["colour_accuracy"] >= 0.5 and trained["both_accuracy"] >= 0.4, trained
    assert spread(trained["rows"]) >= 2.0, trained


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
