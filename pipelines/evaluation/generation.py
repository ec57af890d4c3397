"""Generate videos with trained CMD models: a few locally, or many as a Ray Data job.

Model locations are save_pretrained folders, s3:// prefixes or MLflow `runs:/` / `models:/`
URIs (pipelines.platform.model_store). Output: one mp4 per video (to watch), the same frames losslessly as
<name>.npz (uint8 `frames` [L, H, W, 3], what `jobs/evaluate.py` measures), and a gif contact sheet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cmd_model.generate import CMDGenerator, write_video
from cmd_model.presets import Preset
from cmd_model.speed import SamplingSpeed
from pipelines.platform import storage
from pipelines.platform.model_store import fetch_model, node_copy

PROMPT, LABEL, SEED, NAME = "prompt", "label", "seed", "name"
INDEX = "index.csv"


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
    speed: SamplingSpeed = field(default_factory=SamplingSpeed)  # --compile, --precision

    def load(self) -> CMDGenerator:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        sd = node_copy(self.stable_diffusion or self.preset.stable_diffusion)
        return CMDGenerator.from_pretrained(
            self.preset,
            str(fetch_model(self.autoencoder)),
            str(fetch_model(self.motion)),
            str(fetch_model(self.content)),
            sd,
            speed=self.speed,
        ).to(device)

    def sampling_kwargs(self) -> dict:
        return dict(
            content_steps=self.content_steps,
            motion_steps=self.motion_steps,
            cfg_content=self.cfg_content,
            cfg_motion=self.cfg_motion,
        )


def contact_sheet(
    videos: np.ndarray, columns: int = 4, captions: list[str] | None = None, scale: int = 1
) -> np.ndarray:
    """uint8 [N, L, H, W, 3] -> one video [L, rows*H', columns*W', 3] with the videos tiled.

    `scale` enlarges each video (nearest neighbour: small videos stay crisp); `captions` writes
    each video's prompt or class in a band above it.
    """
    videos = videos.repeat(scale, axis=2).repeat(scale, axis=3) if scale > 1 else videos
    n, frames, h, w, c = videos.shape
    band = 24 if captions else 0
    columns = min(columns, n)
    rows = -(-n // columns)
    sheet = np.full((frames, rows * (h + band), columns * w, c), 255, np.uint8)
    for i, video in enumerate(videos):
        r, col = divmod(i, columns)
        top = r * (h + band) + band
        sheet[:, top : top + h, col * w : (col + 1) * w] = video
    if captions:
        from PIL import Image, ImageDraw

        labels = Image.new("RGB", (sheet.shape[2], sheet.shape[1]), "white")
        draw = ImageDraw.Draw(labels)
        for i, text in enumerate(captions):
            r, col = divmod(i, columns)
            draw.multiline_text((col * w + 2, r * (h + band) + 1), _wrap(text, max(8, w // 6)), fill="black", spacing=1)
        bands = np.asarray(labels)
        for r in range(rows):
            sheet[:, r * (h + band) : r * (h + band) + band] = bands[r * (h + band) : r * (h + band) + band]
    return sheet


def _wrap(text: str, width: int) -> str:
    """Two lines at most, broken at spaces (PIL's default font is ~6 px per character)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:2])


def write_outputs(
    videos: np.ndarray,
    names: list[str],
    out: str,
    fps: int,
    captions: list[str] | None = None,
    index: list[dict] | None = None,
    sheet: bool = True,
) -> list[str]:
    """mp4 and lossless npz per video (+ the sheet as gif with `sheet`, labelled with `captions`;
    + `index` rows as index.csv) under OUT (local or s3://); returns the mp4 URIs."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = [write_video(v, Path(tmp) / f"{name}.mp4", fps) for v, name in zip(videos, names)]
        for video, name in zip(videos, names):  # no pickle: np.load(allow_pickle=False) reads it
            np.savez_compressed(Path(tmp) / f"{name}.npz", frames=np.ascontiguousarray(video, dtype=np.uint8))
        if sheet and len(videos) > 1:
            scale = max(1, 96 // videos.shape[3]) if captions else 1  # room for the caption above each video
            write_video(
                contact_sheet(videos, columns=6 if captions else 4, captions=captions, scale=scale),
                Path(tmp) / "contact_sheet.gif",
                fps,
            )
        if index:
            (Path(tmp) / INDEX).write_text(index_csv(index))
        storage.upload_dir(tmp, out)
    return [storage.join(out, p.name) for p in local]


def index_csv(rows: list[dict]) -> str:
    """index.csv (file, prompt, label, seed): what each video was asked for; evaluate reads its prompts."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["file", PROMPT, LABEL, SEED], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def slug(text: str) -> str:
    """A file-name-safe form of a prompt or class name."""
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")[:60] or "video"


def generate_per_class(spec: GeneratorSpec, out: str, asked: list[tuple[str, int | None]], seeds: list[int]):
    """Every prompt (latent mode) or class (pixel mode) once per seed, in this process.

    asked: (prompt or class name, label) pairs. Writes <slug>_seed<N>.mp4 per video, index.csv
    (file, prompt, label, seed) and a contact sheet labelled with the prompts; returns
    (videos uint8 [N, L, H, W, 3], index rows) in the same order.
    """
    generator = spec.load()
    videos, rows = [], []
    for seed in seeds:
        if spec.preset.mode == "latent":
            batch = generator(prompts=[text for text, _ in asked], seed=seed, **spec.sampling_kwargs())
        else:
            batch = generator(labels=[int(label) for _, label in asked], seed=seed, **spec.sampling_kwargs())
        for (text, label), video in zip(asked, batch):
            rows.append(
                {
                    "file": f"{slug(text)}_seed{seed}.mp4",
                    PROMPT: text,
                    LABEL: "" if label is None else int(label),
                    SEED: seed,
                }
            )
            videos.append(video)
    videos = np.stack(videos)
    write_outputs(
        videos,
        [r["file"][:-4] for r in rows],
        out,
        spec.preset.sampling.fps,
        captions=[f"{r[PROMPT]} #{r[SEED]}" for r in rows],
        index=rows,
    )
    return videos, rows


def generate(
    spec: GeneratorSpec, out: str, prompts: list[str] | None = None, labels: list[int] | None = None, seed: int = 0
) -> list[str]:
    """A few videos in this process; returns the mp4 URIs."""
    generator = spec.load()
    videos = generator(prompts=prompts, labels=labels, seed=seed, **spec.sampling_kwargs())
    names = [f"video_{i:03d}" for i in range(len(videos))]
    index = [
        {"file": f"{name}.mp4", PROMPT: prompts[i] if prompts else "", LABEL: labels[i] if labels else "", SEED: seed}
        for i, name in enumerate(names)
    ]
    return write_outputs(videos, names, out, spec.preset.sampling.fps, index=index)


class GenerateVideos:
    """Ray Data stage: rows {name, prompt | label, seed} -> rows {name, path}; the model loads once per actor."""

    def __init__(self, spec: GeneratorSpec, out: str):
        self.spec, self.out = spec, out
        self.generator = spec.load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kw = (
            {"prompts": [str(prompt) for prompt in batch[PROMPT]]}
            if self.spec.preset.mode == "latent"
            else {"labels": [int(label) for label in batch[LABEL]]}
        )
        # The whole batch in one call; each row's noise from its own seed, so a video is the same
        # whichever rows share its batch.
        videos = self.generator(seed=[int(seed) for seed in batch[SEED]], **kw, **self.spec.sampling_kwargs())
        # No contact sheet: the job's batches would overwrite each other's.
        names = [str(name) for name in batch[NAME]]
        paths = write_outputs(videos, names, self.out, self.spec.preset.sampling.fps, sheet=False)
        return {NAME: batch[NAME], "path": np.array(paths, dtype=object)}


def generate_many(spec: GeneratorSpec, out: str, rows: list[dict], generators: int, use_gpu: bool) -> list[str]:
    """One Ray Data job over many prompts/labels: `generators` actors, each on a GPU with use_gpu."""
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(rows).map_batches(
        GenerateVideos,
        fn_constructor_kwargs=dict(spec=spec, out=out),
        batch_size=4,  # explicit int (required with num_gpus); videos are written as each batch ends
        compute=ActorPoolStrategy(size=generators),  # the models load once per actor
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    paths = [row["path"] for row in ds.iter_rows()]
    storage.write_text(storage.join(out, "videos.json"), json.dumps(sorted(paths), indent=1))
    index = [
        {
            "file": f"{row[NAME]}.mp4",
            PROMPT: row[PROMPT] if spec.preset.mode == "latent" else "",
            LABEL: row[LABEL] if spec.preset.mode == "pixel" else "",
            SEED: row[SEED],
        }
        for row in rows
    ]
    storage.write_text(storage.join(out, INDEX), index_csv(index))
    return paths
