"""Short captioned videos of moving shapes, for the demo, the learning benchmark and tests (no download).

Each video shows one coloured square moving in one direction over a plain light background, so the
caption ("a red square moving right") and the class label (colour x direction, 12 classes) say
what is in it. The square moves 2 pixels a frame along one lane, the frame's second 8-pixel row
(right, left) or column (down, up), and wraps around the frame edges (a torus): in 16 frames it
goes once round, so every 16-frame window shows the same motion and the whole lane.

By default every video of a class starts at the same place (`starts=1`), so a class is one
motion; `starts=4` starts each video at one of 4 places on its lane (the held-out videos of the
demo). Why (measured on 2 cores, see docs/how_the_demo_learns.md): these small models, trained for minutes, learn
a class's one content frame and one motion, but where a class had several, they drew the pieces
of several at once (content frames with the square's path in several places; motion whose
square jumps between them).
`pipelines.evaluation.shape_detector` reads colour and direction back from any decoded video.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cmd_model.generate import write_video
from pipelines.data.sources import write_manifest

BACKGROUND = (235, 235, 235)
COLOURS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255)}  # CSS4's (css4_rgb below)
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


# ---------------------------------------------------------------------------------------
# The demo's data: shapes anywhere, several shapes, textured noisy backgrounds, N classes
# ---------------------------------------------------------------------------------------

# Colour names are CSS4 names (matplotlib's table, the detector's too); classes take them in this
# order, each with the four directions: 16 classes = red, green, blue, yellow x right, left, down, up.
PALETTE = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple", "white", "black")
SHAPES = ("square", "circle", "triangle")
SHAPE_SIZE = 7  # pixels: under half of a 16-frame clip's travel, so a pixel is shape in < half the frames
SHAPE_SPEED = 1  # pixels per frame, no wrap-around: 15 pixels over a 16-frame clip


def css4_rgb(name: str) -> tuple[int, int, int]:
    """A CSS4 colour name -> its RGB (0-255), from matplotlib's table."""
    from matplotlib.colors import CSS4_COLORS, to_rgb

    return tuple(round(255 * v) for v in to_rgb(CSS4_COLORS[name]))


def shape_classes(num_classes: int = 16) -> list[tuple[str, str]]:
    """(colour, direction) of each class, label = index: every palette colour with the four directions in turn."""
    most = len(PALETTE) * len(DIRECTIONS)
    if not 1 <= num_classes <= most:
        raise ValueError(f"the built-in videos have 1 to {most} classes, not {num_classes}")
    return [(c, d) for c in PALETTE for d in DIRECTIONS][:num_classes]


def shape_caption(colour: str, direction: str) -> str:
    """The caption (and, with '_', the class folder) of a class: the shape itself is not named, it varies."""
    return f"a {colour} shape moving {direction}"


def shape_mask(shape: str, size: int) -> np.ndarray:
    """bool [size, size]: the shape's pixels in its box."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":  # apex up, base at the bottom
        return np.abs(xx - size / 2) <= yy / 2
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float [H, W, 3]: a muted two-colour gradient at a random angle plus two random gratings.

    Muted (a grey 110-170 tinted by at most 30 a channel) so every palette colour stands out.
    """
    grey = rng.uniform(110, 170)
    a, b = grey + rng.uniform(-30, 30, 3), grey + rng.uniform(-30, 30, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
    image = a + (b - a) * np.clip(ramp, 0, 1)[..., None]
    for _ in range(2):
        freq, phase, theta = rng.uniform(0.15, 0.6), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        image += rng.uniform(6, 14) * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)[..., None]
    return image


def shape_path(
    rng: np.random.Generator, direction: str, height: int, width: int, frames: int, size: int, speed: int
) -> tuple[int, int]:
    """A random top-left corner at frame 0 such that the whole path stays inside the frame."""
    dx, dy = DIRECTIONS[direction]
    travel = speed * (frames - 1)
    along, across = (width, height) if dy == 0 else (height, width)
    if along - size - travel < 1 or across - size < 2:
        raise ValueError(f"a {size}-pixel shape moving {travel} pixels does not fit a {width}x{height} frame")
    first = int(rng.integers(1, along - size - travel))  # where the path begins, seen from its start side
    start_along = first if (dx + dy) > 0 else along - size - first
    start_across = int(rng.integers(1, across - size))
    return (start_along, start_across) if dy == 0 else (start_across, start_along)


def draw_shape_video(
    rng: np.random.Generator,
    colour: str,
    direction: str,
    shape: str,
    height: int = 32,
    width: int = 32,
    frames: int = 16,
    size: int = SHAPE_SIZE,
    speed: int = SHAPE_SPEED,
    noise: float = 3.0,
) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [frames, H, W, 3] of one shape moving on a textured background with per-frame noise,
    and the shape's top-left corner at frame 0."""
    background = textured_background(rng, height, width)
    x0, y0 = shape_path(rng, direction, height, width, frames, size, speed)
    dx, dy = DIRECTIONS[direction]
    mask, rgb = shape_mask(shape, size), np.array(css4_rgb(colour), np.float32)
    video = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        image = background.copy()
        x, y = x0 + dx * speed * i, y0 + dy * speed * i
        image[y : y + size, x : x + size][mask] = rgb
        image += rng.normal(0, noise, image.shape)
        video[i] = np.clip(image, 0, 255).round()
    return video, (x0, y0)


def make_shapes_dataset(
    directory: str | Path,
    per_class: int,
    num_classes: int = 16,
    seed: int = 0,
    size: tuple[int, int] = (32, 32),
    frames: int = 16,
) -> Path:
    """`per_class` videos of each class into DIRECTORY/<colour>_<direction>/ and a manifest.csv.

    Every video draws its own shape (square, circle or triangle), its own place (any row or
    column, any start that keeps the path inside the frame) and its own background. Returns the
    manifest's path (path, caption, label, shape, x0, y0: the start, for judges of position).
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    jobs = []
    for label, (colour, direction) in enumerate(shape_classes(num_classes)):
        folder = directory / f"{colour}_{direction}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            video, start = draw_shape_video(rng, colour, direction, shape, *size, frames=frames)
            jobs.append((folder / f"video_{seed:02d}_{i:04d}.mp4", video, colour, direction, label, shape, start))
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda job: write_video(job[1], job[0], 24, crf=10), jobs))
    rows = [
        {
            "path": str(path.relative_to(directory)),
            "caption": shape_caption(colour, direction),
            "label": label,
            "shape": shape,
            "x0": start[0],
            "y0": start[1],
        }
        for path, _, colour, direction, label, shape, start in jobs
    ]
    return Path(write_manifest(rows, str(directory / "manifest.csv")))
