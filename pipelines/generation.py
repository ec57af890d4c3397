"""Generate videos with trained CMD models: a few locally, or many as a Ray Data job.

Model locations are save_pretrained folders, s3:// prefixes or MLflow `runs:/` / `models:/`
URIs (pipelines.model_store). Output: one mp4 per video plus a gif contact sheet.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmd_model.generate import CMDGenerator, write_video
from cmd_model.presets import Preset
from pipelines import storage
from pipelines.model_store import localize

PROMPT, LABEL, SEED, NAME = "prompt", "label", "seed", "name"


@dataclass(frozen=True)
class GeneratorSpec:
    preset: Preset
    autoencoder: str
    content: str
    motion: str
    stable_diffusion: str | None = None
    content_steps: int | None = None
    motion_steps: int | None = None
    cfg_content: float | None = None
    cfg_motion: float | None = None

    def load(self) -> CMDGenerator:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        sd = self.stable_diffusion or self.preset.stable_diffusion
        return CMDGenerator.from_pretrained(
            self.preset, str(localize(self.autoencoder)), str(localize(self.motion)), str(localize(self.content)), sd
        ).to(device)

    def sampling_kwargs(self) -> dict:
        return dict(content_steps=self.content_steps, motion_steps=self.motion_steps, cfg_content=self.cfg_content, cfg_motion=self.cfg_motion)


def contact_sheet(videos: np.ndarray, columns: int = 4) -> np.ndarray:
    """uint8 [N, L, H, W, 3] -> one video [L, rows*H, columns*W, 3] with the videos tiled."""
    n, frames, h, w, c = videos.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    sheet = np.zeros((frames, rows * h, columns * w, c), np.uint8)
    for i, video in enumerate(videos):
        r, col = divmod(i, columns)
        sheet[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = video
    return sheet


def write_outputs(videos: np.ndarray, names: list[str], out: str, fps: int) -> list[str]:
    """mp4 per video (+ the sheet as gif) under OUT (local or s3://); returns the mp4 URIs."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = [write_video(v, Path(tmp) / f"{name}.mp4", fps) for v, name in zip(videos, names)]
        if len(videos) > 1:
            write_video(contact_sheet(videos), Path(tmp) / "contact_sheet.gif", fps)
        storage.upload_dir(tmp, out)
    return [storage.join(out, p.name) for p in local]


def generate(spec: GeneratorSpec, out: str, prompts: list[str] | None = None, labels: list[int] | None = None, seed: int = 0) -> list[str]:
    """A few videos in this process; returns the mp4 URIs."""
    generator = spec.load()
    videos = generator(prompts=prompts, labels=labels, seed=seed, **spec.sampling_kwargs())
    names = [f"video_{i:03d}" for i in range(len(videos))]
    return write_outputs(videos, names, out, spec.preset.sampling.fps)


class GenerateVideos:
    """Ray Data stage: rows {name, prompt | label, seed} -> rows {name, path}; the model loads once per actor."""

    def __init__(self, spec: GeneratorSpec, out: str):
        self.spec, self.out = spec, out
        self.generator = spec.load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = []
        for i, name in enumerate(batch[NAME]):
            kw = {"prompts": [str(batch[PROMPT][i])]} if self.spec.preset.mode == "latent" else {"labels": [int(batch[LABEL][i])]}
            video = self.generator(seed=int(batch[SEED][i]), **kw, **self.spec.sampling_kwargs())
            paths += write_outputs(video, [str(name)], self.out, self.spec.preset.sampling.fps)
        return {NAME: batch[NAME], "path": np.array(paths, dtype=object)}


def generate_many(spec: GeneratorSpec, out: str, rows: list[dict], gpus: int) -> list[str]:
    """One Ray Data job over many prompts/labels: a generator actor per GPU (one on a CPU cluster)."""
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(rows).map_batches(
        GenerateVideos,
        fn_constructor_kwargs=dict(spec=spec, out=out),
        batch_size=4,  # explicit int (required with num_gpus); videos are written as each batch ends
        compute=ActorPoolStrategy(size=max(1, gpus)),  # the models load once per actor
        num_gpus=1 if gpus else 0,
        num_cpus=1,
    )
    paths = [row["path"] for row in ds.iter_rows()]
    storage.write_text(storage.join(out, "videos.json"), json.dumps(sorted(paths), indent=1))
    return paths
