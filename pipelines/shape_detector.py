"""Read colour and direction back from a video of one moving square, without any model.

The judge of the learning demo and benchmark: it sees only decoded uint8 frames. Steps:
1. background  the per-channel median of the whole video (the square covers a small part of it)
2. foreground  pixels far from the background (Euclidean RGB distance > FOREGROUND_DISTANCE)
3. colour      the mean foreground colour, named by the nearest of the dataset's colours
4. direction   the foreground centroid per frame as a circular mean (the square wraps around the
               edges, so a plain mean would jump), frame-to-frame steps wrapped into [-W/2, W/2),
               summed over the clip; the larger axis and its sign name the direction

A video it cannot judge (no foreground, or no net motion) gets None for that attribute, which
counts as wrong: noise, blank or frozen videos never score by luck of a default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.synthetic_videos import COLOURS, DIRECTIONS

FOREGROUND_DISTANCE = 60.0  # RGB units: the dataset's colours are >= 150 from the grey background
MIN_FOREGROUND = 0.01  # fraction of a frame: less than this is no square
MAX_FOREGROUND = 0.5  # more than half the frame differing from the "background" is not one square
MIN_TRAVEL = 0.15  # of the frame size over the clip: below this nothing moves
MAX_COLOUR_DISTANCE = 90.0  # a mean foreground colour this far from every dataset colour has no name


@dataclass(frozen=True)
class Detection:
    colour: str | None
    direction: str | None
    travel: tuple[float, float]  # net (dx, dy) of the centroid over the clip, in pixels


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


def detect(video: np.ndarray) -> Detection:
    """video uint8 [L, H, W, 3] -> the colour and direction of its moving square."""
    frames = video.astype(np.float32)
    length, height, width, _ = frames.shape
    background = np.median(frames.reshape(-1, 3), axis=0)
    mask = np.linalg.norm(frames - background, axis=-1) > FOREGROUND_DISTANCE  # [L, H, W]
    coverage = mask.mean(axis=(1, 2))
    good = (coverage >= MIN_FOREGROUND) & (coverage <= MAX_FOREGROUND)
    if good.sum() < max(2, length // 2):
        return Detection(None, None, (0.0, 0.0))

    mean_colour = frames[mask & good[:, None, None]].mean(axis=0)
    names = list(COLOURS)
    distances = [np.linalg.norm(mean_colour - np.array(COLOURS[n])) for n in names]
    colour = names[int(np.argmin(distances))] if min(distances) <= MAX_COLOUR_DISTANCE else None

    centroids = []  # (x, y) per judged frame, None where a frame has no square
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
    return Detection(colour, direction, (dx, dy))


def parse_class(text: str) -> tuple[str | None, str | None]:
    """The colour and direction a prompt or class folder name asks for ("a red square moving up", "red_up")."""
    words = text.lower().replace("_", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    direction = next((w for w in words if w in DIRECTIONS), None)
    return colour, direction


def judge(videos: list[np.ndarray], asked: list[str]) -> dict:
    """Score videos against what each was asked for; rows for the demo's table plus the accuracies."""
    rows = []
    for video, text in zip(videos, asked):
        want_colour, want_direction = parse_class(text)
        found = detect(video)
        rows.append(
            dict(
                asked=text,
                colour=found.colour,
                direction=found.direction,
                colour_ok=found.colour == want_colour,
                direction_ok=found.direction == want_direction,
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
