"""Short captioned videos of moving shapes, for the demo, the learning benchmark and tests (no download).

Each video shows one coloured square moving in one direction over a plain light background, so the
caption ("a red square moving right") and the class label (colour x direction, 12 classes) say
what is in it. The square moves 2 pixels a frame along one lane, the frame's second 8-pixel row
(right, left) or column (down, up), and wraps around the frame edges (a torus): in 16 frames it
goes once round, so every 16-frame window shows the same motion and the whole lane.

By default every video of a class starts at the same place (`starts=1`), so a class is one
motion; `starts=4` starts each video at one of 4 places on its lane (the held-out videos of the
demo). Why (measured on 2 cores, see the README): these small models, trained for minutes, learn
a class's one content frame and one motion, but where a class had several, they drew the pieces
of several at once (content frames with the square's path in several places; motion whose
square jumps between them).
`pipelines.shape_detector` reads colour and direction back from any decoded video.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cmd_model.generate import write_video
from pipelines.sources import write_manifest

BACKGROUND = (235, 235, 235)
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220)}
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
CLASSES = [(c, d) for c in COLOURS for d in DIRECTIONS]  # label = index here
SPEED = 2  # pixels per frame: once round a 32-pixel frame in 16 frames
LANE = 8  # the row (right, left) or column (down, up) the square travels on


def caption(colour: str, direction: str) -> str:
    return f"a {colour} square moving {direction}"


def class_name(label: int) -> str:
    """The class folder name of a label: red_right, ..."""
    return "_".join(CLASSES[label])


def horizontal(direction: str) -> bool:
    """Right and left travel along a row; down and up along a column."""
    return DIRECTIONS[direction][1] == 0


def lane_start(direction: str, along: int, lane: int = LANE) -> tuple[int, int]:
    """The square's top-left corner at frame 0: `along` pixels along its lane."""
    return (along, lane) if horizontal(direction) else (lane, along)


def draw(
    colour, direction, frame: int, width: int, height: int, start=(0, 0), speed: int = SPEED, size: int | None = None
) -> np.ndarray:
    """uint8 [height, width, 3] of frame `frame`: the square's top-left corner at start + frame * speed * direction."""
    size = size or max(4, min(width, height) // 4)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND
    dx, dy = DIRECTIONS[direction]
    x = (start[0] + dx * speed * frame) % width
    y = (start[1] + dy * speed * frame) % height
    rows = np.arange(y, y + size) % height
    cols = np.arange(x, x + size) % width
    image[np.ix_(rows, cols)] = COLOURS[colour]
    return image


def write_clip_video(
    path: Path,
    colour: str,
    direction: str,
    num_frames: int,
    width: int,
    height: int,
    fps: int = 24,
    start=(0, 0),
    speed: int = SPEED,
) -> Path:
    frames = np.stack([draw(colour, direction, i, width, height, start, speed) for i in range(num_frames)])
    return write_video(frames, path, fps, crf=10)  # near-lossless: the square's edges survive for the PSNR targets


def make_dataset(
    directory: str | Path,
    count: int,
    num_frames: int = 48,
    width: int = 32,
    height: int = 32,
    seed: int = 0,
    speed: int = SPEED,
    starts: int = 1,
    lane: int | None = LANE,
) -> Path:
    """Write `count` videos into DIRECTORY/<colour>_<direction>/ and a manifest.csv (path, caption, label).

    Classes go round-robin (every class appears once per 12 videos). The square travels along row
    (or column) `lane`, from one of `starts` evenly spaced places on it, drawn at random;
    lane=None: from a random cell of a grid of `starts` x `starts` anywhere (starts=1: the top-left
    corner). Returns the manifest's path.
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        label = i % len(CLASSES)
        colour, direction = CLASSES[label]
        folder = directory / class_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        cell = (int(rng.integers(starts)) * (width // starts), int(rng.integers(starts)) * (height // starts))
        start = cell if lane is None else lane_start(direction, cell[0] if horizontal(direction) else cell[1], lane)
        jobs.append((folder / f"video_{seed:02d}_{i:04d}.mp4", colour, direction, start, label))
    # Encoders in threads (PyAV releases the GIL while encoding): a file costs ~0.2 s, mostly setup.
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(
            pool.map(
                lambda job: write_clip_video(
                    job[0], job[1], job[2], num_frames, width, height, start=job[3], speed=speed
                ),
                jobs,
            )
        )
    rows = [
        {"path": str(path.relative_to(directory)), "caption": caption(colour, direction), "label": label}
        for path, (_, colour, direction, _, label) in zip(paths, jobs)
    ]
    return Path(write_manifest(rows, str(directory / "manifest.csv")))
