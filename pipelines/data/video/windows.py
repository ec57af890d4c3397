"""Step 2: which clip windows to cut from a video (pure: frame count, fps, cuts and ClipSpec in, frames out)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipelines.data.video.schema import ClipSpec, VideoError, make_video_id


def clip_stride(src_fps: float, spec: ClipSpec) -> int:
    """Source frames between a clip's frames: spec.frame_stride, or the one that gives spec.target_fps."""
    if spec.target_fps and src_fps > 0:
        return max(1, round(src_fps / spec.target_fps))
    return spec.frame_stride


def shots_of(num_frames_available: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """[(first, end)) frame ranges of the shots: a cut is the first frame of a new shot."""
    bounds = [0, *(c for c in cuts if 0 < c < num_frames_available), num_frames_available]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def plan_windows(
    num_frames_available: int, src_fps: float, spec: ClipSpec, source: str, cuts: Sequence[int] = ()
) -> tuple[int, list[int]]:
    """Choose clip windows: returns (stride, starts), sorted.

    Clip c covers frames starts[c] + stride * arange(spec.num_frames). Random sampling is seeded
    by (spec.seed, source), so a rerun picks the same windows for the same video.

    With `cuts` (shots.py: the first frame of each new shot) every window lies inside one shot;
    each shot is planned as the whole video is without cuts (all windows: back to back from the
    shot's first frame; N clips: spread over every start a window can have), so a video without
    cuts gets exactly the windows it got before cuts were detected.
    """
    stride = clip_stride(src_fps, spec)
    span = (spec.num_frames - 1) * stride + 1
    shots = shots_of(num_frames_available, cuts)
    longest = max((b - a for a, b in shots), default=0)
    if longest < span:
        if len(shots) > 1:
            raise VideoError(
                "too_short",
                f"{num_frames_available} frames in {len(shots)} shots, the longest {longest}; a clip needs {span}",
            )
        raise VideoError("too_short", f"{num_frames_available} frames, clip needs {span}")
    rng = np.random.default_rng([spec.seed, int(make_video_id(source), 16)])
    if spec.clips_per_video is None:
        starts = []
        for a, b in shots:
            slack = b - a - span  # how far right the shot's first window can move
            if slack < 0:
                continue
            count = slack // span + 1  # back-to-back windows
            # Random sampling shifts the shot's whole grid inside its leftover frames.
            offset = int(rng.integers(0, slack - (count - 1) * span + 1)) if spec.sampling == "random" else 0
            starts.extend(a + offset + i * span for i in range(count))
        return stride, starts
    # Every start a window can have, shot after shot: [0, slack] for a video without cuts.
    possible = np.concatenate([np.arange(a, b - span + 1) for a, b in shots if b - a >= span])
    if spec.sampling == "uniform":
        # Windows overlap when more are asked for than fit side by side.
        at = np.linspace(0, len(possible) - 1, spec.clips_per_video).round().astype(int)
        return stride, np.unique(possible[at]).tolist()
    count = min(spec.clips_per_video, len(possible))
    return stride, sorted(possible[rng.choice(len(possible), size=count, replace=False)].tolist())


def window(start: int, stride: int, num_frames: int) -> list[int]:
    """The source frames of the clip that starts at `start`: start + stride * arange(num_frames)."""
    return list(range(start, start + stride * num_frames, stride))
