"""Short captioned videos of moving shapes, for the demo and benchmarks (no download needed).

Each video shows one coloured square moving in one direction over a plain background, so the
caption ("a red square moving right") and the class label (colour x direction) say what is in it.
"""
from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220)}
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def draw(colour, direction, frame: int, width: int, height: int, speed: int = 3) -> np.ndarray:
    """uint8 [height, width, 3] of frame `frame`."""
    image = np.full((height, width, 3), 235, np.uint8)
    size = max(4, min(width, height) // 4)
    dx, dy = DIRECTIONS[direction]
    x = (width // 2 - size // 2 + dx * speed * frame) % (width - size)
    y = (height // 2 - size // 2 + dy * speed * frame) % (height - size)
    image[y:y + size, x:x + size] = COLOURS[colour]
    return image


def write_clip_video(path: Path, colour: str, direction: str, num_frames: int, width: int, height: int, fps: int = 24) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(draw(colour, direction, i, width, height), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_dataset(directory: str | Path, count: int, num_frames: int = 48, width: int = 128, height: int = 96, seed: int = 0) -> Path:
    """Write `count` videos into DIRECTORY/<class>/ and a manifest.csv (path, caption, label); return the manifest."""
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    classes = [(c, d) for c in COLOURS for d in DIRECTIONS]
    rows = []
    for i in range(count):
        label = int(rng.integers(len(classes)))
        colour, direction = classes[label]
        folder = directory / f"{colour}_{direction}"
        folder.mkdir(parents=True, exist_ok=True)
        path = write_clip_video(folder / f"video_{i:04d}.mp4", colour, direction, num_frames, width, height)
        rows.append({"path": str(path.relative_to(directory)), "caption": f"a {colour} square moving {direction}", "label": label})
    manifest = directory / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
