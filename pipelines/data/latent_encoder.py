"""The encode stage of precompute: uint8 clips -> content and motion latents (SD VAE + autoencoder).

Its own module so that the other stages' actors never import torch (about 1 GB and 5 s each), and
torch and the models are imported in the encoder actors only, not where the module is: the job's
driver hands the class to Ray Data and plans the job without them (5 s of imports less).
"""

from __future__ import annotations

import numpy as np

from cmd_model.presets import Preset
from pipelines.data import latent_shards as shards
from pipelines.data.shard_sink import to_sinks
from pipelines.data.video.schema import FRAMES
from pipelines.platform.model_store import fetch_model, node_copy


class EncodeLatents:
    """Clip rows with uint8 frames [N, L, H, W, 3] -> the same rows with float16 content and motion."""

    def __init__(self, preset: Preset, autoencoder: str, stable_diffusion: str | None = None, vae_batch: int = 64):
        import torch

        from cmd_model.autoencoder import VideoAutoencoder
        from cmd_model.content import load_vae

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.preset, self.vae_batch = preset, vae_batch
        self.autoencoder = VideoAutoencoder.from_pretrained(fetch_model(autoencoder)).to(self.device).eval()
        self.vae = load_vae(node_copy(stable_diffusion)).to(self.device).eval() if preset.mode == "latent" else None

    def encode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, L, H, W, 3] -> (content [N, C, h, w], motion [N, D, L, h'+w']) as float16."""
        import torch
        from einops import rearrange

        from cmd_model.content import uint8_to_unit, video_to_latents

        x = uint8_to_unit(frames, self.device)  # [N, L, 3, H, W] in [-1, 1], copied to the device as uint8
        # Mixed precision on CUDA only: CPU autocast to bf16 is slower than fp32 for these sizes.
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.vae is not None:
                x = video_to_latents(self.vae, x, chunk=self.vae_batch)
            content, motion = self.autoencoder.encode(rearrange(x, "n l c h w -> n c l h w").float())
        return content.half().cpu().numpy(), motion.half().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = batch.pop(FRAMES)
        batch[shards.CONTENT], batch[shards.MOTION] = self.encode(frames)
        return batch


class EncodeToSinks(EncodeLatents):
    """EncodeLatents that hands its rows to the job's ShardSinks and returns only their count.

    Encoded rows never sit in the object store between stages: a node lost after encoding and
    before writing would leave blocks only this actor could rebuild (ray#31794), and Ray Data
    stops it once encoding is done. A count is returned inline to its owner, so it is never lost.
    """

    def __init__(self, sinks: list, **kwargs):
        super().__init__(**kwargs)
        self.sinks = sinks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return to_sinks(super().__call__(batch), self.sinks)
