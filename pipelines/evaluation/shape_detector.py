"""Read colour, direction and place back from a video of one moving shape, without any model.

The judge of the learning demo and benchmark: it sees only decoded uint8 frames. Steps:
1. background  the per-pixel median over time (a shape covers any pixel in under half the frames),
               so gradients, textures and noise of a still background are not foreground, or
               the median colour of the whole video (a plain background), whichever finds less
2. foreground  pixels far from the background (Euclidean RGB distance > FOREGROUND_DISTANCE)
3. colour      the mean foreground colour, named by the nearest of the candidate colours: the CSS4
               colours (matplotlib's table) that the prompts of the judged set name
4. direction   the foreground centroid per frame as a circular mean (the built-in squares wrap
               around the edges, so a plain mean would jump), frame-to-frame steps wrapped into
               [-W/2, W/2), summed over the clip; the larger axis and its sign name the direction
5. place       the mean centroid (x, y): its coordinate across the direction of motion is what
               the demo's diversity figure spreads over seeds

A video it cannot judge (no foreground, or no net motion) gets None for that attribute, which
counts as wrong: noise, blank or frozen videos never score by luck of a default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipelines.data.synthetic_videos import DIRECTIONS, PALETTE

FOREGROUND_DISTANCE = 60.0  # RGB units: the palette is >= 140 from the built-in backgrounds
MIN_FOREGROUND = 0.01  # fraction of a frame: less than this is no shape
MAX_FOREGROUND = 0.5  # more than half the frame differing from the "background" is not one shape
MIN_TRAVEL = 0.15  # of the frame size over the clip: below this nothing moves
MAX_COLOUR_DISTANCE = 90.0  # a mean foreground colour this far from every candidate colour has no name


@functools.cache
def css4_colours() -> dict[str, np.ndarray]:
    """Every CSS4 colour name -> RGB 0-255 (matplotlib's table)."""
    from matplotlib.colors import CSS4_COLORS, to_rgb

    return {name: np.array(to_rgb(value)) * 255 for name, value in CSS4_COLORS.items()}


@dataclass(frozen=True)
class Detection:
    colour: str | None
    direction: str | None
    travel: tuple[float, float]  # net (dx, dy) of the centroid over the clip, in pixels
    centre: tuple[float, float] | None = None  # mean centroid (x, y) over the frames with a shape


def _circular_mean(weights: np.ndarray, axis_len: int) -> float | None:
    """Weighted circular mean position (0..axis_len) of a 1-D weight profile."""
    total = weights.sum()
    if total <= 0:
        return None
    angles = 2 * np.pi * np.arange(axis_len) / axis_len
    z = (weights * np.exp(1j * angles)).sum() / total
    if abs(z) < 1e-6:
        return None
    return float(np.angle(z) % (2 * np.pi) * axis_len / (2 * np.pi))


def _wrap(step: float, period: int) -> float:
    return (step + period / 2) % period - period / 2


def _name_colour(mean_colour: np.ndarray, candidates) -> str | None:
    table = css4_colours()
    names = list(candidates)
    distances = [np.linalg.norm(mean_colour - table[n]) for n in names]
    return names[int(np.argmin(distances))] if min(distances) <= MAX_COLOUR_DISTANCE else None


def detect(video: np.ndarray, colours=PALETTE) -> Detection:
    """video uint8 [L, H, W, 3] -> the colour (one of `colours`, CSS4 names), direction and place of its shape."""
    frames = video.astype(np.float32)
    length, height, width, _ = frames.shape
    # Two background models; the one whose foreground is smaller (in frames where it is one shape)
    # wins: the per-pixel median over time (textured backgrounds), and one colour for the whole
    # video (a plain background under a shape that covers some pixels in half the frames or more,
    # where the per-pixel median is half shape and shows a ghost beside the shape).
    best = None
    for background in (np.median(frames, axis=0), np.median(frames.reshape(-1, 3), axis=0)):
        distance = np.linalg.norm(frames - background, axis=-1)  # [L, H, W]
        mask = distance > FOREGROUND_DISTANCE
        coverage = mask.mean(axis=(1, 2))
        good = (coverage >= MIN_FOREGROUND) & (coverage <= MAX_FOREGROUND)
        if good.sum() >= max(2, length // 2) and (best is None or coverage[good].mean() < best[0]):
            best = (coverage[good].mean(), distance, mask, good)
    if best is None:
        return Detection(None, None, (0.0, 0.0))
    _, distance, mask, good = best
    # The colour of the shape's core: the half of its pixels farthest from the background (H.264
    # stores colour at half resolution, so a small shape's edge pixels carry the background's tint).
    judged = mask & good[:, None, None]
    core = judged & (distance >= np.median(distance[judged]))
    colour = _name_colour(frames[core].mean(axis=0), colours)

    centroids = []  # (x, y) per judged frame, None where a frame has no shape
    for i in range(length):
        if not good[i]:
            centroids.append(None)
            continue
        x = _circular_mean(mask[i].sum(axis=0).astype(np.float64), width)
        y = _circular_mean(mask[i].sum(axis=1).astype(np.float64), height)
        centroids.append(None if x is None or y is None else (x, y))
    dx = dy = 0.0
    previous = None
    for c in centroids:
        if c is None:
            continue
        if previous is not None:
            dx += _wrap(c[0] - previous[0], width)
            dy += _wrap(c[1] - previous[1], height)
        previous = c
    direction = None
    if max(abs(dx) / width, abs(dy) / height) >= MIN_TRAVEL:
        step = (int(np.sign(dx)), 0) if abs(dx) / width >= abs(dy) / height else (0, int(np.sign(dy)))
        direction = next(name for name, d in DIRECTIONS.items() if d == step)
    seen = [c for c in centroids if c is not None]
    centre = tuple(float(v) for v in np.mean(seen, axis=0)) if seen else None
    return Detection(colour, direction, (dx, dy), centre)


def parse_class(text: str) -> tuple[str | None, str | None]:
    """The CSS4 colour and the direction a prompt or class folder name asks for ("a red shape moving up",
    "dark_green_up" -> darkgreen)."""
    words = text.lower().replace("_", " ").replace("-", " ").split()
    names = css4_colours()
    colour = None
    for n in (3, 2, 1):  # "light sea green" before "sea green" before "green"
        colour = next(
            ("".join(words[i : i + n]) for i in range(len(words)) if "".join(words[i : i + n]) in names), None
        )
        if colour:
            break
    direction = next((w for w in words if w in DIRECTIONS), None)
    return colour, direction


def across(direction: str | None, centre: tuple[float, float] | None) -> float | None:
    """The shape's place across its direction of motion: y for right/left, x for down/up."""
    if direction is None or centre is None:
        return None
    return centre[1] if DIRECTIONS[direction][1] == 0 else centre[0]


def judge(videos: list[np.ndarray], asked: list[str]) -> dict:
    """Score videos against what each was asked for; rows for the demo's table plus the accuracies.

    Colours are named among those the prompts ask for (any CSS4 names), so a set asking for
    yellow and orange tells them apart, and one asking for red alone still calls orange red.
    """
    wanted = [parse_class(text) for text in asked]
    colours = sorted({c for c, _ in wanted if c}) or list(PALETTE)
    rows = []
    for video, text, (want_colour, want_direction) in zip(videos, asked, wanted):
        found = detect(video, colours)
        rows.append(
            dict(
                asked=text,
                colour=found.colour,
                direction=found.direction,
                colour_ok=found.colour == want_colour,
                direction_ok=found.direction == want_direction,
                across=across(want_direction, found.centre),
            )
        )
    n = max(1, len(rows))
    return dict(
        rows=rows,
        samples=len(rows),
        colour_accuracy=sum(r["colour_ok"] for r in rows) / n,
        direction_accuracy=sum(r["direction_ok"] for r in rows) / n,
        both_accuracy=sum(r["colour_ok"] and r["direction_ok"] for r in rows) / n,
    )


def spread(rows: list[dict]) -> float | None:
    """Mean over the asked classes of the std (pixels) of the shape's place across its direction of motion."""
    by_class: dict[str, list[float]] = {}
    for r in rows:
        if r.get("across") is not None:
            by_class.setdefault(r["asked"], []).append(r["across"])
    stds = [float(np.std(v)) for v in by_class.values() if len(v) >= 2]
    return round(float(np.mean(stds)), 2) if stds else None
