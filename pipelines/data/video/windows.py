"""Step 2: which clip windows to cut from a video (pure: frame count, fps and ClipSpec in, frames out)."""

from __future__ import annotations

import numpy as np

from pipelines.data.video.schema import ClipSpec, VideoError, make_video_id


def plan_windows(num_frames_available: int, src_fps: float, spec: ClipSpec, source: str) -> tuple[int, list[int]]:
    """Choose clip windows: returns (stride, starts), sorted.

    Clip c covers frames starts[c] + stride * arange(spec.num_frames). Random sampling is seeded
    by (spec.seed, source), so a rerun picks the same windows for the same video.
    """
    stride = spec.frame_stride
    if spec.target_fps and src_fps > 0:
        stride = max(1, round(src_fps / spec.target_fps))
    span = (spec.num_frames - 1) * stride + 1
    slack = num_frames_available - span  # how far right the first window can move
    if slack < 0:
        raise VideoError("too_short", f"{num_frames_available} frames, clip needs {span}")
    rng = np.random.default_rng([spec.seed, int(make_video_id(source), 16)])
    if spec.clips_per_video is None:
        count = slack // span + 1  # back-to-back windows
        # Random sampling shifts the whole grid inside the leftover frames.
        offset = int(rng.integers(0, slack - (count - 1) * span + 1)) if spec.sampling == "random" else 0
        return stride, [offset + i * span for i in range(count)]
    if spec.sampling == "uniform":
        # Windows overlap when more are asked for than fit side by side.
        starts = np.linspace(0, slack, spec.clips_per_video).round().astype(int)
        return stride, np.unique(starts).tolist()
    count = min(spec.clips_per_video, slack + 1)
    return stride, sorted(rng.choice(slack + 1, size=count, replace=False).tolist())


def window(start: int, stride: int, num_frames: int) -> list[int]:
    """The source frames of the clip that starts at `start`: start + stride * arange(num_frames)."""
    return list(range(start, start + stride * num_frames, stride))
