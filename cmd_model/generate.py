"""Text or class -> 16-frame video, the CMD way (paper Algorithm 1).

1. content frame: DDIM + CFG with the content model (SD UNet on text, or class DiT)
2. motion latent: DDIM + CFG with the motion DiT, conditioned on the sampled content frame
   (guidance drops the text/class, keeps the content frame)
3. autoencoder decode -> frames (SD latents in latent mode) -> SD VAE decode -> uint8 RGB
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
from einops import rearrange
from PIL import Image

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import StableDiffusion, latents_to_video, unit_to_uint8
from cmd_model.denoisers import dit_denoiser, unet_denoiser
from cmd_model.diffusion import ddim_sample, dit_scheduler
from cmd_model.dit import DiT
from cmd_model.presets import Preset
from cmd_model.speed import SamplingSpeed


@dataclass
class CMDGenerator:
    """The three trained parts (+ SD in latent mode); `__call__` returns uint8 videos [B, L, H, W, 3]."""

    preset: Preset
    autoencoder: VideoAutoencoder
    motion: DiT
    content_dit: DiT | None = None  # pixel mode
    sd: StableDiffusion | None = None  # latent mode: fine-tuned UNet + VAE + text encoder
    speed: SamplingSpeed = field(default_factory=SamplingSpeed)  # compiled or eager, precision (cmd_model.speed)
    _prepared: dict = field(default_factory=dict, init=False, repr=False)  # id(module) -> what the sampler calls

    def denoiser(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` as the sampler calls it (compiled once per generator when speed.compile is set)."""
        if id(module) not in self._prepared:
            self._prepared[id(module)] = self.speed.prepare(module)
        return self._prepared[id(module)]

    @classmethod
    def from_pretrained(
        cls,
        preset: Preset,
        autoencoder: str,
        motion: str,
        content: str,
        stable_diffusion: str | None = None,
        speed: SamplingSpeed | None = None,
    ) -> "CMDGenerator":
        """Load save_pretrained folders; in latent mode `content` is the fine-tuned UNet folder."""
        parts = dict(
            preset=preset,
            autoencoder=VideoAutoencoder.from_pretrained(autoencoder),
            motion=DiT.from_pretrained(motion),
            speed=speed or SamplingSpeed(),
        )
        if preset.mode == "latent":
            sd = stable_diffusion or preset.stable_diffusion
            if sd is None:
                raise ValueError(f"preset {preset.name} is in latent mode: give the Stable Diffusion directory")
            parts["sd"] = StableDiffusion.from_pretrained(sd, unet=content)
        else:
            parts["content_dit"] = DiT.from_pretrained(content)
        return cls(**parts)

    @torch.no_grad()
    def sample_content(
        self,
        prompts: list[str] | None = None,
        labels: list[int] | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Step 1: content frames [B, *content_shape] for prompts (latent mode) or labels (pixel mode).

        generator: one for the batch's noise, or one per row (diffusion.initial_noise);
        prompt_tokens: the prompts' token features when the caller has encoded them already."""
        s = self.preset.sampling
        steps, cfg = steps or s.content_steps, s.cfg_content if cfg is None else cfg
        if self.preset.mode == "latent":
            if not prompts:
                raise ValueError("latent-mode presets generate from text: pass prompts")
            tokens = prompt_tokens if prompt_tokens is not None else self.sd.encode_prompts(list(prompts))[0]
            null_tokens, _ = self.sd.encode_prompts([""])
            denoise, scheduler, batch = (
                unet_denoiser(self.denoiser(self.sd.unet), tokens, null_tokens),
                self.sd.scheduler,
                len(prompts),
            )
        else:
            if labels is None:
                raise ValueError("pixel-mode presets generate from class labels: pass labels")
            y = torch.as_tensor(labels, dtype=torch.long, device=self.device)
            denoise, batch = dit_denoiser(self.denoiser(self.content_dit), labels=y), len(labels)
            scheduler = dit_scheduler(self.content_dit.config.prediction_type)
        with self.speed.autocast(self.device):
            return ddim_sample(
                denoise,
                (batch, *self.preset.content_shape),
                scheduler,
                steps,
                cfg,
                generator,
                self.device,
                clip_sample=self.preset.clip_content,
            )

    def to(self, device) -> "CMDGenerator":
        for module in (self.autoencoder, self.motion, self.content_dit):
            if module is not None:
                module.to(device)
        if self.sd is not None:
            self.sd.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.motion.parameters()).device

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str] | None = None,
        labels: list[int] | None = None,
        seed: int | list[int] = 0,
        content_steps: int | None = None,
        motion_steps: int | None = None,
        cfg_content: float | None = None,
        cfg_motion: float | None = None,
    ) -> np.ndarray:
        """Videos for `prompts` (latent mode) or `labels` (pixel mode).

        seed: one for the whole batch (its noise drawn by one generator), or one per row: row i then
        comes out as it would alone with seed[i], whichever rows share its batch (its content and
        motion noise drawn by its own generator, in the same order)."""
        s = self.preset.sampling
        content_steps, motion_steps = content_steps or s.content_steps, motion_steps or s.motion_steps
        cfg_content = s.cfg_content if cfg_content is None else cfg_content
        cfg_motion = s.cfg_motion if cfg_motion is None else cfg_motion
        for module in (self.autoencoder, self.motion, self.content_dit, self.sd and self.sd.unet):
            if module is not None:
                module.eval()
        if isinstance(seed, (list, tuple)):
            generator = [torch.Generator().manual_seed(int(one)) for one in seed]
        else:
            generator = torch.Generator().manual_seed(seed)
        if self.preset.mode == "latent":
            if not prompts:
                raise ValueError("latent-mode presets generate from text: pass prompts")
            tokens, pooled = self.sd.encode_prompts(list(prompts))  # once: tokens for the UNet, pooled for the DiT
            content = self.sample_content(prompts, None, content_steps, cfg_content, generator, prompt_tokens=tokens)
            motion_cond = dict(text=pooled)
        else:
            content = self.sample_content(None, labels, content_steps, cfg_content, generator)
            motion_cond = dict(labels=torch.as_tensor(labels, dtype=torch.long, device=self.device))
        batch, device = content.shape[0], self.device
        motion_fn = dit_denoiser(self.denoiser(self.motion), content=content, **motion_cond)
        scheduler = dit_scheduler(self.motion.config.prediction_type)
        with self.speed.autocast(device):
            motion = ddim_sample(
                motion_fn, (batch, *self.preset.motion_shape), scheduler, motion_steps, cfg_motion, generator, device
            )
        video = rearrange(self.autoencoder.decode(content, motion), "b c l h w -> b l c h w")
        if self.preset.mode == "latent":
            video = latents_to_video(self.sd.vae, video)
        if not torch.isfinite(video).all():  # uint8 would hide it: NaN becomes black frames
            raise ValueError(
                f"the sampled videos hold NaN or inf (denoisers in {self.speed.dtype(device)}): "
                "sample in float32 or bfloat16 (--precision)"
            )
        return unit_to_uint8(video)


def write_video(
    frames: np.ndarray, path: str | Path, fps: int = 8, crf: int | None = None, x264_preset: str | None = None
) -> Path:
    """uint8 [L, H, W, 3] -> an H.264 mp4 (libx264's default quality and speed unless `crf`, `x264_preset`),
    or an animated gif when the path ends in .gif."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    # yuv420p (what browsers and the MLflow UI play) needs even sizes: pad by one pixel if odd.
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {k: str(v) for k, v in (("crf", crf), ("preset", x264_preset)) if v is not None}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
